"""CPU benchmark for issue 2: export time / peak RSS and decode speed, ours vs onnxruntime-genai's builder.

Usage (2-core machine, nothing else running):
    python ../shared/anchors/make_random.py mini-4k /tmp/bench/mini4k      # full-size random Phi-3-mini-4k
    python benchmarks/cpu_bench.py --checkpoint /tmp/bench/mini4k --work /tmp/bench --reps 2

Each export runs in its own process (peak RSS from wait4's ru_maxrss); the two sides alternate
(A B A B) because this machine stalls at random; medians are reported with the ratio.
Decode: batch 1, 16 random prompt ids, 128 new tokens, greedy, min_length = max_length,
intra_op_num_threads = 2 in both genai_config.json files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DECODE = r"""
import sys, time, numpy as np, onnxruntime_genai as og
path, P, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = og.Model(path)
ids = np.random.default_rng(0).integers(100, 30000, size=P).astype(np.int32)
params = og.GeneratorParams(model)
params.set_search_options(max_length=P + N, min_length=P + N, do_sample=False)
gen = og.Generator(model, params)
t0 = time.perf_counter(); gen.append_tokens(ids); tp = time.perf_counter() - t0
n = 0; t1 = time.perf_counter()
while not gen.is_done():
    gen.generate_next_token(); n += 1
td = time.perf_counter() - t1
print(f"{P / tp:.2f} {n / td:.2f}")
"""


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) of the child, and its stdout (output goes to files: a full pipe would block it)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 2**20, out.read()


def export_cmds(ckpt: Path, work: Path) -> dict[str, tuple[list[str], Path]]:
    ours, builder = work / "ours-int4-cpu", work / "builder-int4-cpu"
    return {
        "phi3-onnx": ([sys.executable, "-m", "phi3_onnx.cli", "export", "-m", str(ckpt), "-t", "int4-cpu",
                       "-o", str(ours), "--force", "-q"], ours),
        "builder": ([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(builder),
                     "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")], builder),
    }


def set_threads(pkg: Path, threads: int) -> None:
    cfg_path = pkg / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=4))


def bench_exports(cmds: dict[str, tuple[list[str], Path]], reps: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for rep in range(reps):
        for name, (cmd, out) in cmds.items():
            if out.exists():
                shutil.rmtree(out)
            wall, rss, _ = run_measured(cmd)
            results[name].append((wall, rss))
            print(f"export rep{rep} {name}: {wall:.1f} s, peak RSS {rss:.2f} GiB", flush=True)
    return results


def bench_decode(pkgs: dict[str, Path], reps: int, prompt: int, new: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in pkgs}
    for rep in range(reps):
        for name, pkg in pkgs.items():
            _, rss, out = run_measured([sys.executable, "-c", DECODE, str(pkg), str(prompt), str(new)])
            prefill, decode = map(float, out.split())
            results[name].append((decode, prefill, rss))
            print(f"decode rep{rep} {name}: {decode:.2f} tok/s decode, {prefill:.1f} tok/s prefill, RSS {rss:.2f} GiB", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true", help="reuse packages already in --work")
    args = ap.parse_args()
    cmds = export_cmds(args.checkpoint, args.work)
    if not args.skip_export:
        ex = bench_exports(cmds, args.reps)
        med = {k: (statistics.median(w for w, _ in v), max(r for _, r in v)) for k, v in ex.items()}
        print(f"EXPORT median wall: ours {med['phi3-onnx'][0]:.1f} s, builder {med['builder'][0]:.1f} s, "
              f"ratio ours/builder {med['phi3-onnx'][0] / med['builder'][0]:.2f}; peak RSS ours {med['phi3-onnx'][1]:.2f} GiB, "
              f"builder {med['builder'][1]:.2f} GiB")
    pkgs = {k: out for k, (_, out) in cmds.items()}
    for pkg in pkgs.values():
        set_threads(pkg, 2)
    dec = bench_decode(pkgs, args.decode_reps, 16, 128)
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in dec.items()}
    print(f"DECODE median: ours {med['phi3-onnx'][0]:.2f} tok/s, builder {med['builder'][0]:.2f} tok/s, "
          f"ratio {med['phi3-onnx'][0] / med['builder'][0]:.3f}; prefill ours {med['phi3-onnx'][1]:.1f}, "
          f"builder {med['builder'][1]:.1f} tok/s; RSS ours {med['phi3-onnx'][2]:.2f}, builder {med['builder'][2]:.2f} GiB")
    for name, pkg in pkgs.items():
        size = (pkg / "model.onnx.data").stat().st_size / 1e9
        print(f"{name} model.onnx.data: {size:.2f} GB")


if __name__ == "__main__":
    main()
