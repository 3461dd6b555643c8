"""The accuracy side of the int4 accuracy-speed frontier, rerunnable from a clone (issue 10 item 1).

For each tiny trained checkpoint: block size (32/64/128) x method (RTN/AWQ) x graph (the CPU graph at
accuracy level 4 = int8 compute and level 1 = fp32 compute; the CUDA graph, fp16 activations), every
variant judged by `phi3-onnx eval` against the checkpoint's fp32-cpu package on held-out text:
mean KL(fp32 || variant), top-1 agreement, perplexity increase. Writes
benchmarks/results/<name>.json (every eval report, verbatim) and <name>.md (the table).

    pip install -e ".[cpu,awq]"
    python benchmarks/frontier_accuracy.py --work /tmp/frontier          # both committed checkpoints

* Every package is a plain `phi3_onnx.export` of the target with `--block-size`/`--accuracy-level`
  overrides; AWQ calibrates with the exporter's defaults (the built-in calibration text, 8 x 256
  tokens), as `phi3-onnx export -t int4-awq-cpu` does. The DML graph has no RTN target: its RTN rows
  are int4-awq-dml's recipe with method rtn (same graph, RTN weights).
* The held-out text (tests/assets/corpus/heldout.txt) and the built-in calibration text are disjoint
  splits of the corpus (scripts/make_corpus.py buckets paragraphs by content hash); the script checks
  that no paragraph of one occurs in the other. Neither is in train.txt, which the checkpoints saw.
* The CUDA packages run on this machine's CPU EP when it has no CUDA EP (the eval report says so per
  row): ORT's CPU MatMulNBits and GroupQueryAttention take fp16 inputs, so the fp16 graph and its
  int4 weights are what is measured, but with the CPU kernels' arithmetic, not CUDA's.
* Speed is not measured here: the speed column quotes benchmarks/RESULTS.md (int4-cpu graph, level 4,
  full-size random Phi-3-mini, 2 threads on the 2-core machine, run 3: decode tok/s ratio vs block 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from phi3_onnx import export
from phi3_onnx.checkpoint import spec_from_folder
from phi3_onnx.cli import main as cli
from phi3_onnx.targets import TARGETS, Target

HELDOUT = REPO / "tests/assets/corpus/heldout.txt"
CHECKPOINTS = [REPO / "tests/assets/tiny-phi3", REPO / "tests/assets/tiny-phi3-w192"]
# Decode speed of the int4-cpu graph vs block 32 (level 4, 2 threads; benchmarks/RESULTS.md, cpu_compare run 3).
MEASURED_SPEED = {32: "1.00x", 64: "1.11x", 128: "1.30x"}
# (graph label, RTN target, AWQ target, accuracy level override or None for the target's own)
GRAPHS = [("cpu L4 (int8 compute)", "int4-cpu", "int4-awq-cpu", 4),
          ("cpu L1 (fp32 compute)", "int4-cpu", "int4-awq-cpu", 1),
          ("cuda fp16", "int4-cuda", "int4-awq-cuda", None),
          ("dml fp16", None, "int4-awq-dml", None)]


def paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if p.strip()}


def check_disjoint() -> dict:
    from phi3_onnx.quantize.awq import calibration_text

    calib, held = paragraphs(calibration_text(None)), paragraphs(HELDOUT.read_text(encoding="utf-8"))
    train = paragraphs((REPO / "tests/assets/corpus/train.txt").read_text(encoding="utf-8"))
    shared = calib & held
    if shared:
        raise SystemExit(f"calibration and held-out text share {len(shared)} paragraphs, e.g. {next(iter(shared))[:80]!r}")
    return {"calibration_paragraphs": len(calib), "heldout_paragraphs": len(held),
            "shared_calibration_heldout": 0, "shared_train_heldout": len(train & held),
            "shared_train_calibration": len(train & calib)}


def variant_name(method: str, block: int, graph: str) -> str:
    return f"{method}-b{block:03d}-{graph.split(' (')[0].replace(' ', '-')}"


def target_for(method: str, rtn: str | None, awq: str, block: int, level: int | None) -> Target:
    if method == "awq" or rtn is not None:
        return TARGETS[awq if method == "awq" else rtn].with_overrides(block_size=block, accuracy_level=level)
    t = TARGETS[awq].with_overrides(block_size=block, accuracy_level=level)  # DML: no RTN target of its own
    return dataclasses.replace(t, quant=dataclasses.replace(t.quant, method="rtn"))


def build(ckpt: Path, work: Path, blocks: list[int], log) -> tuple[Path, Path]:
    """fp32-cpu reference + every variant in one folder of packages (eval's bundle form)."""
    ref = work / "fp32-cpu"
    if not (ref / "manifest.json").is_file():
        export(ckpt, "fp32-cpu", ref, force=True)
    variants = work / "variants"
    variants.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        for graph, rtn, awq, level in GRAPHS:
            for method in ("rtn", "awq"):
                out = variants / variant_name(method, block, graph)
                if (out / "manifest.json").is_file():
                    continue
                t0 = time.perf_counter()
                export(ckpt, target_for(method, rtn, awq, block, level), out, force=True)
                log(f"  exported {out.name} ({time.perf_counter() - t0:.1f} s)")
    return ref, variants


def evaluate(ref: Path, variants: Path, out: Path, max_tokens: int, window: int) -> dict:
    rc = cli(["eval", str(variants), "--reference", str(ref), "--data", str(HELDOUT), "--max-tokens", str(max_tokens),
              "--window", str(window), "--json", str(out), "--quiet"])
    report = json.loads(out.read_text())
    if rc not in (0, 1):  # 1: some variant over its target's limits, still a measurement
        raise SystemExit(f"eval failed (exit {rc})")
    return report


def rows_of(ckpt: Path, report: dict) -> list[dict]:
    rows = []
    for v in report["variants"]:
        method, block, graph = v["name"].split("-", 2)
        m = v["metrics"] or {}
        rows.append({"checkpoint": ckpt.name, "block": int(block[1:]), "method": method, "graph": graph,
                     "target": v["target"], "status": v["status"], "ep": v.get("ep"), "ep_note": v.get("ep_note"),
                     "kl": m.get("kl_mean"), "kl_p99": m.get("kl_p99"), "top1": m.get("top1"), "ppl": m.get("ppl"),
                     "ref_ppl": m.get("ref_ppl"), "ppl_increase_pct": m.get("ppl_increase_pct")})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [(f"Held-out tokens per checkpoint: {meta['tokens']} ({meta['windows']} windows of {meta['window']}); "
             "reference: the checkpoint's fp32-cpu package. Speed: **measured elsewhere** (benchmarks/RESULTS.md, "
             "int4-cpu graph level 4, full-size random Phi-3-mini, 2 threads), decode vs block 32; the AWQ graph is "
             "the RTN graph of the same block size, so it has the same speed."), ""]
    for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
        sub = [r for r in rows if r["checkpoint"] == ckpt]
        int4_cpu = next((r for r in sub if r["method"] == "rtn" and r["block"] == 32 and r["graph"] == "cpu-L4"), None)
        lines += [f"**{ckpt}** ({meta['dims'][ckpt]}; fp32 ppl {sub[0]['ref_ppl']:.2f})", "",
                  "| graph | block | method | KL vs fp32 | KL / int4-cpu's (RTN b32 L4) | top-1 | ppl | ppl vs fp32 | decode vs b32 (measured, CPU L4) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(sub, key=lambda r: (r["graph"], r["block"], r["method"] != "rtn")):
            if r["kl"] is None:
                lines.append(f"| {r['graph']} | {r['block']} | {r['method']} | {r['status']} | | | | | |")
                continue
            rel = f"{r['kl'] / int4_cpu['kl']:.2f}" if int4_cpu else ""
            speed = MEASURED_SPEED.get(r["block"], "") if r["graph"] == "cpu-L4" else "not measured"
            lines.append(f"| {r['graph']} | {r['block']} | {r['method'].upper()} | {r['kl']:.5f} | {rel} | {r['top1']:.4f} | "
                         f"{r['ppl']:.2f} | {r['ppl_increase_pct']:+.2f} % | {speed} |")
        lines.append("")
    notes = sorted({r["ep_note"] for r in rows if r["ep_note"]})
    if notes:
        lines += ["EP notes: " + "; ".join(notes), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="packages go here (reused when present)")
    ap.add_argument("--checkpoints", type=Path, nargs="+", default=CHECKPOINTS)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--name", default="frontier_accuracy")
    args = ap.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "data": str(HELDOUT.relative_to(REPO)),
            "disjointness": check_disjoint(), "window": args.window, "dims": {}, "reports": {}}
    rows = []
    for ckpt in args.checkpoints:
        spec = spec_from_folder(ckpt)
        meta["dims"][ckpt.name] = (f"hidden {spec.hidden_size}, intermediate {spec.intermediate_size}, "
                                   f"{spec.num_layers} layers, {spec.num_heads}/{spec.num_kv_heads} heads")
        work = args.work / ckpt.name
        print(f"{ckpt.name}: {meta['dims'][ckpt.name]}", flush=True)
        ref, variants = build(ckpt, work, args.blocks, lambda s: print(s, flush=True))
        report = evaluate(ref, variants, work / "eval.json", args.max_tokens, args.window)
        meta["reports"][ckpt.name] = report
        meta["tokens"], meta["windows"] = report["data"]["windows"] * report["data"]["window"], report["data"]["windows"]
        rows += rows_of(ckpt, report)
    out = REPO / "benchmarks/results"
    (out / f"{args.name}.json").write_text(json.dumps({"rows": rows, **meta}, indent=1) + "\n")
    md = markdown(rows, meta)
    (out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
