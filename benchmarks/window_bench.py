"""Batch-1 decode on the GPU machine: our default CUDA packages through phi3_onnx.runtime against the
model builder's through onnxruntime-genai, at several prompt lengths, alternated in one process.

usage: python benchmarks/window_bench.py OUT.json NAME=KIND:PATH ... [--prompts 16,512,1536] [--new 256] [--rounds 3]
  KIND: "ours" (phi3_onnx.runtime.load: for Phi-3-mini-4k the window-free decoder while a sequence
  fits the 2047-token window, see package.window_free) or "builder" (og.Model on the folder).

Every model is loaded once and stays loaded (an H200 holds all four mini-4k packages); each round
runs every prompt length on every model in turn (A B A B, against drift), one warm-up generation per
model first (CUDA graph capture). Prompts are random token ids; generation is greedy with the end
token suppressed (min length = max length), 256 new tokens. Decode tok/s = new tokens after the
first / time from the first token to the last; ours goes through the runtime's own Decoder (the
path `generate`/`bench`/`serve` take). Prints a table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # PYTHONPATH (a snapshot) wins


class Builder:
    def __init__(self, path: str) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(path)
        self.decoder = "model.onnx"

    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids.astype(np.int32))
        gen.generate_next_token()
        t1 = time.perf_counter()
        n = 1
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        return t1 - t0, (n - 1) / (t2 - t1)


class Ours:
    def __init__(self, path: str) -> None:
        from phi3_onnx.runtime import load

        self.model = load(path, max_length=4096)
        self.decoder = self.model.window_free or "model.onnx"

    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        options = self.model.options(max_new_tokens=new, min_new_tokens=new)
        decoder = self.model.new_decoder(options, len(ids))
        t0 = time.perf_counter()
        decoder.append(ids.tolist())
        decoder.next_token()
        t1 = time.perf_counter()
        for _ in range(new - 1):
            decoder.next_token()
        t2 = time.perf_counter()
        assert len(decoder) == len(ids) + new, (len(decoder), len(ids), new)
        self.decoder = "model.onnx" if decoder.windowed else (self.model.window_free or "model.onnx")
        return t1 - t0, (new - 1) / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("models", nargs="+", help="NAME=KIND:PATH")
    ap.add_argument("--prompts", default="16,512,1536")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=30000, help="prompt ids are drawn from 100..VOCAB")
    a = ap.parse_args()
    prompts = [int(p) for p in a.prompts.split(",")]
    rng = np.random.default_rng(0)
    ids = {p: rng.integers(100, a.vocab, size=p) for p in prompts}
    models = {}
    for spec in a.models:
        name, rest = spec.split("=", 1)
        kind, path = rest.split(":", 1)
        t = time.perf_counter()
        models[name] = {"ours": Ours, "builder": Builder}[kind](path)
        print(f"loaded {name} ({kind}, decoder {models[name].decoder}) in {time.perf_counter() - t:.1f}s", flush=True)
        models[name].run(ids[prompts[0]], 32)  # warm-up: CUDA graph capture
    rows = []
    for r in range(a.rounds):
        for p in prompts:
            for name, m in models.items():
                prefill, rate = m.run(ids[p], a.new)
                rows.append({"round": r, "model": name, "prompt": p, "new": a.new, "decode_tok_s": rate,
                             "prefill_ms": prefill * 1000, "decoder": m.decoder})
                print(f"round {r} prompt {p:5d} {name:14s} decode {rate:7.1f} tok/s  prefill+1st {prefill * 1000:7.1f} ms", flush=True)
    a.out.write_text(json.dumps({"rows": rows}, indent=1))
    print("\nmedian decode tok/s over rounds")
    names = list(models)
    print("prompt | " + " | ".join(names))
    for p in prompts:
        med = {n: statistics.median(x["decode_tok_s"] for x in rows if x["model"] == n and x["prompt"] == p) for n in names}
        print(f"{p} | " + " | ".join(f"{med[n]:.1f}" for n in names))
    print("RESULT " + json.dumps({"check": "window-bench", "rows": rows}))


if __name__ == "__main__":
    main()
