"""GPU-side checks for benchmarks/gpu_bench.sh (onnxruntime-gpu + onnxruntime-genai-cuda).

usage:
  gpu_checks.py long MODEL PROMPT MAX_LEN [graph|nograph] [SAVE.npy]   long prompt, decode to MAX_LEN
  gpu_checks.py longrope WORK                LongRoPE switch under CUDA graphs (padded mask)
  gpu_checks.py dml WORK                     int4-awq-dml graph on the CUDA EP vs the CPU EP
  gpu_checks.py window WORK                  sliding window (tiny, window 100) under CUDA graphs vs the CPU EP
  gpu_checks.py cross MODEL PROMPT MAX_LEN    phi3_onnx.runtime greedy from PROMPT to MAX_LEN: step times before / at / after the window move
  gpu_checks.py dual WORK                    the runtime's window-free -> windowed move (tiny, window 100), CUDA graphs on
  gpu_checks.py runtime WORK                 phi3_onnx.runtime.load on this machine: EP choice, bundle variant, text
  gpu_checks.py awq WORK                     int4-awq-cuda export (AWQ on the GPU) + `phi3-onnx eval` on the CUDA EP
  gpu_checks.py profile MODEL PROMPT NEW     per-op-type GPU time (ORT profiling, CUDA graph off)
Every subcommand prints one `RESULT {json}` line that gpu_bench.sh collects.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "src"))  # PYTHONPATH (e.g. a snapshot) wins
sys.path.append(str(ROOT / "tests"))  # helpers: the tiny trained checkpoint and its variants


def result(**kv) -> None:
    print("RESULT " + json.dumps(kv), flush=True)


def variant_dir(model: Path, dest: Path, session_updates: dict, provider_options: list | None = None) -> Path:
    """A folder of symlinks to `model` with an edited genai_config.json (no 2 GB copies)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "genai_config.json" and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    cfg = json.loads((model / "genai_config.json").read_text())
    session = cfg["model"]["decoder"].setdefault("session_options", {})
    session.update(session_updates)
    if provider_options is not None:
        session["provider_options"] = provider_options
    (dest / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    return dest


def graph_off(model: Path) -> Path:
    return variant_dir(model, Path("/tmp/variants") / (model.name + "-nograph"), {}, [{"cuda": {"enable_cuda_graph": "0"}}])


def generate(model_dir: Path, ids: np.ndarray, max_len: int, model=None) -> tuple[np.ndarray, float, float]:
    """Greedy to max_len (min_length = max_length); returns all tokens, prefill s, decode tok/s."""
    import onnxruntime_genai as og

    model = model or og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_len, min_length=max_len, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids.astype(np.int32))
    prefill = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    rate = n / (time.perf_counter() - t1)
    return np.array(gen.get_sequence(0)), prefill, rate


def cmd_long(model: str, prompt: str, max_len: str, mode: str = "graph", save: str = "") -> None:
    path = Path(model) if mode == "graph" else graph_off(Path(model))
    ids = np.random.default_rng(1).integers(100, 30000, size=int(prompt))
    try:
        seq, prefill, rate = generate(path, ids, int(max_len))
        finite = True
        if save:
            np.save(save, seq)
        result(check="long", model=Path(model).name, graph=mode, prompt=int(prompt), max_length=int(max_len),
               ok=len(seq) == int(max_len) and finite, tokens=len(seq), prefill_ms=round(prefill * 1000, 1),
               decode_tok_s=round(rate, 1))
    except Exception as exc:  # the builder's graph is expected to fail here past its window
        result(check="long", model=Path(model).name, graph=mode, prompt=int(prompt), max_length=int(max_len),
               ok=False, error=str(exc).splitlines()[0][:300])


def cmd_cross(model: str, prompt: str, max_len: str) -> None:
    """A full-size package through phi3_onnx.runtime across the sliding window: decode tok/s on the
    window-free decoder, the one step that moves to the windowed decoder (a re-prefill), tok/s after."""
    from phi3_onnx.runtime import load

    m = load(model, max_length=int(max_len))
    ids = np.random.default_rng(1).integers(100, min(30000, m.manifest.model.vocab_size), size=int(prompt)).tolist()
    new = int(max_len) - len(ids)
    decoder = m.new_decoder(m.options(max_new_tokens=new, min_new_tokens=new), len(ids))
    decoder.append(ids)
    times, moved_at = [], None
    for i in range(new):
        t = time.perf_counter()
        decoder.next_token()
        times.append(time.perf_counter() - t)
        if moved_at is None and decoder.windowed:
            moved_at = i
    if moved_at is None:
        result(check="cross", model=Path(model).name, ok=False, error="never moved to the windowed decoder")
        return
    before, after = times[1:moved_at], times[moved_at + 1:]
    result(check="cross", model=Path(model).name, ok=len(decoder) == int(max_len), tokens=len(decoder),
           moved_at_length=len(ids) + moved_at + 1, move_step_ms=round(times[moved_at] * 1000, 1),
           tok_s_window_free=round(len(before) / sum(before), 1), tok_s_windowed=round(len(after) / sum(after), 1),
           rebuilds=decoder.rebuilds)


def tiny_longrope_ckpt(work: Path) -> Path:
    """The tiny trained checkpoint's LongRoPE variant if committed, else a random tiny LongRoPE Phi-3."""
    from helpers import TINY_PHI3, longrope_overrides, make_variant

    dst = work / "tiny-longrope"
    if (TINY_PHI3 / "config.json").is_file():
        return make_variant(TINY_PHI3, dst, **longrope_overrides())
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    rope = longrope_overrides()
    cfg = Phi3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=rope["max_position_embeddings"],
                     original_max_position_embeddings=rope["original_max_position_embeddings"],
                     rope_scaling=rope["rope_scaling"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    Phi3ForCausalLM(cfg).save_pretrained(dst)
    return dst


def cpu_teacher_forced_argmax(pkg: Path, seq: np.ndarray, prompt: int) -> np.ndarray:
    """Greedy choices of the CPU EP run of `pkg` fed `seq` (what the GPU generated)."""
    return run_session(pkg, seq, "CPUExecutionProvider", prompt).argmax(-1)


def cmd_longrope(work: str) -> None:
    """Prompt shorter than the original context, decode well past it, CUDA graph on vs off, and vs the CPU EP.

    genai captures the graph at an early decode step (short factors); if the LongRoPE choice were
    frozen into the capture, tokens after the switch would differ from the graph-off run and the CPU run.
    """
    from phi3_onnx import export
    from phi3_onnx.manifest import read_manifest

    work_p = Path(work)
    ckpt = tiny_longrope_ckpt(work_p)
    for target in ("fp16-cuda", "int4-cuda"):
        pkg = export(ckpt, target, work_p / f"lr-{target}", force=True, max_length=512)
        orig = read_manifest(pkg).model.original_max_position_embeddings
        ids = np.random.default_rng(0).integers(3, 500, size=16)
        on, _, _ = generate(pkg, ids, 256)
        off, _, _ = generate(graph_off(pkg), ids, 256)
        same = int((on == off).all())
        agree = cpu_teacher_forced_argmax(pkg, on[:-1], 16)[15:] == on[16:]
        result(check="longrope", target=target, original_context=orig, generated=len(on), graph_equals_nograph=bool(same),
               first_diff=int(np.argmax(on != off)) if not same else None,
               cpu_agree_before_switch=float(agree[: orig - 16].mean()), cpu_agree_after_switch=float(agree[orig - 16 :].mean()))


def cmd_dml(work: str) -> None:
    """The DirectML-shaped graph (separate q/k/v, RotaryEmbedding, position_ids) on the CUDA EP vs the CPU EP."""
    from phi3_onnx import export
    from phi3_onnx.checkpoint import SafetensorsCheckpoint
    from phi3_onnx.manifest import read_manifest

    ckpt = tiny_longrope_ckpt(Path(work))
    pkg = export(ckpt, "int4-awq-dml", Path(work) / "dml", force=True, weights=SafetensorsCheckpoint(ckpt))
    spec = read_manifest(pkg).model
    ids = np.random.default_rng(3).integers(3, 500, size=spec.original_max_position_embeddings + 32)
    logits = {}
    for ep in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        logits[ep] = run_session(pkg, ids, ep)
    a, b = logits["CUDAExecutionProvider"], logits["CPUExecutionProvider"]
    result(check="dml-graph-on-cuda", tokens=len(ids), top1_agree=float((a.argmax(-1) == b.argmax(-1)).mean()),
           max_abs_diff=float(np.abs(a - b).max()), logit_scale=float(np.abs(b).max()))


def cmd_window(work: str) -> None:
    """Trained tiny weights with a 100-token window: greedy on the CUDA EP (CUDA graph on) far past the
    window, then the CPU EP teacher-forced on the same tokens. Disagreement once the window slides
    would mean the CUDA decode kernel applies the window differently from the CPU one."""
    from phi3_onnx import export

    from helpers import TINY_PHI3, make_variant

    ckpt = make_variant(TINY_PHI3, Path(work) / "tiny-sw100", sliding_window=100)
    prompt = np.random.default_rng(5).integers(3, 2000, size=16)
    for target in ("fp16-cuda", "int4-cuda"):
        pkg = export(ckpt, target, Path(work) / f"sw-{target}", force=True, max_length=512)
        seq, _, _ = generate(pkg, prompt, 480)
        agree = cpu_teacher_forced_argmax(pkg, seq[:-1], 16)[15:] == seq[16:]
        result(check="window", target=target, window=100, generated=len(seq),
               cpu_agree_inside_window=float(agree[: 100 - 16].mean()), cpu_agree_past_window=float(agree[100 - 16 :].mean()))


def cmd_dual(work: str) -> None:
    """The window-free decoder copy (package.window_free) on the CUDA EP: phi3_onnx.runtime greedy from a
    16-token prompt to 480 tokens (CUDA graphs on; it moves to the windowed decoder before token 101), then
    the CPU EP teacher-forced on the windowed graph over the same tokens, as `window` does for one graph."""
    from phi3_onnx import export
    from phi3_onnx.runtime import load

    from helpers import TINY_PHI3, make_variant

    ckpt = make_variant(TINY_PHI3, Path(work) / "tiny-sw100", sliding_window=100)
    prompt = np.random.default_rng(5).integers(3, 2000, size=16)
    for target in ("fp16-cuda", "int4-cuda"):
        pkg = export(ckpt, target, Path(work) / f"dual-{target}", force=True, max_length=512)
        model = load(pkg)
        options = model.options(max_new_tokens=464, min_new_tokens=464)
        decoder = model.new_decoder(options, 16)
        got = list(model.token_ids(decoder, prompt.tolist(), options))
        seq = np.concatenate([prompt, np.array(got)])
        agree = cpu_teacher_forced_argmax(pkg, seq[:-1], 16)[15:] == seq[16:]
        windowed_only, _, _ = generate(pkg, prompt, 480)
        same = seq == windowed_only[: len(seq)]
        result(check="dual", target=target, provider=model.provider, decoder=model.window_free, moved=decoder.windowed,
               rebuilds=decoder.rebuilds, generated=len(seq), cpu_agree_inside_window=float(agree[: 100 - 16].mean()),
               cpu_agree_past_window=float(agree[100 - 16 :].mean()),
               same_as_windowed_only=float(same.mean()), first_difference=int(np.argmax(~same)) if (~same).any() else None)


def cmd_runtime(work: str) -> None:
    """The runtime wrapper on a CUDA machine: `load()` must pick the CUDA EP for a CUDA package and the
    CUDA variant of a bundle; greedy text on CUDA vs the same package forced onto the CPU EP."""
    from phi3_onnx import export
    from phi3_onnx.package.bundle import export_bundle
    from phi3_onnx.runtime import load

    from helpers import TINY_PHI3

    pkg = export(TINY_PHI3, "fp16-cuda", Path(work) / "rt-fp16-cuda", force=True)
    prompt = [{"role": "user", "content": "How do I open a file for reading?"}]
    gpu, cpu = load(pkg), load(pkg, device="cpu")
    text_gpu, text_cpu = gpu.generate(prompt, max_new_tokens=48), cpu.generate(prompt, max_new_tokens=48)
    bundle = export_bundle(TINY_PHI3, ["int4-cpu", "int4-cuda"], Path(work) / "rt-bundle", force=True)
    chosen = load(bundle)
    result(check="runtime", auto_provider=gpu.provider, forced_provider=cpu.provider, same_text_cuda_vs_cpu=text_gpu == text_cpu,
           text_cuda=text_gpu[:120], bundle_variant=chosen.variant, bundle_provider=chosen.provider,
           bundle_text=chosen.generate(prompt, max_new_tokens=24)[:80])


def cmd_awq(work: str) -> None:
    """AWQ calibration on the GPU (torch sees CUDA), then the drift check on the CUDA EP: exit code + metrics."""
    from phi3_onnx.cli import main

    from helpers import TINY_PHI3

    out, report = Path(work) / "awq-cuda", Path(work) / "awq-eval.json"
    t0 = time.perf_counter()
    code_export = main(["export", "-m", str(TINY_PHI3), "-t", "int4-awq-cuda", "-o", str(out), "--force", "-q"])
    seconds = time.perf_counter() - t0
    code_eval = main(["eval", str(out), "-r", str(TINY_PHI3), "-d", str(ROOT / "tests/assets/corpus/heldout.txt"), "--json", str(report)])
    doc = json.loads(report.read_text()) if report.is_file() else {}
    result(check="awq-cuda", export_exit=code_export, export_s=round(seconds, 1), eval_exit=code_eval,
           variants=[{"name": v["name"], "ep": v["ep"], "status": v["status"], **v.get("metrics", {})} for v in doc.get("variants", [])])


def run_session(pkg: Path, ids: np.ndarray, provider: str, prompt: int = 12) -> np.ndarray:
    import onnxruntime as ort

    from phi3_onnx.manifest import read_manifest

    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=[provider])
    spec, dtype = read_manifest(pkg).model, np.float16
    names = [i.name for i in sess.get_inputs()]
    past = {n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype) for n in names if n.startswith("past_")}
    out, pos = [], 0
    for chunk in [ids[:prompt], *[ids[i : i + 1] for i in range(prompt, len(ids))]]:
        feeds = {"input_ids": chunk[None].astype(np.int64), "attention_mask": np.ones((1, pos + len(chunk)), np.int64),
                 "position_ids": np.arange(pos, pos + len(chunk), dtype=np.int64)[None], **past}
        logits, *presents = sess.run(None, {k: v for k, v in feeds.items() if k in names})
        out.append(logits[0].astype(np.float32))
        past = dict(zip(past, presents))
        pos += len(chunk)
    return np.concatenate(out)


def cmd_profile(model: str, prompt: str, new: str) -> None:
    """GPU time per CUDA kernel over a greedy run with CUDA graph on (torch.profiler/CUPTI sees every
    kernel in the process, ORT's included; ORT's own profiler would time only host-side launches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    ids = np.random.default_rng(2).integers(100, 30000, size=int(prompt))
    import onnxruntime_genai as og

    torch.cuda.init()
    loaded = og.Model(model)
    generate(Path(model), ids, int(prompt) + int(new), loaded)  # warm-up (graph capture)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        generate(Path(model), ids, int(prompt) + int(new), loaded)
        wall = time.perf_counter() - t0
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            slot = per_kernel[e.name[:70]]
            slot[0] += e.time_range.elapsed_us()
            slot[1] += 1
    total = sum(v[0] for v in per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:14]
    result(check="profile", model=Path(model).name, new_tokens=int(new), wall_ms=round(wall * 1000, 1),
           gpu_kernel_ms=round(total / 1000, 1), kernels_per_token=round(sum(v[1] for v in per_kernel.values()) / int(new), 1),
           top_us_per_token={k: round(v[0] / int(new), 1) for k, v in top})


if __name__ == "__main__":
    commands = {"long": cmd_long, "longrope": cmd_longrope, "dml": cmd_dml, "window": cmd_window, "dual": cmd_dual, "cross": cmd_cross, "runtime": cmd_runtime, "awq": cmd_awq, "profile": cmd_profile}
    commands[sys.argv[1]](*sys.argv[2:])
