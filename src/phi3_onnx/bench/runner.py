"""`phi3-onnx bench`: rounds of fresh worker processes, variants alternating A B A B, medians per row.

Packages are read only through phi3_onnx.runtime (manifest, bundle.json, provider choice); the
timing itself runs in `phi3_onnx.bench.worker`, one process per variant per round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_onnx.bench.options import BenchOptions
from phi3_onnx.bench.worker import MARK
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import Manifest
from phi3_onnx.runtime import choose_provider, probe_environment
from phi3_onnx.manifest import discover
from phi3_onnx.runtime.package import open_package

# The per-run numbers a row reports as the median over its rounds.
METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms", "decode_ms_per_token",
           "decode_s", "total_s")
Progress = Callable[[int], None]


@dataclass(frozen=True)
class BenchVariant:
    name: str
    path: Path
    manifest: Manifest

    @property
    def model_bytes(self) -> int:
        """The ONNX graph and its external weights, as listed in the manifest."""
        return sum(f.size for n, f in self.manifest.files.items() if n.endswith((".onnx", ".onnx.data")))


def bench_variants(path: Path, names: tuple[str, ...] = ()) -> tuple[list[BenchVariant], bool]:
    """The package itself, or the bundle's variants (all, or `names` in that order)."""
    found = discover(Path(path))  # containment and manifests checked for every variant
    if not found.bundle:
        if names:
            raise Phi3OnnxError(f"{path} is a single package, not a bundle: --variant does not apply")
    variants = {v.name: v for v in found.items}
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise Phi3OnnxError(f"bundle has no variant {unknown[0]!r}; it has: {', '.join(variants)}")
    chosen = [variants[n] for n in names] if names else list(variants.values())
    for v in chosen:
        open_package(v.path)  # file sizes, before any timing
    return [BenchVariant(v.manifest.target.name if not found.bundle else v.name, v.path, v.manifest) for v in chosen], found.bundle


def check_fits(variants: list[BenchVariant], options: BenchOptions) -> None:
    for v in variants:
        context = v.manifest.model.max_position_embeddings
        if options.max_length > context:
            raise Phi3OnnxError(f"longest prompt + new tokens = {options.max_length} is over {v.name}'s context {context}")


def run_worker(variant: BenchVariant, options: BenchOptions, advance: Progress) -> dict[str, Any]:
    """One fresh process: its loaded/run/done events, or an `error` entry."""
    job = {"path": str(variant.path), "device": options.device, "max_length": options.max_length,
           "threads": options.threads, "prompt_tokens": list(options.prompt_tokens), "new_tokens": options.new_tokens,
           "seed": options.seed, "warmup_tokens": options.warmup_tokens}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phi3_onnx.bench.worker", json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    result: dict[str, Any] = {"runs": []}
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith(MARK):
            continue
        event = json.loads(line[len(MARK):])
        kind = event.pop("event")
        if kind == "run":
            result["runs"].append(event)
            advance(1)
        else:
            result.update(event)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0 and "message" not in result:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {proc.returncode}"
        result["message"] = f"benchmark process failed: {tail[:300]}"
    return result


def run_rounds(variants: list[BenchVariant], options: BenchOptions, advance: Progress) -> dict[str, list[dict[str, Any]]]:
    """repeats rounds; each round runs every variant once, in order (A B A B)."""
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    failed: set[str] = set()
    for _ in range(options.repeats):
        for v in variants:
            if v.name in failed:
                advance(len(options.prompt_tokens))
                continue
            result = run_worker(v, options, advance)
            results[v.name].append(result)
            if "message" in result:
                failed.add(v.name)
                advance(len(options.prompt_tokens) - len(result["runs"]))
    return results


def make_rows(variant: BenchVariant, rounds: list[dict[str, Any]], options: BenchOptions) -> list[dict[str, Any]]:
    """One row per prompt length: medians over the rounds, every round's numbers under `runs`."""
    error = next((r["message"] for r in rounds if "message" in r), None)
    ok = [r for r in rounds if "message" not in r]
    first = ok[0] if ok else {}
    rows = []
    for i, length in enumerate(options.prompt_tokens):
        runs = [r["runs"][i] for r in ok]
        row: dict[str, Any] = {
            "variant": variant.name, "target": variant.manifest.target.name, "status": "error" if error else "ok",
            "ep": first.get("ep"), "threads": first.get("threads"), "prompt_tokens": length,
            "new_tokens": options.new_tokens, "decode_tokens": options.new_tokens - 1, "repeats": len(runs),
            "model_bytes": variant.model_bytes,
            "load_s": _median([r["load_s"] for r in ok]),
            "peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok if r.get("peak_rss_bytes")), default=None),
        }
        row.update({m: _median([run[m] for run in runs]) for m in METRICS})
        if first.get("ep") == "cuda":
            row["peak_gpu_bytes"] = max((r["peak_gpu_bytes"] for r in ok if r.get("peak_gpu_bytes")), default=None)
        if error:
            row["error"] = error
        row["runs"] = [{m: run[m] for m in METRICS} for run in runs]
        rows.append(row)
    return rows


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def check_devices(variants: list[BenchVariant], device: str) -> None:
    """Refuse before timing anything when a variant cannot run on the requested device."""
    env = probe_environment()
    for v in variants:
        choose_provider(env, v.manifest.target.provider, device, v.name)
