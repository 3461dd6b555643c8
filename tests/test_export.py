"""Exporter vs PyTorch transformers (the reference), int4 structure, genai generation, determinism, memory."""

from __future__ import annotations

import hashlib
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache, Phi3ForCausalLM

from phi3_onnx import export
from phi3_onnx.manifest import read_manifest

REL_TOL = 1e-4  # max |Δlogit| relative to the reference logit range


def _session(pkg: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])


def _empty_past(sess: ort.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values")}


def _reference(ckpt: Path) -> Phi3ForCausalLM:
    return Phi3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _ids(n: int, vocab: int = 2048, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(1, n)).astype(np.int64)


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    err = np.abs(got - ref).max() / (ref.max() - ref.min())
    print(f"{what}: max|Δ|/range = {err:.2e}")
    assert err <= REL_TOL, f"{what}: {err:.2e} > {REL_TOL}"


def _check_prefill(pkg: Path, model: Phi3ForCausalLM, ids: np.ndarray) -> None:
    sess = _session(pkg)
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past(sess)})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    _assert_close(got, ref, f"prefill {ids.shape[1]} tokens")


def _check_cached_decode(pkg: Path, model: Phi3ForCausalLM, ids: np.ndarray, prefix: int) -> None:
    """Prefill `prefix` tokens, then one token at a time; PyTorch's cache keeps keys as first rotated."""
    sess = _session(pkg)
    names = [o.name for o in sess.get_outputs()]
    past, cache = _empty_past(sess), DynamicCache(config=model.config)
    steps = [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]
    got_all, ref_all = [], []
    for a, b in steps:
        out = sess.run(None, {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64), **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        with torch.no_grad():
            r = model(torch.from_numpy(ids[:, a:b]), past_key_values=cache, use_cache=True)
        got_all.append(out[0][0, -1]), ref_all.append(r.logits[0, -1].numpy())
    _assert_close(np.stack(got_all), np.stack(ref_all), f"cached decode to {ids.shape[1]} tokens")


def test_fp32_matches_pytorch_48_tokens(exported, tiny_ckpt) -> None:
    pkg, model = exported("fp32-cpu"), _reference(tiny_ckpt)
    ids = _ids(48)
    _check_prefill(pkg, model, ids)
    _check_cached_decode(pkg, model, ids, prefix=8)


def test_fp32_longrope_past_original_context(exported, tiny_longrope_ckpt) -> None:
    """512+ tokens with an original context of 64: short factors first, long factors past it."""
    pkg, model = exported("fp32-cpu", tiny_longrope_ckpt), _reference(tiny_longrope_ckpt)
    assert model.config.rope_parameters["rope_type"] == "longrope"
    ids = _ids(520, seed=1)
    _check_prefill(pkg, model, ids)
    _check_prefill(pkg, model, ids[:, :40])  # inside the original context: short factors
    _check_cached_decode(pkg, model, ids[:, :140], prefix=30)  # crosses 64 while decoding


def test_fp32_sliding_window(exported, tiny_sliding_ckpt) -> None:
    pkg, model = exported("fp32-cpu", tiny_sliding_ckpt), _reference(tiny_sliding_ckpt)
    assert model.config.sliding_window == 100
    ids = _ids(300, seed=2)
    _check_prefill(pkg, model, ids)
    _check_cached_decode(pkg, model, ids[:, :260], prefix=20)


def _gqa_windows(pkg: Path) -> set[int]:
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute if a.name == "local_window_size"}


def test_context_inside_the_window_needs_no_window(exported, tiny_sliding_ckpt) -> None:
    """--context-length 100 with a 100-token window: no window in the graph, same logits as
    transformers (which applies its window) over the whole capped context, and genai refuses more."""
    import onnxruntime_genai as og

    pkg, model = exported("fp32-cpu", tiny_sliding_ckpt, context_length=100), _reference(tiny_sliding_ckpt)
    assert _gqa_windows(pkg) == {-1}
    assert _gqa_windows(exported("fp32-cpu", tiny_sliding_ckpt, context_length=101)) == {100}
    genai = json.loads((pkg / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 100 and genai["search"]["max_length"] == 100
    ids = _ids(100, seed=4)
    _check_prefill(pkg, model, ids)
    _check_cached_decode(pkg, model, ids, prefix=10)
    og_model = og.Model(str(pkg))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=101)
    with pytest.raises(Exception, match="context_length"):
        og.Generator(og_model, params)


def test_capped_context_keeps_longrope_scaling(exported, tiny_longrope_ckpt) -> None:
    """LongRoPE's attention factor comes from the published context, not the cap: same logits as
    transformers (uncapped config) across the original-context switch."""
    pkg, model = exported("fp32-cpu", tiny_longrope_ckpt, context_length=140), _reference(tiny_longrope_ckpt)
    assert read_manifest(pkg).model.max_position_embeddings == 140 < model.config.max_position_embeddings
    ids = _ids(140, seed=5)
    _check_prefill(pkg, model, ids)
    _check_cached_decode(pkg, model, ids, prefix=30)


def _genai_greedy(pkg: Path, prompt: np.ndarray, new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(pkg))
    params = og.GeneratorParams(model)
    total = prompt.size + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt.astype(np.int32).ravel())
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[prompt.size:]]


def _torch_greedy_cached(model: Phi3ForCausalLM, prompt: np.ndarray, new_tokens: int, banned: tuple[int, ...]) -> list[int]:
    """Greedy with the eos ids masked, as genai does below min_length."""
    cache, out = DynamicCache(config=model.config), []
    x = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(x, past_key_values=cache, use_cache=True).logits[0, -1]
            logits[list(banned)] = -torch.inf
            out.append(int(logits.argmax()))
            x = torch.tensor([[out[-1]]])
    return out


def test_genai_generates_past_sliding_window(exported, tiny_sliding_ckpt) -> None:
    """onnxruntime-genai (shared KV buffer) runs on well past a 100-token window, token for token."""
    pkg, model = exported("fp32-cpu", tiny_sliding_ckpt), _reference(tiny_sliding_ckpt)
    prompt = _ids(20, seed=3)
    eos = read_manifest(pkg).model.eos_token_ids
    assert _genai_greedy(pkg, prompt, 230) == _torch_greedy_cached(model, prompt, 230, eos)


def test_int4_cpu_structure(exported) -> None:
    pkg = exported("int4-cpu")
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert not [n for n in graph.node if n.op_type == "MatMul"], "every linear should be int4"
    attrs = {(a.name, a.i) for n in nbits for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")}
    assert attrs == {("bits", 4), ("block_size", 32), ("accuracy_level", 4)}
    spec = read_manifest(pkg).model
    assert len(nbits) == 4 * spec.num_layers + 1  # qkv, o, gate_up, down per layer + lm_head
    ops = {n.op_type for n in graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"} <= ops


def _ort_greedy(pkg: Path, prompt: np.ndarray, new_tokens: int, banned: tuple[int, ...]) -> list[int]:
    """Greedy decoding with a plain InferenceSession and a growing KV cache (no genai)."""
    sess = _session(pkg)
    names = [o.name for o in sess.get_outputs()]
    past, x, out = _empty_past(sess), prompt, []
    for _ in range(new_tokens):
        total = prompt.shape[1] + len(out)
        res = sess.run(None, {"input_ids": x, "attention_mask": np.ones((1, total), np.int64), **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], res[1:])}
        logits = res[0][0, -1]
        logits[list(banned)] = -np.inf
        out.append(int(logits.argmax()))
        x = np.array([[out[-1]]], np.int64)
    return out


def test_int4_cpu_generates_text_in_genai(exported) -> None:
    """genai's greedy tokens equal a plain-ORT greedy loop over the same graph, and decode to words."""
    import onnxruntime_genai as og

    pkg = exported("int4-cpu")
    tok = og.Tokenizer(og.Model(str(pkg)))
    prompt = np.array([tok.encode("The module provides")], np.int64)
    ids = _genai_greedy(pkg, prompt, 24)
    assert ids == _ort_greedy(pkg, prompt, 24, read_manifest(pkg).model.eos_token_ids)
    text = tok.decode(np.array(ids, np.int32))
    print("int4-cpu:", text)
    assert len(text.split()) >= 3


def test_block_size_override(exported) -> None:
    graph = onnx.load(str(exported("int4-cpu", block_size=64) / "model.onnx"), load_external_data=False).graph
    assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"} == {64}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_exports_are_deterministic(tmp_path, tiny_ckpt) -> None:
    a = export(tiny_ckpt, "int4-cpu", tmp_path / "a")
    b = export(tiny_ckpt, "int4-cpu", tmp_path / "b")
    assert _digest(a) == _digest(b)


def test_package_contents_and_manifest(exported, tiny_ckpt) -> None:
    pkg = exported("int4-cpu")
    names = {p.name for p in pkg.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "manifest.json", "tokenizer.json",
            "tokenizer_config.json", "LICENSE", "README.md"} <= names
    m = read_manifest(pkg)
    assert m.target.name == "int4-cpu" and m.max_length == min(m.model.max_position_embeddings, 4096)
    for name, entry in m.files.items():
        assert (pkg / name).stat().st_size == entry.size
        assert hashlib.sha256((pkg / name).read_bytes()).hexdigest() == entry.sha256


def _random_deep_checkpoint(tiny_ckpt: Path, dst: Path, layers: int) -> Path:
    """The tiny config with many layers and random fp32 weights, so weights dwarf fixed overheads."""
    from safetensors.numpy import save_file

    from phi3_onnx.checkpoint import expected_tensors, spec_from_folder

    dst.mkdir()
    cfg = json.loads((tiny_ckpt / "config.json").read_text()) | {"num_hidden_layers": layers}
    (dst / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_ckpt / name, dst / name)
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in expected_tensors(spec_from_folder(dst)).items()}
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_export_streams_weights(tmp_path, tiny_ckpt) -> None:
    """Tensors are read one by one while saving: traced peak stays a fraction of the weights' size."""
    ckpt = _random_deep_checkpoint(tiny_ckpt, tmp_path / "deep", layers=24)
    weight_bytes = (ckpt / "model.safetensors").stat().st_size
    tracemalloc.start()
    export(ckpt, "fp32-cpu", tmp_path / "p")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak traced {peak / 2**20:.1f} MiB vs fp32 weights {weight_bytes / 2**20:.1f} MiB")
    assert peak < 0.35 * weight_bytes


def test_dry_run_writes_nothing(tmp_path, tiny_ckpt, capsys) -> None:
    from phi3_onnx.cli import main

    assert main(["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "peak RAM" in out and "model.onnx.data" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["fp32-cpu", "int4-cpu"])
def test_plain_inference_session_runs_batch_of_two(exported, target) -> None:
    """A plain InferenceSession with batch 2 (no genai): each row equals running it alone."""
    sess = _session(exported(target))
    ids = np.concatenate([_ids(12, seed=4), _ids(12, seed=5)])
    both = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past(sess, 2)})[0]
    one = sess.run(["logits"], {"input_ids": ids[1:], "attention_mask": np.ones_like(ids[1:]), **_empty_past(sess)})[0]
    np.testing.assert_allclose(both[1:], one, atol=1e-3 * (one.max() - one.min()))


def test_manifest_records_the_recipe_that_ran(exported, tiny_ckpt, tiny_sliding_ckpt) -> None:
    """The manifest says what actually ran: quantizer, block size, accuracy level; context and KV sizes."""
    rtn = read_manifest(exported("int4-cpu", block_size=64)).recipe
    assert rtn["quantization"] == {"method": "rtn", "bits": 4, "block_size": 64, "accuracy_level": 4,
                                        "symmetric": True, "quantize_lm_head": True, "quantize_embedding": False}
    spec = read_manifest(exported("int4-cpu")).model
    assert read_manifest(exported("int4-cpu")).recipe["context_length"] == spec.max_position_embeddings
    fp32 = read_manifest(exported("fp32-cpu")).recipe
    assert fp32["quantization"] is None and fp32["context_capped"] is False
    capped = read_manifest(exported("int4-cuda", tiny_sliding_ckpt, context_length=100)).recipe
    assert capped["context_length"] == 100 and capped["context_capped"] is True and capped["max_length"] == 100
