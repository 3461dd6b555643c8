"""CPU decode comparison anyone can rerun from a clone: phi3-onnx int4-cpu block sizes, optionally the
onnxruntime-genai model builder's package, and llama.cpp (llama-cpp-python) Q4_0 / Q4_K_M of the same
checkpoint — same thread count for all, one alternated run (A B C ... A B C ...), medians and ratios.
With --device cuda the same comparison of our int4-cuda packages on the CUDA EP (a GPU machine).

    python benchmarks/make_random_checkpoint.py phi3-mini-4k /tmp/bench/mini4k    # full-size random weights
    pip install gguf llama-cpp-python                                             # llama.cpp side (builds from source)
    python benchmarks/cpu_compare.py --checkpoint /tmp/bench/mini4k --work /tmp/bench --rounds 3

    --builder DIR       add a model builder package made elsewhere (its export needs ~22 GiB RAM)
    --no-llama          ONNX Runtime only
    --device cuda       int4-cuda / int4-awq-cuda packages, each run with its own genai_config (CUDA EP,
                        CUDA graphs as exported); no llama.cpp
    --jobs N            run N exports at once (a machine with the RAM for it: ~5 GiB each for Phi-4-mini)
    --flagship          add int4-awq-<device>'s graph (block 128, a tied embedding/lm_head table at block 32),
                        exported with RTN values: AWQ changes the numbers in it, not its shape, so it
                        decodes at the flagship's speed without a calibration run
    --thread-study      instead: ours block 32 with intra_op_num_threads 1 (= genai's default without
                        the key) / 0 (as exported: all cores) / --threads / --threads without spinning

Every measurement is a fresh process: load, an untimed 4-token warm-up, then one timed run: random
prompt ids, greedy, every new token generated (min_length = max_length for genai; llama.cpp runs its
own loop). prefill = the prompt's forward pass; decode = new_tokens - 1 tokens after the first.
Writes benchmarks/results/<name>.json, .md and (with matplotlib) .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from phi3_onnx.runtime.threads import physical_cores  # noqa: E402

# Child process: one genai package. argv: path P N threads|none seed
GENAI = r"""
import json, resource, sys, time, numpy as np, onnxruntime_genai as og
path, P, N, threads, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
t0 = time.perf_counter()
cfg = og.Config(path)
if threads != "none":  # "N" or "N-nospin" (ORT's intra-op threads sleep instead of spinning between ops)
    opts = {"intra_op_num_threads": int(threads.split("-")[0])}
    if threads.endswith("-nospin"):
        opts["session.intra_op.allow_spinning"] = "0"
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
model = og.Model(cfg)
load_s = time.perf_counter() - t0
VOCAB = json.load(open(path + "/genai_config.json"))["model"]["vocab_size"]
def run(ids, n):
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    g = og.Generator(model, p)
    t0 = time.perf_counter(); g.append_tokens(np.asarray(ids, dtype=np.int32)); t1 = time.perf_counter()
    g.generate_next_token(); t2 = time.perf_counter()
    for _ in range(n - 1):
        g.generate_next_token()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t0, t3 - t2
ids = np.random.default_rng(seed).integers(min(100, VOCAB // 20), min(30000, VOCAB * 9 // 10), size=P).tolist()
run(ids, 4)
prefill, ttft, decode = run(ids, N)
print("@result " + json.dumps({"load_s": load_s, "prefill_s": prefill, "ttft_s": ttft, "decode_s": decode,
                               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# Child process: one GGUF file with llama-cpp-python. argv: path P N threads seed
LLAMA = r"""
import json, resource, sys, time, numpy as np
from llama_cpp import Llama
path, P, N, threads, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=P + N + 8, n_batch=max(P, 32), n_threads=threads, n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t0
VOCAB = llm.n_vocab()
def run(ids, n):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    tok = llm.sample(top_k=1, temp=0.0); t2 = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([tok]); tok = llm.sample(top_k=1, temp=0.0)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t0, t3 - t2
ids = np.random.default_rng(seed).integers(min(100, VOCAB // 20), min(30000, VOCAB * 9 // 10), size=P).tolist()
run(ids, 4)
prefill, ttft, decode = run(ids, N)
print("@result " + json.dumps({"load_s": load_s, "prefill_s": prefill, "ttft_s": ttft, "decode_s": decode,
                               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

QUANTIZE = r"""
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3]); params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""
LLAMA_TYPES = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7}


@dataclass
class Variant:
    name: str
    kind: str  # "genai" | "llama"
    path: Path
    threads: str  # genai: an int or "none" (the package's own setting); llama: an int
    runs: list[dict] = field(default_factory=list)

    @property
    def model_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("*.onnx*"))


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def export_ours(ckpt: Path, work: Path, block: int, device: str = "cpu") -> Path:
    out = work / f"ours-int4-{device}-b{block}"
    if not (out / "manifest.json").is_file():
        sh([sys.executable, "-m", "phi3_onnx.cli", "export", "-m", str(ckpt), "-t", f"int4-{device}", "--block-size",
            str(block), "-o", str(out), "--force", "-q"])
    return out


FLAGSHIP_GRAPH = r"""
import sys
from pathlib import Path
from phi3_onnx import export
from phi3_onnx.checkpoint import open_checkpoint, spec_from_folder
src = Path(sys.argv[1])
export(src, sys.argv[3], sys.argv[2], force=True, weights=open_checkpoint(src, spec_from_folder(src)))
"""


def export_flagship_graph(ckpt: Path, work: Path, device: str = "cpu") -> Path:
    """int4-awq-<device>'s graph over RTN weights (the manifest says "weights supplied by the caller")."""
    out = work / f"ours-int4-awq-{device}-graph-rtn"
    if not (out / "manifest.json").is_file():
        sh([sys.executable, "-c", FLAGSHIP_GRAPH, str(ckpt), str(out), f"int4-awq-{device}"])
    return out


def make_gguf(ckpt: Path, work: Path, kind: str, threads: int) -> Path:
    f16 = work / "gguf" / f"{ckpt.name}-f16.gguf"
    out = work / "gguf" / f"{ckpt.name}-{kind}.gguf"
    if not out.is_file():
        f16.parent.mkdir(parents=True, exist_ok=True)
        if not f16.is_file():
            sh([sys.executable, str(REPO / "benchmarks" / "gguf_convert.py"), str(ckpt), str(f16)])
        sh([sys.executable, "-c", QUANTIZE, str(f16), str(out), str(LLAMA_TYPES[kind]), str(threads)])
    return out


def measure(v: Variant, prompt: int, new: int, seed: int) -> dict:
    load_average = round(os.getloadavg()[0], 2)
    script = GENAI if v.kind == "genai" else LLAMA
    with tempfile.TemporaryFile("w+") as err:
        out = subprocess.run([sys.executable, "-c", script, str(v.path), str(prompt), str(new), v.threads, str(seed)],
                             stdout=subprocess.PIPE, stderr=err, text=True)
        if out.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{v.name} failed:\n{err.read()[-2000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("@result "))
    r = json.loads(line[len("@result "):])
    r.update(decode_tokens_per_s=(new - 1) / r["decode_s"], prefill_tokens_per_s=prompt / r["prefill_s"],
             time_to_first_token_ms=1000 * r["ttft_s"], load_average=load_average)
    return r


def summarise(variants: list[Variant], base: str) -> list[dict]:
    """Medians over rounds, the ratio of medians to the baseline, and the median of per-round ratios
    (each round's variants ran back to back, so a load spike that spans a round cancels in its ratio)."""
    rows = []
    med = {v.name: statistics.median(r["decode_tokens_per_s"] for r in v.runs) for v in variants}
    base_runs = next(v.runs for v in variants if v.name == base)
    for v in variants:
        per_round = [r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for r, b in zip(v.runs, base_runs)]
        row = {"variant": v.name, "kind": v.kind, "threads": v.threads, "model_bytes": v.model_bytes,
               "rounds": len(v.runs), "decode_tokens_per_s_runs": [round(r["decode_tokens_per_s"], 3) for r in v.runs],
               "load_average_runs": [r["load_average"] for r in v.runs]}
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms", "load_s", "peak_rss_bytes"):
            row[key] = statistics.median(r[key] for r in v.runs)
        row[f"decode_ratio_vs_{base}"] = med[v.name] / med[base]
        row["decode_ratio_per_round"] = [round(x, 3) for x in per_round]
        row["decode_ratio_per_round_median"] = statistics.median(per_round)
        rows.append(row)
    return rows


def markdown(doc: dict) -> str:
    base = doc["baseline"]
    s = doc["settings"]
    gpu = f"GPU {s['gpu']} (CUDA EP), " if s.get("device") == "cuda" else ""
    lines = [f"# {'CUDA' if gpu else 'CPU'} compare: {doc['checkpoint']} ({doc['started']})", "",
             f"{gpu}{doc['machine']['cpu']}, {doc['machine']['physical_cores']} physical cores, load average at start "
             f"{doc['machine']['load_average_at_start']}; prompt {s['prompt_tokens']} random ids, {s['new_tokens']} new "
             f"tokens, {s['rounds']} alternated rounds (fresh process each); threads {s['threads']}; versions "
             + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
             f"| variant | threads | decode tok/s (median) | × {base} (ratio of medians) | × per round (median) | decode tok/s per round | "
             "prefill tok/s | TTFT ms | peak RSS GiB | model GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['variant']} | {r['threads']} | {r['decode_tokens_per_s']:.2f} | {r[f'decode_ratio_vs_{base}']:.2f} | "
                     f"{r['decode_ratio_per_round_median']:.2f} | {', '.join(f'{x:.2f}' for x in r['decode_tokens_per_s_runs'])} | "
                     f"{r['prefill_tokens_per_s']:.1f} | {r['time_to_first_token_ms']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['model_bytes'] / 1e9:.2f} |")
    loads = [max(v) for v in zip(*(r["load_average_runs"] for r in doc["rows"]))]
    lines += ["", "1-minute load average at the start of each round's runs (max over its variants): "
              + ", ".join(f"{x:.1f}" for x in loads)]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: skipping the PNG (pip install 'phi3-onnx[bench]')")
        return
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["variant"] for r in rows], [r["decode_tokens_per_s"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["decode_tokens_per_s_runs"]), r["decode_tokens_per_s_runs"], color="black", s=8, zorder=3)
    ax.set_ylabel("decode tokens/s (median; dots: rounds)")
    ax.set_title(f"{doc['checkpoint']}: {doc['settings']['threads']} threads, {doc['machine']['physical_cores']}-core {doc['machine']['cpu']}")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    # a GPU machine may have the CPU onnxruntime installed beside the onnxruntime-gpu that is imported
    for dist in ("phi3-onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "llama-cpp-python"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="where packages and GGUF files are made (reused when present)")
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--builder", type=Path, help="a model builder int4 CPU package folder made elsewhere")
    ap.add_argument("--llama", default="q4_0,q4_k_m", help="llama.cpp quantizations (comma-separated)")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--thread-study", action="store_true")
    ap.add_argument("--flagship", action="store_true", help="add int4-awq-<device>'s graph (RTN values, no calibration)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="exports at once")
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="results file stem (default: cpu_compare-<checkpoint>-<date>)")
    args = ap.parse_args()
    t = str(args.threads) if args.device == "cpu" else "none"
    if args.device == "cuda" and (args.thread_study or args.builder or not args.no_llama):
        ap.error("--device cuda compares our packages only: pass --no-llama, without --builder/--thread-study")
    blocks = [int(b) for b in args.blocks.split(",") if b]
    variants: list[Variant] = []
    if args.thread_study:
        pkg = export_ours(args.checkpoint, args.work, blocks[0])
        variants = [Variant(f"ours b{blocks[0]} threads 1 (genai without the key)", "genai", pkg, "1"),
                    Variant(f"ours b{blocks[0]} as exported (0 = all cores)", "genai", pkg, "none"),
                    Variant(f"ours b{blocks[0]} threads {t}", "genai", pkg, t),
                    Variant(f"ours b{blocks[0]} threads {t}, no spinning", "genai", pkg, f"{t}-nospin")]
    else:
        dev = args.device
        jobs = [(f"ours int4-{dev} b{b}", lambda b=b: export_ours(args.checkpoint, args.work, b, dev)) for b in blocks]
        if args.flagship:
            jobs.append((f"ours int4-awq-{dev} graph", lambda: export_flagship_graph(args.checkpoint, args.work, dev)))
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each export is its own process
            paths = list(pool.map(lambda job: job[1](), jobs))
        variants = [Variant(name, "genai", path, t) for (name, _), path in zip(jobs, paths)]
        if args.builder:
            variants.append(Variant("builder int4 cpu", "genai", args.builder, t))
        if not args.no_llama:
            for kind in [k for k in args.llama.split(",") if k]:
                variants.append(Variant(f"llama.cpp {kind.upper()}", "llama", make_gguf(args.checkpoint, args.work, kind, args.threads), t))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load = [round(x, 2) for x in os.getloadavg()]
    for rnd in range(args.rounds):
        for v in variants:
            r = measure(v, args.prompt_tokens, args.new_tokens, args.seed)
            v.runs.append(r)
            print(f"round {rnd} {v.name}: decode {r['decode_tokens_per_s']:.2f} tok/s, prefill {r['prefill_tokens_per_s']:.1f} tok/s, "
                  f"RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    base = variants[0].name
    doc = {
        "schema_version": 1, "started": started, "checkpoint": args.checkpoint.name, "baseline": base,
        "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
                     "threads": args.threads if args.device == "cpu" else "as exported", "seed": args.seed,
                     "thread_study": args.thread_study, "device": args.device, **({"gpu": _gpu()} if args.device == "cuda" else {})},
        "machine": {"cpu": _cpu(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
                    "load_average_at_start": load, "platform": platform.platform()},
        "versions": versions(),
        "rows": summarise(variants, base),
    }
    stem = args.name or f"cpu_compare-{args.checkpoint.name}-{started[:10]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(doc))
    plot(doc, args.out / f"{stem}.png")
    print(markdown(doc))


def _gpu() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
