"""Phi-3.5-MoE on the CUDA EP: fp16-cuda (MoE) and int4-cuda (QMoE) against transformers on the CPU.

Self-contained: builds a tiny random PhimoeForCausalLM (LayerNorm, q/k/v/o + lm_head biases, 4 experts,
sparsemixer top-2, LongRoPE past an original context of 64 with short/long mscales 1.1/1.3), exports
fp16-cuda and int4-cuda, and checks, on the CUDA EP:

  * onnxruntime InferenceSession prefill (48 tokens: short factors; 200 tokens: long factors) against
    transformers fp32 on the CPU (int4: transformers over the dequantized int4 weights, quantized from
    the fp16-cast weights as the fp16 package is), and, for int4, against the same package on the CPU EP;
  * token-by-token decode over the KV cache across the original context (40 -> 120 tokens), against
    the same reference; as info, against this EP's own prefill of the same tokens (is a decode error
    the decode kernels'?) and, for fp16, the same graph with plain-op experts;
  * onnxruntime-genai greedy (CUDA, the package's genai_config), 32 new tokens inside the original
    context, against the same package's greedy through an InferenceSession, and against the reference (info).

Run from a clone (CUDA onnxruntime-gpu + onnxruntime-genai-cuda, torch CPU, transformers 5):

    PYTHONPATH=src python benchmarks/gpu_moe_check.py [--keep DIR]
    PYTHONPATH=src python benchmarks/gpu_moe_check.py --cpu     # the same checks on the CPU EP (smoke run)

Prints one table; exits 1 if any check fails. Limits: 95th percentile over positions of max|d| / logit
range <= 5e-3 and argmax agreement >= 0.97 (an MoE's routing is discontinuous: fp16 may flip a
near-tied expert choice at a few positions; the worst position is printed). genai greedy must equal
the same package's greedy through an InferenceSession on the same EP (the genai_config wiring);
agreement with the reference greedy is printed as info (random weights: near-ties diverge early).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

OK = True
ROWS: list[tuple[str, str, str, str]] = []


def _row(target: str, check: str, value: str, passed: bool) -> None:
    global OK
    OK &= passed
    ROWS.append((target, check, value, "ok" if passed else "FAIL"))


def _published_rotary():
    """transformers 5's Phimoe rotary never uses the long factors; the published model does (see tests/test_phimoe.py)."""
    import test_phimoe

    return test_phimoe._published_rotary()


EP = "CUDAExecutionProvider"


def _session(pkg: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(pkg / "model.onnx"), providers=[EP, "CPUExecutionProvider"])


def _past(sess, dtype) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype) for i in sess.get_inputs() if i.name.startswith("past_key_values")}


def _prefill(sess, ids: np.ndarray) -> np.ndarray:
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), **_past(sess, np.float16)}
    return sess.run(["logits"], feed)[0].astype(np.float32)


def _decode(sess, ids: np.ndarray, prefix: int) -> np.ndarray:
    names = [o.name for o in sess.get_outputs()]
    past, out_rows = _past(sess, np.float16), []
    for a, b in [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]:
        out = sess.run(None, {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64), **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        out_rows.append(out[0][0, -1].astype(np.float32))
    return np.stack(out_rows)


def _ort_greedy(sess, prompt: list[int], new: int) -> list[int]:
    """Greedy with the same package through a plain InferenceSession (the genai check's exact twin)."""
    names = [o.name for o in sess.get_outputs()]
    ids, past, out = np.array([prompt], np.int64), _past(sess, np.float16), []
    step = ids
    for _ in range(new):
        total = ids.shape[1]
        res = sess.run(None, {"input_ids": step, "attention_mask": np.ones((1, total), np.int64), **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], res[1:])}
        nxt = int(res[0][0, -1].astype(np.float32).argmax())
        out.append(nxt)
        step = np.array([[nxt]], np.int64)
        ids = np.concatenate([ids, step], axis=1)
    return out


def _score(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(p95 over positions of max|d|/range, max over positions, argmax agreement). An MoE's routing is
    discontinuous: fp16 activations may flip a near-tied expert choice at a few positions, so the check
    reads the 95th percentile and reports the worst position."""
    got, ref = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    per_pos = np.abs(got - ref).max(-1) / np.ptp(ref)
    return float(np.percentile(per_pos, 95)), float(per_pos.max()), float((got.argmax(-1) == ref.argmax(-1)).mean())


def _ref_decode(model, ids: np.ndarray, prefix: int, pasts: list | None = None) -> np.ndarray:
    """transformers' logits as _decode's rows; `pasts` collects the cache each decode step starts from
    (keys after rotary, as GQA keeps them), in the package's past_key_values layout, fp16."""
    import torch
    from transformers import DynamicCache

    cache, rows = DynamicCache(config=model.config), []
    for a, b in [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]:
        if pasts is not None and a >= prefix:
            pasts.append({f"past_key_values.{i}.{kind}": getattr(layer, kind + "s").numpy().astype(np.float16)
                          for i, layer in enumerate(cache.layers) for kind in ("key", "value")})
        with torch.no_grad():
            rows.append(model(torch.from_numpy(ids[:, a:b]), past_key_values=cache, use_cache=True).logits[0, -1].numpy())
    return np.stack(rows)


def _session_pasts(sess, ids: np.ndarray, prefix: int) -> list[dict[str, np.ndarray]]:
    """The cache each of _decode's steps after the prefix starts from, as this session builds it."""
    names, pasts = [o.name for o in sess.get_outputs()], []
    past = _past(sess, np.float16)
    for a, b in [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1] - 1)]:
        out = sess.run(None, {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64), **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        pasts.append(past)
    return pasts


def _steps_from(sess, ids: np.ndarray, prefix: int, pasts: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Each decode step t = prefix.. run alone from a given cache (teacher-forced past): the step's own
    error, without what an earlier position's routing flip leaves in the cache for every later one."""
    return np.stack([sess.run(["logits"], {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                                           **past})[0][0, -1].astype(np.float32)
                     for t, past in zip(range(prefix, ids.shape[1]), pasts)])


def _routing_margins(model, ids: np.ndarray, prefix: int) -> np.ndarray:
    """Per decode position (as _ref_decode's rows), the smallest distance over layers of the reference's
    router scores from a sparsemixer decision boundary, relative to the layer's largest |score|: the
    top-1/top-2 and top-2/top-3 gaps, and each expert's distance from the 2*eps mask threshold of both
    passes. fp16 activations move the scores by ~1e-3 relative: a smaller margin may flip the routing."""
    eps = 2 * model.config.router_jitter_noise
    per_layer: list[list[float]] = [[] for _ in model.model.layers]

    def hook(index):
        def record(_module, _inputs, output):
            scores = output[0].reshape(-1, output[0].shape[-1])[-1].double()
            top = scores.sort(descending=True).values
            margins = [top[0] - top[1], top[1] - top[2]]
            for m in (top[0], top[1]):
                factor = scores.abs().clamp(min=float(m))
                margins += list(((m - scores) / factor - eps).abs() * factor)
            per_layer[index].append(float(min(margins) / scores.abs().max()))
        return record

    handles = [layer.mlp.router.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        _ref_decode(model, ids, prefix)
    finally:
        for h in handles:
            h.remove()
    return np.min(np.array(per_layer), axis=0)


def _genai_greedy(pkg: Path, prompt: list[int], new: int) -> list[int]:
    from helpers import genai_greedy

    # --cpu smoke run: the package names cuda
    return genai_greedy(pkg, prompt, new, (lambda config: config.clear_providers()) if EP == "CPUExecutionProvider" else None)


def main() -> int:
    import onnx
    import onnxruntime as ort
    import torch
    from helpers import make_random_phimoe, phimoe_longrope
    from test_phimoe import _dequantized_model, _reference

    from phi3_onnx import export
    from phi3_onnx.targets import TARGETS

    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="write the checkpoint and packages here (default: a temp folder)")
    parser.add_argument("--cpu", action="store_true", help="smoke-run the same checks on the CPU EP (no GPU needed)")
    args = parser.parse_args()
    global EP
    if args.cpu:
        EP = "CPUExecutionProvider"
    elif "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"CUDAExecutionProvider not available (onnxruntime {ort.__version__}: {ort.get_available_providers()})")
        return 1
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu-moe-"))
    shutil.rmtree(work, ignore_errors=True)
    ckpt = make_random_phimoe(work / "tiny-phimoe", seed=1, **phimoe_longrope())
    rng = np.random.default_rng(0)
    long_ids = rng.integers(3, 2048, size=(1, 200)).astype(np.int64)
    prompt = rng.integers(3, 2048, size=20).tolist()
    limits = {"fp16-cuda": (5e-3, 0.97), "int4-cuda": (5e-3, 0.97)}
    with _published_rotary():
        for target in ("fp16-cuda", "int4-cuda"):
            pkg = export(ckpt, target, work / target)
            ops = {n.op_type for n in onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph.node}
            want = "MoE" if target == "fp16-cuda" else "QMoE"
            _row(target, "expert op", want, want in ops and not {"If", "Loop"} & ops)
            quant = TARGETS[target].quant
            # an fp16 package quantizes the fp16-cast weights: the reference round-trips those
            ref_model = _reference(ckpt) if quant is None else _dequantized_model(ckpt, quant.block_size, "float16")
            ref_name = "transformers fp32" if quant is None else "dequantized transformers fp32"
            sess = _session(pkg)
            _row(target, "session EP", sess.get_providers()[0], sess.get_providers()[0] == EP)
            tol, agree_min = limits[target]
            cpu = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
            for n in (48, 200):
                ids = long_ids[:, :n]
                with torch.no_grad():
                    ref = ref_model(torch.from_numpy(ids)).logits.numpy()
                got = _prefill(sess, ids)
                p95, worst, agree = _score(got, ref)
                _row(target, f"prefill {n} vs {ref_name}: p95 / worst max|d|/range, argmax",
                     f"{p95:.2e} / {worst:.2e}, {agree:.3f}", p95 <= tol and agree >= agree_min)
                if quant is not None:
                    p95, worst, agree = _score(got, _prefill(cpu, ids))
                    _row(target, f"prefill {n} vs the same package on the CPU EP: p95 / worst, argmax",
                         f"{p95:.2e} / {worst:.2e}, {agree:.3f}", p95 <= tol and agree >= agree_min)
            pasts: list = []
            want = _ref_decode(ref_model, long_ids[:, :120], 40, pasts)
            p95, worst, agree = _score(_steps_from(sess, long_ids[:, :120], 40, pasts), want[1:])
            _row(target, f"decode 40->120, each step from {ref_name}'s cache: p95 / worst, argmax",
                 f"{p95:.2e} / {worst:.2e}, {agree:.3f}", p95 <= tol and agree >= agree_min)
            # free-running over its own cache: a routing flip at a near-tied position changes that position's
            # hidden state, so its K/V, which every later step attends to (info, with where it crossed the limit)
            got = _decode(sess, long_ids[:, :120], 40)
            p95, worst, agree = _score(got, want)
            ROWS.append((target, f"decode 40->120 over its own cache vs {ref_name}: p95 / worst, argmax",
                         f"{p95:.2e} / {worst:.2e}, {agree:.3f}", "info"))
            margin = _routing_margins(ref_model, long_ids[:, :120], 40)
            bad = np.flatnonzero(np.abs(got - want).max(-1) / np.ptp(want) > tol)
            ROWS.append((target, "  positions over the limit there (position:routing margin) / median margin",
                         f"{len(bad)}: " + " ".join(f"{39 + i}:{margin[i]:.0e}" for i in bad[:8]) + f" / {np.median(margin):.0e}", "info"))
            # where a decode error comes from: this EP's own prefill of the same tokens, inside the original context
            # (LongRoPE picks the factors from the whole length, so a 120-token prefill would use the long ones throughout)
            p95, worst, agree = _score(got[:21], _prefill(sess, long_ids[:, :60])[0, 39:])
            ROWS.append((target, "decode 40->60 vs this EP's prefill of the same 60 tokens", f"{p95:.2e} / {worst:.2e}, {agree:.3f}", "info"))
            if target == "fp16-cuda":  # the same graph with plain-op experts (DirectML's form) on this EP
                plain = dataclasses.replace(TARGETS[target], graph=dataclasses.replace(TARGETS[target].graph, moe_op=False))
                plain_sess = _session(export(ckpt, plain, work / f"{target}-plain-experts"))
                p95, worst, agree = _score(_steps_from(plain_sess, long_ids[:, :120], 40, pasts), want[1:])
                _row(target, f"plain-op experts: decode 40->120, each step from {ref_name}'s cache",
                     f"{p95:.2e} / {worst:.2e}, {agree:.3f}", p95 <= tol and agree >= agree_min)
            og_ids, ort_ids = _genai_greedy(pkg, prompt, 32), _ort_greedy(sess, prompt, 32)
            _row(target, "genai greedy == InferenceSession greedy", f"{sum(a == b for a, b in zip(og_ids, ort_ids))}/32", og_ids == ort_ids)
            with torch.no_grad():
                hf = ref_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 20:].tolist()
            same = next((i for i, (a, b) in enumerate(zip(og_ids, hf)) if a != b), len(hf))
            ROWS.append((target, f"genai greedy == {ref_name} (tokens before the first diff)", f"{same}/32", "info"))
        # the flagship on the MoE: AWQ-scaled QMoE at block 128 (its exactness against transformers on the
        # scaled weights is tests/test_phimoe.py's, CPU EP); here the CUDA kernels against the CPU EP's
        target = "int4-awq-cuda"
        pkg = export(ckpt, target, work / target)
        ops = {n.op_type for n in onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph.node}
        _row(target, "expert op, block size", f"QMoE, {TARGETS[target].quant.block_size}", "QMoE" in ops)
        sess, cpu = _session(pkg), ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
        tol, agree_min = limits["int4-cuda"]
        for n in (48, 200):
            p95, worst, agree = _score(_prefill(sess, long_ids[:, :n]), _prefill(cpu, long_ids[:, :n]))
            _row(target, f"prefill {n} vs the same package on the CPU EP: p95 / worst, argmax",
                 f"{p95:.2e} / {worst:.2e}, {agree:.3f}", p95 <= tol and agree >= agree_min)
        cpu_pasts = _session_pasts(cpu, long_ids[:, :120], 40)
        p95, worst, agree = _score(_steps_from(sess, long_ids[:, :120], 40, cpu_pasts), _steps_from(cpu, long_ids[:, :120], 40, cpu_pasts))
        _row(target, "decode 40->120, each step from the CPU EP's cache, vs the CPU EP: p95 / worst, argmax",
             f"{p95:.2e} / {worst:.2e}, {agree:.3f}", p95 <= tol and agree >= agree_min)
        p95, worst, agree = _score(_decode(sess, long_ids[:, :120], 40), _decode(cpu, long_ids[:, :120], 40))
        ROWS.append((target, "decode 40->120 over each EP's own cache: p95 / worst, argmax", f"{p95:.2e} / {worst:.2e}, {agree:.3f}", "info"))
        og_ids, ort_ids = _genai_greedy(pkg, prompt, 32), _ort_greedy(sess, prompt, 32)
        _row(target, "genai greedy == InferenceSession greedy", f"{sum(a == b for a, b in zip(og_ids, ort_ids))}/32", og_ids == ort_ids)
    width = [max(len(r[i]) for r in ROWS + [("target", "check", "value", "result")]) for i in range(4)]
    for r in [("target", "check", "value", "result"), *ROWS]:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print(f"onnxruntime {ort.__version__}; packages in {work}")
    return 0 if OK else 1


if __name__ == "__main__":
    sys.exit(main())
