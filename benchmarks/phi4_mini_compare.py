"""Issue 12: full-size Phi-4-mini int4, phi3-onnx vs onnxruntime-genai's model builder (shared embeddings).

Runs from a clone (PYTHONPATH=src, or phi3-onnx installed); every path is under --work / --out:

    python benchmarks/phi4_mini_compare.py --work /tmp/p4 --out benchmarks/results        # full size
    python benchmarks/phi4_mini_compare.py --tiny --no-builder --no-cuda --work /tmp/p4t    # smoke test

Steps, each skipped when its result is already in WORK/results.json (so a second call on the same
machine resumes where a time-limited first one stopped, see --budget-s):
 1. ckpt: a random-weight checkpoint from src/phi3_onnx/checkpoint/configs/phi4-mini-instruct.json
    (transformers Phi3Config + Phi3ForCausalLM, built on the GPU when there is one, bf16 safetensors,
    tied embeddings) plus a small BPE tokenizer with the Phi special tokens (as ../shared/anchors/
    make_random.py does; token ids past its vocabulary are fine for a speed benchmark).
 2. exports, each its own process: peak RSS = wait4's ru_maxrss (largest process of the tree) and the
    polled sum over the process tree; wall time. Ours `phi3-onnx export -t int4-cpu|int4-cuda`;
    builder `python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p int4 -e cpu|cuda -c CACHE
    --extra_options shared_embeddings=true` (+ enable_cuda_graph=1 for cuda, as ours sets it).
 3. decode through onnxruntime-genai, each run a fresh process, alternating ours / builder (A B A B):
    load time and peak RSS after load, first-token time (append_tokens of the 16-token prompt, i.e.
    until the first new token's logits), decode tok/s over 64 new tokens (greedy, min_length =
    max_length), intra_op_num_threads = the core count; on CUDA also the GPU memory taken (nvidia-smi).
Results: OUT/phi4_mini_compare.json and .md (rewritten after every step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "src" / "phi3_onnx" / "checkpoint" / "configs" / "phi4-mini-instruct.json"
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
# head_dim stays 128 in --tiny (256 / 2), so the preset's 48 LongRoPE factors (rotary dim 96 / 2) still fit.

MAKE_CKPT = r"""
import json, sys, time, torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast
preset, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
t0 = time.time()
d = json.load(open(preset)); d.pop("auto_map", None); d.pop("transformers_version", None); d.update(overrides)
cfg = Phi3Config(**d)
with torch.device("meta"):
    m = Phi3ForCausalLM(cfg)
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = m.to_empty(device=dev).to(torch.bfloat16)
m.tie_weights()
g = torch.Generator(device=dev).manual_seed(0)
with torch.no_grad():
    for _, p in m.named_parameters():
        p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=g)
assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
m = m.to("cpu")
m.config.torch_dtype = torch.bfloat16
m.save_pretrained(out, safe_serialization=True)
words = [f"{a}{b}" for a in "bcdfghklmnprstvw" for b in ("a", "e", "i", "o", "u", "an", "en", "or")]
corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(400)]
tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
tok.pre_tokenizer = pre_tokenizers.Metaspace(); tok.decoder = decoders.Metaspace()
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"]))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>")
fast.add_special_tokens({"additional_special_tokens": SPECIALS})
fast.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
fast.save_pretrained(out)
n = sum(p.numel() for p in m.parameters())
print(json.dumps({"params": n, "device": dev, "seconds": round(time.time() - t0, 1)}))
"""

DECODE = r"""
import json, os, resource, subprocess, sys, time, numpy as np, onnxruntime_genai as og
path, P, N, cuda = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
def gpu_used():
    if not cuda: return None
    q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                       capture_output=True, text=True).stdout.strip()
    return float(q.splitlines()[0]) if q else None
base = gpu_used()
t0 = time.perf_counter(); model = og.Model(path); load_s = time.perf_counter() - t0
def hwm():  # this process's own peak RSS (VmHWM; ru_maxrss would include the parent's before exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20
load_rss = hwm()
ids = np.random.default_rng(0).integers(100, 30000, size=P).astype(np.int32)
params = og.GeneratorParams(model)
params.set_search_options(max_length=P + N, min_length=P + N, do_sample=False)
gen = og.Generator(model, params)
t0 = time.perf_counter(); gen.append_tokens(ids); first_s = time.perf_counter() - t0
n = 0; t1 = time.perf_counter()
while not gen.is_done():
    gen.generate_next_token(); n += 1
dec_s = time.perf_counter() - t1
used = gpu_used()
print("RESULT " + json.dumps({"load_s": load_s, "load_rss_gib": load_rss, "first_token_ms": first_s * 1000,
      "decode_tok_s": n / dec_s, "new_tokens": n, "peak_rss_gib": hwm(),
      "gpu_mem_mib": None if used is None or base is None else used - base}))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tree_rss(root: int) -> int:
    """RSS bytes summed over `root` and its descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d)] = int(Path(f"/proc/{d}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(kids.get(p, []))
    return total


def run_measured(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> dict:
    """Run `cmd` (output to log_path); wall s, ru_maxrss GiB (largest process), polled tree-sum peak GiB."""
    with open(log_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                done.wait(0.25)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        done.set()
        th.join()
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "parent_rss_gib": round(tree_rss(os.getpid()) / 2**30, 3), "wall_s": round(wall, 2), "maxrss_gib": round(usage.ru_maxrss / 2**20, 3),
            "tree_peak_rss_gib": round(peak[0] / 2**30, 3), "timed_out": wall >= timeout - 1}


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def versions() -> dict:
    v: dict = {"python": platform.python_version(), "machine": platform.node(), "cpus": os.cpu_count()}
    for mod in ("onnxruntime", "onnxruntime_genai", "onnx_ir", "onnx", "torch", "transformers", "numpy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            v[mod] = f"unavailable ({type(e).__name__})"
    try:
        import onnxruntime as ort
        v["ort_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        v["ort_providers"] = f"unavailable ({type(e).__name__})"
    try:
        v["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        v["gpu"] = None
    return v


def set_threads(pkg: Path, threads: int) -> None:
    p = pkg / "genai_config.json"
    cfg = json.loads(p.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    p.write_text(json.dumps(cfg, indent=4))


def graph_facts(pkg: Path) -> dict:
    """Op counts of interest and how the tied table is shared (names of GatherBlockQuantized / lm_head inputs)."""
    import onnx

    m = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    ops: dict[str, int] = {}
    gbq, lm = [], []
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type == "GatherBlockQuantized":
            gbq.append({"inputs": list(n.input), "data_shape": inits.get(n.input[0])})
    producers = {o: list(n.input) for n in m.graph.node for o in n.output}
    gbq_src = set()
    for g in gbq:  # the table itself, or the initializer behind one Reshape (the builder's form)
        gbq_src.add(g["inputs"][0])
        gbq_src.update(i for i in producers.get(g["inputs"][0], []) if i in inits)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits" and "lm_head" in n.name:
            lm.append({"name": n.name, "inputs": list(n.input[1:]), "weight_shape": inits.get(n.input[1]),
                       "shares_gbq_table": n.input[1] in gbq_src})
    return {"ops": {k: ops[k] for k in sorted(ops) if k in ("GatherBlockQuantized", "Gather", "MatMulNBits", "GroupQueryAttention", "Reshape", "Transpose")},
            "gather_block_quantized": gbq, "lm_head": lm}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.work: Path = args.work
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "results.json"
        self.r = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.r.setdefault("steps", {})
        self.t0 = time.monotonic()
        self.ckpt = self.work / "ckpt"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
                        PYTHONUNBUFFERED="1")

    # ---- bookkeeping
    def left(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.r, indent=2))
        out = self.a.out
        md = render(self.r)  # also fills self.r["summary"]
        (out / "phi4_mini_compare.json").write_text(json.dumps(self.r, indent=2))
        (out / "phi4_mini_compare.md").write_text(md)
        if self.a.log_tails:  # one file of every step's log tail (the device returns only a few files)
            self.a.log_tails.write_text("".join(f"==== {p.name}\n{tail(p, 40)}\n" for p in sorted(self.logs.glob("*.log"))))

    def step(self, name: str, est_s: float, fn) -> bool:
        prev = self.r["steps"].get(name)
        if prev is not None and prev.get("rc", 0) == 0 and "error" not in prev:
            log(f"skip {name} (done)")
            return True
        if self.left() < est_s:
            log(f"STOP before {name}: {self.left():.0f}s left of the budget, needs ~{est_s:.0f}s (run again to resume)")
            if name not in self.r.setdefault("not_run", []):
                self.r["not_run"].append(name)
            self.save()
            return False
        log(f"start {name}")
        t = time.monotonic()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - a failing step is a result
            res = {"error": f"{type(e).__name__}: {e}"}
        res["step_s"] = round(time.monotonic() - t, 1)
        if res.get("timed_out"):  # killed at the budget: not a result; a later call redoes it
            log(f"STOP: {name} ran out of budget after {res['step_s']}s (run again to resume)")
            self.r.setdefault("not_run", []).append(name)
            self.save()
            return False
        self.r["steps"][name] = res
        if "not_run" in self.r and name in self.r["not_run"]:
            self.r["not_run"].remove(name)
        log(f"done {name}: {json.dumps(res)[:600]}")
        self.save()
        return True

    # ---- steps
    def make_ckpt(self) -> dict:
        if self.ckpt.exists():
            shutil.rmtree(self.ckpt)
        over = dict(TINY) if self.a.tiny else {}
        cmd = [sys.executable, "-c", MAKE_CKPT, str(PRESET), str(self.ckpt), json.dumps(over)]
        m = run_measured(cmd, self.logs / "ckpt.log", self.left(), self.env)
        if m["rc"] != 0:
            raise RuntimeError("checkpoint failed: " + tail(self.logs / "ckpt.log"))
        info = json.loads((self.logs / "ckpt.log").read_text().strip().splitlines()[-1])
        return {**m, **info, "overrides": over, "bytes": dir_bytes(self.ckpt)}

    def export(self, who: str, ep: str, rep: int) -> dict:
        pkg = self.work / f"{who}-int4-{ep}"
        if pkg.exists():
            shutil.rmtree(pkg)
        if who == "ours":
            # the Python API: the CLI needs the typer version pinned in pyproject (the GPU image's failed)
            cmd = [sys.executable, "-c", "import sys, phi3_onnx; phi3_onnx.export(sys.argv[1], sys.argv[2], sys.argv[3], force=True)",
                   str(self.ckpt), f"int4-{ep}", str(pkg)]
        else:
            cache = self.work / f"builder-cache-{ep}"
            shutil.rmtree(cache, ignore_errors=True)
            # no enable_cuda_graph=1: with shared embeddings the builder's graph has control-flow nodes and
            # genai 0.18 refuses graph capture for it ("This session cannot use the graph capture feature ...")
            extra = ["shared_embeddings=true"]
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(self.ckpt), "-o", str(pkg),
                   "-p", "int4", "-e", ep, "-c", str(cache), "--extra_options", *extra]
        lp = self.logs / f"export-{who}-{ep}-{rep}.log"
        m = run_measured(cmd, lp, self.left(), self.env)
        m["cmd"] = (f'phi3_onnx.export("{self.ckpt}", "int4-{ep}", "{pkg}", force=True)' if who == "ours"
                    else " ".join(["python"] + cmd[1:]))
        if m["rc"] != 0:
            m["error_tail"] = tail(lp)
            return m
        m["package_bytes"] = dir_bytes(pkg)
        data = pkg / "model.onnx.data"
        m["data_bytes"] = data.stat().st_size if data.exists() else 0
        m["files"] = sorted(f.name for f in pkg.iterdir())
        try:
            m["graph"] = graph_facts(pkg)
        except Exception as e:  # noqa: BLE001
            m["graph"] = f"unreadable: {e}"
        set_threads(pkg, self.a.threads)
        return m

    def decode(self, who: str, ep: str, rep: int) -> dict:
        pkg = self.work / f"{who}-int4-{ep}"
        if not (pkg / "genai_config.json").exists():
            return {"error": f"no package {pkg.name}"}
        lp = self.logs / f"decode-{who}-{ep}-{rep}.log"
        cmd = [sys.executable, "-c", DECODE, str(pkg), str(self.a.prompt), str(self.a.new), "1" if ep == "cuda" else "0"]
        m = run_measured(cmd, lp, min(self.left(), 300), self.env)
        text = lp.read_text()
        res = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        if m["rc"] != 0 or not res:
            return {**m, "error_tail": tail(lp)}
        return {**m, **res[0]}

    def run(self) -> None:
        self.r["versions"] = versions()
        self.r["config"] = {"tiny": self.a.tiny, "prompt": self.a.prompt, "new": self.a.new, "threads": self.a.threads,
                            "preset": str(PRESET.relative_to(REPO))}
        self.save()
        full = not self.a.tiny
        if not self.step("ckpt", 200 if full else 10, self.make_ckpt):
            return
        if "error" in self.r["steps"]["ckpt"]:
            return
        sides = ["ours"] + ([] if self.a.no_builder else ["builder"])
        eps = ["cpu"] + ([] if self.a.no_cuda else ["cuda"])
        est_export = {"ours": 120 if full else 5, "builder": 260 if full else 10}
        est_dec = 60 if full else 5
        plan = []
        for ep in eps:
            plan += [(f"export-{w}-{ep}-0", est_export[w], self.export, (w, ep, 0)) for w in sides]
            for rep in range(self.a.rounds):
                plan += [(f"decode-{w}-{ep}-{rep}", est_dec, self.decode, (w, ep, rep)) for w in sides]
        for rep in range(1, self.a.export_reps):  # extra export reps last (timing/RSS spread), A B alternating
            for ep in eps:
                plan += [(f"export-{w}-{ep}-{rep}", est_export[w], self.export, (w, ep, rep)) for w in sides]
        for name, est, fn, fa in plan:
            if not self.step(name, est, lambda fn=fn, fa=fa: fn(*fa)):
                return
        log("all steps done")


def tail(p: Path, n: int = 25) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def summarize(r: dict) -> dict:
    s = r.get("steps", {})
    out: dict = {}
    for key in sorted(k for k in s if k.startswith(("export-", "decode-"))):
        kind, who, ep, _ = key.split("-")
        out.setdefault((who, ep), {"export": [], "decode": []})[kind].append(s[key])
    table = {}
    for (who, ep), v in out.items():
        ok_e = [e for e in v["export"] if e.get("rc") == 0]
        ok_d = [d for d in v["decode"] if "decode_tok_s" in d]
        med = lambda xs: round(statistics.median(xs), 3) if xs else None
        table[f"{who}-{ep}"] = {
            "package_bytes": ok_e[0]["package_bytes"] if ok_e else None,
            "data_bytes": ok_e[0]["data_bytes"] if ok_e else None,
            "export_s": med([e["wall_s"] for e in ok_e]),
            "export_maxrss_gib": max((e["maxrss_gib"] for e in ok_e), default=None),
            "export_tree_peak_gib": max((e["tree_peak_rss_gib"] for e in ok_e), default=None),
            "load_rss_gib": med([d["load_rss_gib"] for d in ok_d]),
            "run_peak_rss_gib": med([d["peak_rss_gib"] for d in ok_d]),
            "load_s": med([d["load_s"] for d in ok_d]),
            "first_token_ms": med([d["first_token_ms"] for d in ok_d]),
            "decode_tok_s": med([d["decode_tok_s"] for d in ok_d]),
            "decode_reps": [round(d["decode_tok_s"], 2) for d in ok_d],
            "gpu_mem_mib": med([d["gpu_mem_mib"] for d in ok_d if d.get("gpu_mem_mib") is not None]),
            "export_reps": len(ok_e), "errors": [e.get("error_tail") or e.get("error") for e in v["export"] + v["decode"]
                                                 if e.get("rc", 0) != 0 or "error" in e][:2],
        }
    return table


def render(r: dict) -> str:
    t = summarize(r)
    r["summary"] = t
    v = r.get("versions", {})
    gb = lambda x: "—" if x is None else f"{x / 1e9:.3f} GB"
    f = lambda x, fmt="{:.2f}": "—" if x is None else fmt.format(x)
    lines = [f"# Phi-4-mini int4: phi3-onnx vs onnxruntime-genai model builder ({'TINY config' if r.get('config', {}).get('tiny') else 'full size'})",
             "", (f"Machine: {v.get('cpus')} CPUs, GPU {v.get('gpu')}; onnxruntime {v.get('onnxruntime')}, "
                  f"onnxruntime-genai {v.get('onnxruntime_genai')}, onnx-ir {v.get('onnx_ir')}, torch {v.get('torch')}, "
                  f"transformers {v.get('transformers')}."), ""]
    ck = r.get("steps", {}).get("ckpt", {})
    if ck:
        lines += [f"Checkpoint: {ck.get('params')} parameters, {gb(ck.get('bytes'))} safetensors (random bf16, tied embeddings).", ""]
    c = r.get("config", {})
    lines += [("| package | package bytes | model.onnx.data | export s | export peak RSS (process tree, polled / ru_maxrss) | load RSS | load s | "
               f"first token ({c.get('prompt')} tok prompt) | decode tok/s ({c.get('new')} new) median [reps] | GPU mem |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k, row in t.items():
        lines.append(f"| {k} | {gb(row['package_bytes'])} | {gb(row['data_bytes'])} | {f(row['export_s'], '{:.1f}')} | "
                     f"{f(row['export_tree_peak_gib'])} / {f(row['export_maxrss_gib'])} GiB | {f(row['load_rss_gib'])} GiB | "
                     f"{f(row['load_s'])} | {f(row['first_token_ms'], '{:.1f} ms')} | {f(row['decode_tok_s'])} {row['decode_reps']} | "
                     f"{f(row['gpu_mem_mib'], '{:.0f} MiB')} |")
    errs = [(k, e) for k, row in t.items() for e in row["errors"] if e]
    if errs:
        lines += ["", "Failures:", ""] + [f"- {k}:\n```\n{e[-1500:]}\n```" for k, e in errs]
    if r.get("not_run"):
        lines += ["", "Not run (budget): " + ", ".join(r["not_run"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "phi4cmp")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 256 (script check, not a benchmark)")
    ap.add_argument("--no-builder", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="decode rounds (A B A B)")
    ap.add_argument("--export-reps", type=int, default=1, help="export reps per side (extra reps run last)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--log-tails", type=Path, help="also write the tails of all step logs into this one file")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop (resumably) before a step that would not fit")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    Bench(args).run()


if __name__ == "__main__":
    main()
