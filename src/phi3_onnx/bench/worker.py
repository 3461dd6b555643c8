"""One benchmark process: load one package, one untimed warm-up, one timed run per prompt length.

`python -m phi3_onnx.bench.worker JOB_JSON` prints one `@bench {json}` line per event (loaded, run,
done, error) on stdout; the parent (`phi3_onnx.bench.runner`) reads them as they come. Each load is
its own process so that peak RSS, load time and ONNX Runtime's memory belong to one variant only.

A run: random prompt ids (seeded, away from the special tokens), greedy, min_length = max_length so
no end token stops it early; `append` of the prompt is the prefill, the first sampled token ends
time-to-first-token, the other new_tokens - 1 are the decode.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MARK = "@bench "


@dataclass(frozen=True)
class Run:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # the prompt's forward pass (append_tokens)
    ttft_s: float  # prefill + sampling the first token
    decode_s: float  # the remaining new_tokens - 1 tokens
    total_s: float

    @property
    def decode_tokens(self) -> int:
        return self.new_tokens - 1

    def metrics(self) -> dict[str, float]:
        return {
            "decode_tokens_per_s": self.decode_tokens / self.decode_s,
            "prefill_tokens_per_s": self.prompt_tokens / self.prefill_s,
            "time_to_first_token_ms": 1000 * self.ttft_s,
            "decode_ms_per_token": 1000 * self.decode_s / self.decode_tokens,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
        }


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """Random ids in [100, 30000) on a Phi-3 vocabulary (as the anchors' og_bench.py), scaled down on small ones."""
    low, high = min(100, vocab_size // 20), min(30000, vocab_size * 9 // 10)
    return [int(t) for t in np.random.default_rng(seed).integers(low, high, size=length)]


def time_run(model: Any, ids: list[int], new_tokens: int) -> Run:
    from phi3_onnx.runtime.options import GenerationOptions

    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    decoder = model.new_decoder(options, prompt_length=len(ids))
    t0 = time.perf_counter()
    decoder.append(ids)
    t1 = time.perf_counter()
    decoder.next_token()
    t2 = time.perf_counter()
    for _ in range(new_tokens - 1):
        decoder.next_token()
    t3 = time.perf_counter()
    return Run(len(ids), new_tokens, t1 - t0, t2 - t0, t3 - t2, t3 - t0)


def measure(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
    from phi3_onnx.bench.machine import gpu_bytes_used, peak_rss_bytes
    from phi3_onnx.runtime import load
    from phi3_onnx.runtime.threads import effective_threads

    t0 = time.perf_counter()
    model = load(job["path"], device=job["device"], max_length=job["max_length"], threads=job["threads"])
    load_s = time.perf_counter() - t0
    gpu = [gpu_bytes_used()] if model.provider == "cuda" else []
    emit({"event": "loaded", "load_s": load_s, "ep": model.provider, "threads": effective_threads(model.threads),
          "threads_setting": model.threads, "target": model.manifest.target.name})
    vocab = model.manifest.model.vocab_size
    lengths = job["prompt_tokens"]
    if job["warmup_tokens"]:
        time_run(model, prompt_ids(vocab, min(lengths), job["seed"] + 1), job["warmup_tokens"])
    for length in lengths:
        run = time_run(model, prompt_ids(vocab, length, job["seed"]), job["new_tokens"])
        if model.provider == "cuda":
            gpu.append(gpu_bytes_used())
        emit({"event": "run", **asdict(run), **run.metrics()})
    peak_gpu = max((g for g in gpu if g is not None), default=None)
    emit({"event": "done", "peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": peak_gpu})


def main(argv: list[str]) -> int:
    from phi3_onnx.errors import Phi3OnnxError

    def emit(doc: dict[str, Any]) -> None:
        sys.stdout.write(MARK + json.dumps(doc) + "\n")
        sys.stdout.flush()

    try:
        measure(json.loads(argv[0]), emit)
    except Phi3OnnxError as exc:
        emit({"event": "error", "message": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    except Exception as exc:  # a crash in genai / ORT: report it as this variant's error
        emit({"event": "error", "message": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              "exit_code": 1})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
