"""Phi-4-mini's architecture (issue 12): partial rotary, tied embeddings, LongRoPE on the rotary dims.

A tiny random-weight Phi3ForCausalLM of that shape (tests/helpers.phi4_mini_like) against transformers:
fp32 logits over 512 tokens with an empty past and token by token past the original context; genai
greedy == transformers greedy; int4 with one shared table for the embedding Gather and the lm_head
MatMulNBits, checked against transformers running the dequantized int4 weights; the DirectML graph
(separate RotaryEmbedding with rotary_embedding_dim) on the CPU EP; AWQ's PyTorch layer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from helpers import genai_greedy, make_random_phi3, phi4_mini_like
from phi3_onnx import export
from phi3_onnx.checkpoint import SafetensorsCheckpoint, spec_from_folder
from phi3_onnx.manifest import read_manifest
from phi3_onnx.quantize.rtn import dequantize_int4, quantize_int4
from phi3_onnx.targets import TARGETS
from test_export import _assert_close, _check_cached_decode, _check_prefill, _empty_past, _ids, _reference, _session


@pytest.fixture(scope="module")
def phi4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_phi3(tmp_path_factory.mktemp("phi4") / "tiny-phi4-mini", **phi4_mini_like())


@pytest.fixture(scope="module")
def phi4_model(phi4_ckpt: Path):
    return _reference(phi4_ckpt)


def test_spec_reads_partial_rotary_and_tying(phi4_ckpt: Path) -> None:
    spec = spec_from_folder(phi4_ckpt)
    assert (spec.head_dim, spec.rotary_dim, spec.tie_word_embeddings) == (64, 48, True)
    assert len(spec.longrope.short_factor) == 24
    assert "lm_head.weight" not in SafetensorsCheckpoint(phi4_ckpt).entries


def test_fp32_matches_transformers_past_the_original_context(exported, phi4_ckpt: Path, phi4_model) -> None:
    pkg = exported("fp32-cpu", phi4_ckpt)
    ids = _ids(512, seed=3)
    _check_prefill(pkg, phi4_model, ids)  # long factors: 512 > 64
    _check_prefill(pkg, phi4_model, ids[:, :48])  # short factors
    _check_cached_decode(pkg, phi4_model, ids[:, :160], prefix=40)  # crosses 64 token by token


def test_tied_fp32_stores_the_table_once(exported, phi4_ckpt: Path) -> None:
    model = onnx.load(str(exported("fp32-cpu", phi4_ckpt) / "model.onnx"), load_external_data=False)
    tables = [i for i in model.graph.initializer if list(i.dims) == [2064, 256] or list(i.dims) == [256, 2064]]
    assert [t.name for t in tables] == ["model.embed_tokens.weight"]
    assert {n.op_type for n in model.graph.node} >= {"Gather", "Gemm"}


_genai_greedy = genai_greedy


def _hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()


def test_genai_greedy_equals_transformers_greedy(exported, phi4_ckpt: Path, phi4_model) -> None:
    """Inside the original context, plain onnxruntime-genai; across it, phi3_onnx.runtime (which, like
    transformers' generate, recomputes the cache once at the LongRoPE switch)."""
    from phi3_onnx.runtime import GenerationOptions, load

    pkg = exported("fp32-cpu", phi4_ckpt)
    prompt = _ids(20, seed=7)[0].tolist()
    assert _genai_greedy(pkg, prompt, 40) == _hf_greedy(phi4_model, prompt, 40)
    model = load(pkg)
    options = GenerationOptions(max_new_tokens=80, min_new_tokens=80)
    decoder = model.new_decoder(options, len(prompt))
    got = list(model.token_ids(decoder, prompt, options))
    assert decoder.rebuilds == 1 and got == _hf_greedy(phi4_model, prompt, 80)


def _dequantized_model(ckpt: Path, block: int):
    """transformers with every linear (and the tied table) replaced by its int4 round trip: what int4 must compute."""
    model = _reference(ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                w = p.numpy()
                n, k = w.shape
                p.copy_(torch.from_numpy(dequantize_int4(quantize_int4(w, block), n, k, block)))
    return model


def test_int4_shared_table_matches_dequantized_reference(exported, phi4_ckpt: Path) -> None:
    """One packed table feeds GatherBlockQuantized and the lm_head MatMulNBits; with fp32 compute
    (accuracy_level 0) the package computes exactly transformers on the dequantized weights."""
    pkg = exported("int4-cpu", phi4_ckpt, accuracy_level=0)
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    embed = [i.name for i in model.graph.initializer if i.name.startswith("model.embed_tokens")]
    assert embed == ["model.embed_tokens.weight_Q4", "model.embed_tokens.weight_scales"]
    gbq = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    head = [n for n in model.graph.node if n.name == "/lm_head/MatMulNBits"]
    assert len(gbq) == 1 and len(head) == 1 and gbq[0].input[0] == head[0].input[1] == "model.embed_tokens.weight_Q4"
    ref_model = _dequantized_model(phi4_ckpt, TARGETS["int4-cpu"].quant.block_size)
    ids = _ids(100, seed=4)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids)).logits.numpy()
    _assert_close(_logits(pkg, ids), ref, "int4-cpu vs dequantized transformers")


def _logits(pkg: Path, ids: np.ndarray) -> np.ndarray:
    sess = _session(pkg)
    dtype = np.float16 if read_manifest(pkg).target.io_dtype == "float16" else np.float32
    past = {k: v.astype(dtype) for k, v in _empty_past(sess).items()}
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **past})[0].astype(np.float32)


def _untied_copy(ckpt: Path, dst: Path) -> Path:
    """The same weights with lm_head stored separately (tie_word_embeddings false)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(ckpt, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text()) | {"tie_word_embeddings": False}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("target", ["int4-cpu", "int4-cuda"])
def test_shared_table_equals_two_identical_int4_tables(exported, phi4_ckpt: Path, tmp_path: Path, target: str) -> None:
    """The tied package computes bit for bit what an untied one does whose separate int4 embedding
    (--quantize-embedding) and int4 lm_head hold the same values, at half the table bytes."""
    untied = _untied_copy(phi4_ckpt, tmp_path / "untied")
    tied_pkg = exported(target, phi4_ckpt)
    two = export(untied, target, tmp_path / "two", quantize_embedding=True)
    ids = _ids(64, seed=8)
    np.testing.assert_array_equal(_logits(tied_pkg, ids), _logits(two, ids))
    size = lambda p: (p / "model.onnx.data").stat().st_size  # noqa: E731
    spec = read_manifest(tied_pkg).model
    packed_table = spec.vocab_size * spec.hidden_size // 2
    assert size(two) - size(tied_pkg) >= packed_table


def test_int4_package_is_smaller_than_an_untied_export(exported, phi4_ckpt: Path) -> None:
    shared = (exported("int4-cpu", phi4_ckpt) / "model.onnx.data").stat().st_size
    spec = read_manifest(exported("int4-cpu", phi4_ckpt)).model
    fp32_table = spec.vocab_size * spec.hidden_size * 4
    assert shared < fp32_table, "the embedding must not be stored in fp32 beside the int4 head"


def test_dml_graph_partial_rotary_on_the_cpu_ep(exported, phi4_ckpt: Path, tmp_path: Path) -> None:
    """The DirectML graph (separate q/k/v, RotaryEmbedding with rotary_embedding_dim, position_ids) computes
    what its CUDA twin (packed qkv, rotary inside GQA) computes from the same int4 weights (block 128, the table 32),
    past the original context, on the CPU EP."""
    plain = SafetensorsCheckpoint(phi4_ckpt)  # RTN weights: the graph is under test, not AWQ
    dml = exported("int4-awq-dml", phi4_ckpt, weights=plain)
    cuda = TARGETS["int4-cuda"]  # at the flagship's blocks: 128, the tied table at int4-cpu's 32
    twin = export(phi4_ckpt, dataclasses.replace(cuda, quant=dataclasses.replace(
        cuda.quant, block_size=128, tied_table_block_size=TARGETS["int4-awq-dml"].quant.tied_table_block_size)), tmp_path / "twin")
    model = onnx.load(str(dml / "model.onnx"), load_external_data=False)
    rot = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert rot and all({a.name: a.i for a in n.attribute}["rotary_embedding_dim"] == 48 for n in rot)
    ids = _ids(120, seed=5)
    sess = _session(dml)
    past = {k: v.astype(np.float16) for k, v in _empty_past(sess).items()}
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(120)[None], **past}
    got, ref = sess.run(["logits"], feed)[0].astype(np.float32), _logits(twin, ids)
    err, agree = np.abs(got - ref).max() / (ref.max() - ref.min()), (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"dml graph vs its CUDA twin: max|Δ|/range {err:.4f}, argmax agreement {agree:.3f}")
    assert err < 5e-3 and agree >= 0.99


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_exports_and_loads(exported, phi4_ckpt: Path, target: str) -> None:
    """Each registered target exports (the staged package loads in genai) and runs a step on the CPU EP."""
    plain = SafetensorsCheckpoint(phi4_ckpt) if TARGETS[target].quant and TARGETS[target].quant.method == "awq" else None
    pkg = exported(target, phi4_ckpt, **({"weights": plain} if plain else {}))
    sess = _session(pkg)
    dtype = np.float16 if TARGETS[target].io_dtype == "float16" else np.float32
    feed = {"input_ids": _ids(5), "attention_mask": np.ones((1, 5), np.int64),
            **{k: v.astype(dtype) for k, v in _empty_past(sess).items()}}
    if TARGETS[target].graph.position_ids_input:
        feed["position_ids"] = np.arange(5)[None]
    logits = sess.run(["logits"], feed)[0]
    assert logits.shape == (1, 5, 2064) and np.isfinite(logits.astype(np.float32)).all()


def test_awq_layer_reproduces_transformers(phi4_ckpt: Path, phi4_model) -> None:
    """AWQ's own PyTorch layer (partial rotary included) gives transformers' hidden states."""
    from phi3_onnx.quantize import torch_phi3 as tp

    spec, ckpt = spec_from_folder(phi4_ckpt), SafetensorsCheckpoint(phi4_ckpt)
    ids = torch.tensor(_ids(48, seed=6))  # inside the original context: short factors
    with torch.inference_mode():
        ref = phi4_model(ids, output_hidden_states=True).hidden_states
        x, rope = ref[0], tp.rotary_for(spec, ids.shape[1], torch.device("cpu"))
        for i in range(spec.num_layers - 1):
            x = tp.layer_forward(spec, tp.load_layer(ckpt, i, torch.device("cpu")), x, rope)
            err = (x - ref[i + 1]).abs().max().item() / ref[i + 1].abs().max().item()
            assert err < 1e-5, f"layer {i}: relative error {err:.2e}"


def test_awq_export_of_a_tied_model(phi4_ckpt: Path, tmp_path: Path) -> None:
    """AWQ calibrates a tied model (no separate head to clip) and its package loads."""
    pkg = export(phi4_ckpt, "int4-awq-cpu", tmp_path / "awq", calibration_samples=2)
    recipe = read_manifest(pkg).recipe["quantization"]
    assert recipe["method"] == "awq" and recipe["calibration"]["samples"] == 2


def test_partial_rotary_needs_an_even_rotary_dim(tmp_path: Path, phi4_ckpt: Path) -> None:
    from phi3_onnx.checkpoint import spec_from_config
    from phi3_onnx.errors import Phi3OnnxError
    import json

    cfg = json.loads((phi4_ckpt / "config.json").read_text())
    with pytest.raises(Phi3OnnxError, match="partial_rotary_factor"):
        spec_from_config(cfg | {"partial_rotary_factor": 0.01, "rope_parameters": dict(cfg["rope_parameters"], partial_rotary_factor=0.01)})
    assert dataclasses.asdict(spec_from_config(cfg))["partial_rotary_factor"] == 0.75


def test_shared_table_with_a_padded_last_block(tmp_path: Path) -> None:
    """hidden 192 at block 128: the shared int4 table's rows are padded to 256 and the embedding
    slices the padding off; fp32-compute logits equal transformers on the dequantized weights."""
    ckpt = make_random_phi3(tmp_path / "p4-192", **phi4_mini_like(hidden_size=192, num_attention_heads=3,
                                                                   num_key_value_heads=1, intermediate_size=352))
    pkg = export(ckpt, "int4-cpu", tmp_path / "pkg", block_size=128, accuracy_level=0)
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    assert any(n.name == "/model/embed_tokens/unpad" for n in model.graph.node)
    ids = _ids(80, seed=9)
    with torch.no_grad():
        ref = _dequantized_model(ckpt, 128)(torch.from_numpy(ids)).logits.numpy()
    _assert_close(_logits(pkg, ids), ref, "padded shared table vs dequantized transformers")
