"""`phi3-onnx bench`: decode / prefill speed, time to first token, memory and load time of packages.

Reads packages only through phi3_onnx.runtime (never the exporter): a package gives one row per
prompt length, a bundle one row per variant × prompt length. The JSON document is versioned
(`schema_version`); `render` prints the table and draws the optional plot (the `[bench]` extra).

    from phi3_onnx.bench import BenchOptions, bench
    doc = bench("phi3-mini-int4", BenchOptions(prompt_tokens=(16, 512), new_tokens=128, repeats=3))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from phi3_onnx.bench.machine import machine_info, versions
from phi3_onnx.bench.options import BenchOptions, parse_lengths
from phi3_onnx.bench.runner import Progress, bench_variants, check_devices, check_fits, make_rows, run_rounds

SCHEMA_VERSION = 1


def bench(path: str | Path, options: BenchOptions, advance: Progress | None = None) -> dict[str, Any]:
    """Benchmark a package or bundle; returns the JSON document (rows, settings, machine, versions)."""
    variants, is_bundle = bench_variants(Path(path), options.variants)
    check_fits(variants, options)
    check_devices(variants, options.device)
    machine = machine_info()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results = run_rounds(variants, options, advance or (lambda n=1: None))
    rows = [row for v in variants for row in make_rows(v, results[v.name], options)]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "phi3-onnx bench",
        "started": started,
        "package": str(path),
        "bundle": is_bundle,
        "settings": {"prompt_tokens": list(options.prompt_tokens), "new_tokens": options.new_tokens,
                     "repeats": options.repeats, "threads": options.threads, "device": options.device,
                     "seed": options.seed, "warmup_tokens": options.warmup_tokens,
                     "method": "each round loads every variant in a fresh process (A B A B); random prompt ids; "
                               "greedy; min_length = max_length; rows are medians over rounds"},
        "machine": machine,
        "versions": versions(),
        "rows": rows,
    }


def total_runs(path: str | Path, options: BenchOptions) -> int:
    variants, _ = bench_variants(Path(path), options.variants)
    return len(variants) * options.repeats * len(options.prompt_tokens)


__all__ = ["SCHEMA_VERSION", "BenchOptions", "bench", "parse_lengths", "total_runs"]
