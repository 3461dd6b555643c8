"""n-gram speculative decoding: acceptance and speed by kind of task, and the verify-step cost.

usage: python benchmarks/speculative_bench.py TINY_PKG [--full PKG] [--reps 5] [--threads N]

1. On TINY_PKG (e.g. `phi3-onnx export --model tests/assets/tiny-phi3 --target int4-cpu -o out/tiny`),
   for input-grounded prompts (quote, continue, edit, code) and one free prompt: genai's acceptance
   rate and tokens per verify step, and end-to-end decode time off vs ngram, alternating A B A B
   (medians of --reps). Greedy, 120 new tokens, min_length = max_length.
2. With --full PKG (a full-size package, e.g. random-weight Phi-3-mini int4-cpu): the cost of one
   step that appends k = 1, 2, 4, 8 tokens after a 512-token prefix (what verifying k-1 drafts
   costs), medians of --reps; then the projected speedup per task = tokens per verify step x
   t(1) / t(k_eff), k_eff = drafts per round + 1 (the tiny model's acceptance; a real model's
   differs, so it is a projection).
Prints a Markdown table; everything runs from a clone, on any machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

HELDOUT = (Path(__file__).resolve().parents[1] / "tests" / "assets" / "corpus" / "heldout.txt").read_text(encoding="utf-8")
PASSAGE = HELDOUT[:700]
TASKS = {
    "quote": f"<|user|>\nQuote this passage exactly:\n{PASSAGE}<|end|>\n<|assistant|>\n",
    "continue": PASSAGE + "\n" + PASSAGE[:240],
    "edit": f"<|user|>\nFix the spelling in:\n{PASSAGE.replace('the', 'teh')}<|end|>\n<|assistant|>\n",
    "code": "def join(a, b):\n    return a + b\n\n\ndef join(a, b):\n    return",
    "free": "<|user|>\nWhat does a compiler do?<|end|>\n<|assistant|>\n",
}
SPEC = {"ngram_size": 3, "max_draft_tokens": 4}


def _model(path: str, threads: int | None) -> og.Model:
    config = og.Config(path)
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def decode(model: og.Model, prompt: list[int], new: int, spec: bool) -> tuple[float, dict]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    if spec:
        params.set_speculative_options(**SPEC)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    start = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    seconds = time.perf_counter() - start
    return seconds, (dict(gen.get_speculative_stats()) if spec else {})


def tiny_table(path: str, reps: int, threads: int | None) -> list[dict]:
    model = _model(path, threads)
    tok = og.Tokenizer(model)
    rows = []
    for task, text in TASKS.items():
        prompt = list(tok.encode(text))
        times = {False: [], True: []}
        stats = {}
        for _ in range(reps):  # A B A B
            for spec in (False, True):
                t, s = decode(model, prompt, 120, spec)
                times[spec].append(t)
                stats = s or stats
        off, on = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"task": task, "prompt_tokens": len(prompt), "acceptance": stats.get("acceptance_rate", 0.0),
                     "tokens_per_verify": stats.get("mean_emitted_tokens_per_round", 0.0),
                     "drafts_per_round": stats.get("avg_draft_tokens_per_round", 0.0),
                     "off_s": off, "ngram_s": on, "speedup": off / on})
    return rows


def verify_cost(path: str, reps: int, threads: int | None, ks=(1, 2, 4, 8), prefix: int = 512) -> dict[int, float]:
    """Seconds for one step appending k tokens after `prefix` tokens (rewound between runs)."""
    model = _model(path, threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 1000, size=prefix + max(ks)).astype(np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prefix + max(ks) + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(ids[:prefix])
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for rep in range(reps + 1):  # k = 1, 2, 4, 8, 1, 2, ...: interleaved, so a stall hits every k alike
        for k in ks:
            start = time.perf_counter()
            gen.append_tokens(ids[prefix:prefix + k])
            if rep:  # the first round is warm-up
                samples[k].append(time.perf_counter() - start)
            gen.rewind_to(prefix)
    out = {k: statistics.median(v) for k, v in samples.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tiny")
    ap.add_argument("--full")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    rows = tiny_table(args.tiny, args.reps, args.threads)
    print("| task | prompt tokens | acceptance | tokens / verify step | tiny: off s | tiny: ngram s | tiny speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['prompt_tokens']} | {r['acceptance']:.2f} | {r['tokens_per_verify']:.2f} | "
              f"{r['off_s']:.3f} | {r['ngram_s']:.3f} | {r['speedup']:.2f}x |")
    if args.full:
        cost = verify_cost(args.full, args.reps, args.threads)
        print("\n| k tokens in one step | seconds | x one-token step |\n|---|---|---|")
        for k, t in cost.items():
            print(f"| {k} | {t * 1000:.1f} ms | {t / cost[1]:.2f} |")
        print("\n| task | projected full-size speedup |\n|---|---|")
        for r in rows:
            k_eff = min(max(cost), max(1, round(r["drafts_per_round"]) + 1))
            near = min(cost, key=lambda k: abs(k - k_eff))
            print(f"| {r['task']} | {r['tokens_per_verify'] * cost[1] / cost[near]:.2f}x |")


if __name__ == "__main__":
    main()
