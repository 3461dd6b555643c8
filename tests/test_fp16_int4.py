"""fp16 / int4 / DirectML-shaped graphs against the fp32 reference, run on ONNX Runtime's CPU EP.

The CPU EP runs the fp16 graphs through its fp16 kernels where it has them (GroupQueryAttention,
layer norms, MatMulNBits) and inserts fp32 casts around the rest (e.g. fp16 MatMul on x86), so
these tests measure weight rounding + most activation rounding, not a GPU's exact numerics (the
GPU run is benchmarks/gpu_bench.sh). Each drift test prints top-1 agreement and KL.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from phi3_onnx import export
from helpers import ASSETS
from phi3_onnx.manifest import read_manifest
from phi3_onnx.targets import TARGETS, GraphOptions, Target

PROMPT = 12  # tokens prefilled at once; the rest are decoded one by one
# Bounds from the tiny trained checkpoint, 96 held-out tokens (measured: fp16 top-1 1.000 / KL 1e-6;
# int4-cpu 0.927 / 6.0e-3; int4-cuda 0.927 / 5.7e-3), with headroom.
DRIFT_BOUNDS = {  # target: (min top-1 agreement, max mean KL(fp32 || target))
    "fp16-cuda": (0.98, 1e-4),
    "int4-cpu": (0.85, 0.02),
    "int4-cuda": (0.85, 0.02),
}
DML_LIKE = GraphOptions(packed_qkv=False, rotary_in_attention=False, position_ids_input=True)
ROTARY_NO_POS = GraphOptions(packed_qkv=False, rotary_in_attention=False, position_ids_input=False)


# ----------------------------------------------------------------------------- running a package


def _session(folder: Path) -> tuple[ort.InferenceSession, np.dtype, object]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    manifest = read_manifest(folder)
    return sess, np.dtype(manifest.target.io_dtype), manifest.model


def run_tokens(folder: Path, ids: np.ndarray, prompt: int = PROMPT) -> np.ndarray:
    """Logits [len(ids), vocab] (float32): prefill `prompt` tokens, then decode the rest one by one."""
    sess, dtype, spec = _session(folder)
    names = [i.name for i in sess.get_inputs()]
    past = {n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype) for n in names if n.startswith("past_")}
    out, pos = [], 0
    for chunk in [ids[:prompt], *[ids[i : i + 1] for i in range(prompt, len(ids))]]:
        feeds = {"input_ids": chunk[None].astype(np.int64), "attention_mask": np.ones((1, pos + len(chunk)), np.int64), **past}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(pos, pos + len(chunk), dtype=np.int64)[None]
        logits, *presents = sess.run(None, feeds)
        out.append(logits[0].astype(np.float32))
        past = {n: p for n, p in zip(past, presents)}
        pos += len(chunk)
    return np.concatenate(out)


def run_tokens_padded(folder: Path, ids: np.ndarray, max_len: int, prompt: int = PROMPT) -> np.ndarray:
    """Like run_tokens, the way genai runs under CUDA graphs: past and present share one
    [batch, kv_heads, max_len, head_dim] buffer per layer and the mask is zero-padded to max_len."""
    sess, dtype, spec = _session(folder)
    buffers = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, spec.num_kv_heads, max_len, spec.head_dim), dtype))
               for i in sess.get_inputs() if i.name.startswith("past_")}
    out, pos = [], 0
    for chunk in [ids[:prompt], *[ids[i : i + 1] for i in range(prompt, len(ids))]]:
        mask = np.zeros((1, max_len), np.int64)
        mask[0, : pos + len(chunk)] = 1
        binding = sess.io_binding()
        binding.bind_cpu_input("input_ids", chunk[None].astype(np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")  # first bound output: copy_outputs_to_cpu()[0]
        for name, buf in buffers.items():
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        sess.run_with_iobinding(binding)
        out.append(binding.copy_outputs_to_cpu()[0][0].astype(np.float32))
        pos += len(chunk)
    return np.concatenate(out)


def token_ids(spec, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, spec.vocab_size, size=n).astype(np.int64)


def corpus_ids(folder: Path, n: int) -> np.ndarray:
    """The first n tokens of the held-out corpus (natural text: what drift limits are about)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode((ASSETS / "corpus" / "heldout.txt").read_text(encoding="utf-8")[:20000]).ids
    assert len(ids) >= n
    return np.asarray(ids[:n], dtype=np.int64)


def drift(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || got)) over positions."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), kl


def _variant(name: str, graph: GraphOptions) -> Target:
    return dataclasses.replace(TARGETS["fp32-cpu"], name=name, graph=graph)


@pytest.fixture(scope="module")
def variant_packages(tmp_path_factory, tiny_ckpt: Path, tiny_longrope_ckpt: Path) -> dict[tuple[str, str], Path]:
    """fp32 exports with the DirectML graph shape (and one without position_ids) for both checkpoints."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for ck_name, ck in (("plain", tiny_ckpt), ("longrope", tiny_longrope_ckpt)):
        for name, graph in (("dml-shape", DML_LIKE), ("rotary-no-pos", ROTARY_NO_POS)):
            out[(name, ck_name)] = export(ck, _variant(f"fp32-{name}", graph), root / f"{ck_name}-{name}")
    return out


def _length(folder: Path) -> int:
    """Long enough to cross LongRoPE's original context (and the tiny sliding window where set)."""
    spec = read_manifest(folder).model
    return min(spec.max_position_embeddings, spec.original_max_position_embeddings + 24, 160)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("target", sorted(DRIFT_BOUNDS))
def test_drift_against_fp32(exported, tiny_ckpt: Path, target: str) -> None:
    ref_pkg = exported("fp32-cpu", tiny_ckpt)
    ids = corpus_ids(ref_pkg, 96)
    ref, got = run_tokens(ref_pkg, ids), run_tokens(exported(target, tiny_ckpt), ids)
    top1, kl = drift(ref, got)
    print(f"\n{target}: top-1 agreement {top1:.3f}, mean KL {kl:.2e} over {len(ids)} positions (CPU EP)")
    min_top1, max_kl = DRIFT_BOUNDS[target]
    assert top1 >= min_top1 and kl <= max_kl


@pytest.mark.parametrize("ckpt_name", ["plain", "longrope"])
@pytest.mark.parametrize("variant", ["dml-shape", "rotary-no-pos"])
def test_separate_rotary_graph_equals_packed(exported, variant_packages, tiny_ckpt, tiny_longrope_ckpt, ckpt_name, variant) -> None:
    """q/k/v MatMuls + RotaryEmbedding (+ position_ids input) == packed QKV + GQA rotary, at fp32."""
    import onnx

    ckpt = tiny_longrope_ckpt if ckpt_name == "longrope" else tiny_ckpt
    packed = exported("fp32-cpu", ckpt)
    graph = onnx.load(str(variant_packages[(variant, ckpt_name)] / "model.onnx"), load_external_data=False).graph
    assert "RotaryEmbedding" in {n.op_type for n in graph.node} and "q_proj" in " ".join(n.name for n in graph.node)
    ids = token_ids(read_manifest(packed).model, _length(packed), seed=1)
    ref, got = run_tokens(packed, ids), run_tokens(variant_packages[(variant, ckpt_name)], ids)
    err = float(np.abs(ref - got).max())
    print(f"\n{variant} vs packed ({ckpt_name}, {len(ids)} tokens): max |dlogit| {err:.2e}")
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["fp32-cpu", "int4-cuda"])
def test_longrope_with_padded_mask_and_shared_buffer(exported, tiny_longrope_ckpt: Path, target: str) -> None:
    """genai under CUDA graphs pads the mask to max_length: the LongRoPE switch still follows the
    real length (mask sum), so logits match the unpadded run step for step, across the switch."""
    pkg = exported(target, tiny_longrope_ckpt)
    spec = read_manifest(pkg).model
    ids = token_ids(spec, _length(pkg), seed=2)
    assert len(ids) > spec.original_max_position_embeddings
    plain, padded = run_tokens(pkg, ids), run_tokens_padded(pkg, ids, max_len=spec.max_position_embeddings)
    tol = 1e-4 if target == "fp32-cpu" else 2e-2
    np.testing.assert_allclose(padded, plain, atol=tol, rtol=tol)


def test_dml_target_runs_on_cpu_close_to_its_cuda_twin(exported, tiny_ckpt: Path) -> None:
    """int4-awq-dml's graph (fp16, block 128, separate rotary) runs on the CPU EP; structure-only
    weights (plain checkpoint) so it is compared with the same recipe in the packed CUDA shape."""
    from phi3_onnx.checkpoint import SafetensorsCheckpoint

    dml = TARGETS["int4-awq-dml"]
    twin = dataclasses.replace(TARGETS["int4-cuda"], name="int4-cuda-b128", quant=dml.quant)
    weights = SafetensorsCheckpoint(tiny_ckpt)
    dml_pkg = exported("int4-awq-dml", tiny_ckpt, weights=weights)
    twin_pkg = export(tiny_ckpt, twin, dml_pkg.parent / "int4-cuda-b128-twin", force=True, weights=weights)
    ids = token_ids(read_manifest(dml_pkg).model, 48, seed=3)
    top1, kl = drift(run_tokens(twin_pkg, ids), run_tokens(dml_pkg, ids))
    print(f"\nint4-awq-dml graph vs packed twin: top-1 {top1:.3f}, KL {kl:.2e}")
    assert top1 >= 0.95 and kl <= 1e-3
