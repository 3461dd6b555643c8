"""Phi-3-small (Phi3SmallForCausalLM, issue 12): a tiny random checkpoint of its shape against a plain-PyTorch reference.

tests/phi3_small_ref.py holds the reference (written from the published modeling code; its HF code
needs triton) and the tiny checkpoint: 4 layers (1 and 3 dense, 0 and 2 block-sparse), GQA 4/2, head
32, blocks of 16 tokens with 2 local blocks and vertical stride 4, per-head patterns — so over 512
tokens the sparse layout differs from dense causal attention — a BPE tokenizer trained here as a
.tiktoken file, tied embeddings, muP multipliers and a gegelu clamp the weights reach.
Accuracy (every target's eval drift limits) is measured on the trained tiny Phi-3-small
(tests/assets/tiny-phi3-small, scripts/train_tiny_phi3_small.py); random weights serve the parity tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import phi3_small_ref as ref
import pytest
import torch

from phi3_onnx import export
from phi3_onnx.checkpoint import spec_from_config, spec_from_folder
from phi3_onnx.checkpoint import tiktoken as tk
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import read_manifest
from phi3_onnx.targets import FLAGSHIP_BLOCK, TARGETS
from helpers import TINY_PHI3_SMALL, assert_within_registry_limits, export_all_and_eval, genai_greedy

REL_TOL = 1e-4  # max |diff| / logit range, as tests/test_export.py


def _cfg(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(1, n)).astype(np.int64)


def _finite_close(got: np.ndarray, want: np.ndarray, what: str, tol: float = REL_TOL) -> float:
    """max |diff| / range over the real vocabulary (dummy ids: the reference's dtype minimum, the graph's -65504)."""
    real = want[0, 0] > np.finfo(np.float32).min
    assert (got[..., ~real] == np.finfo(np.float16).min).all()  # MASKED_LOGIT in every dtype
    g, w = got[..., real], want[..., real]
    err = float(np.abs(g - w).max() / (w.max() - w.min()))
    print(f"{what}: max|diff|/range = {err:.2e}")
    assert err <= tol, f"{what}: {err:.2e} > {tol}"
    return err


def _session(pkg: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])


def _empty_past(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}


def _prefill(pkg: Path, ids: np.ndarray) -> np.ndarray:
    sess = _session(pkg)
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past(sess)})[0]


def _reference(ckpt: Path, ids: np.ndarray, weights=None) -> np.ndarray:
    with torch.no_grad():
        return ref.reference_forward(weights or ref.load_weights(ckpt), _cfg(ckpt), torch.from_numpy(ids))[0].numpy()


def _cached_decode(pkg: Path, ckpt: Path, ids: np.ndarray, prefix: int) -> None:
    sess, w, cfg = _session(pkg), ref.load_weights(ckpt), _cfg(ckpt)
    names = [o.name for o in sess.get_outputs()]
    past, cache, got, want = _empty_past(sess), None, [], []
    for a, b in [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]:
        out = sess.run(None, {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64), **past})
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        with torch.no_grad():
            logits, cache = ref.reference_forward(w, cfg, torch.from_numpy(ids[:, a:b]), cache)
        got.append(out[0][:, -1:]), want.append(logits[:, -1:].numpy())
    _finite_close(np.concatenate(got, 1), np.concatenate(want, 1), f"cached decode to {ids.shape[1]} tokens")


# ----------------------------------------------------------------------------- config -> spec


def test_spec_reads_phi3_small(small_ckpt: Path) -> None:
    spec = spec_from_folder(small_ckpt)
    assert (spec.architecture, spec.norm, spec.attention_bias, spec.tie_word_embeddings) == ("Phi3SmallForCausalLM", "layer", True, True)
    assert (spec.head_dim, spec.intermediate_size, spec.rope_theta, spec.rms_norm_eps) == (32, 256, 1e6, 1e-5)
    s = spec.small
    assert [s.is_dense(i) for i in range(4)] == [False, True, False, True]
    assert s.attention_scale == 1 / 32 and s.head_step(4) == 1 and len(s.dummy_token_ids) == 87 + 4  # dummy_id_0..86, fim x3, endofprompt
    specials = tk.special_tokens(spec.vocab_size)
    assert set(spec.eos_token_ids) == {specials["<|endoftext|>"], specials["<|end|>"]}


def test_published_layout_ids() -> None:
    """At cl100k's 100256 ranks the layout gives tokenization_phi3_small.py's ids."""
    specials = tk.special_tokens(100256 + tk.RESERVED)
    assert (specials["<|dummy_id_2|>"], specials["<|endoftext|>"], specials["<|system|>"], specials["<|end|>"]) == (100256, 100257, 100261, 100266)
    assert (specials["<|endofprompt|>"], specials["<|dummy_id_12|>"], specials["<|dummy_id_86|>"]) == (100276, 100277, 100351)
    assert len(set(specials.values())) == tk.RESERVED


def test_preset_phi3_small_8k() -> None:
    from phi3_onnx.checkpoint import preset

    spec = preset("phi3-small-8k")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (32, 32, 8, 128, 100352)
    assert spec.small.block_size == 64 and spec.small.vert_stride == 8 and not spec.small.homo_head_pattern
    assert round(spec.num_params() / 1e9, 2) == 7.39
    from phi3_onnx.spec import ModelSpec

    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_phi3_spec_dict_has_no_new_keys() -> None:
    """Existing Phi-3 manifests stay byte-identical: the fields added for Phi-3-small are omitted at their defaults."""
    from phi3_onnx.checkpoint import preset

    assert not {"architecture", "norm", "attention_bias", "small"} & set(preset("phi3-mini-4k").to_dict())


@pytest.mark.parametrize("key, value, match", [
    ("hidden_act", "silu", "gegelu"),
    ("rope_position_scale", 2.0, "rope_position_scale"),
    ("blocksparse_block_size", 0, "blocksparse_block_size"),
    ("blocksparse_homo_head_pattern", "no", "blocksparse_homo_head_pattern"),
    ("gegelu_limit", -1, "gegelu_limit"),
    ("dummy_token_indices", [10**6], "dummy_token_indices"),
    ("blocksparse_triton_kernel_block_size", 32, "triton_kernel_block_size"),
])
def test_bad_values_are_one_line_errors(small_ckpt: Path, key, value, match) -> None:
    with pytest.raises(Phi3OnnxError, match=match) as err:
        spec_from_config(_cfg(small_ckpt) | {key: value})
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- fp32 parity


def test_reference_sparse_mask_matters(small_ckpt: Path) -> None:
    """Sanity of the test itself: over 512 tokens the block-sparse layers change the logits."""
    ids, cfg = _ids(512, 600), _cfg(small_ckpt)
    w = ref.load_weights(small_ckpt)
    with torch.no_grad():
        sparse = ref.reference_forward(w, cfg, torch.from_numpy(ids))[0]
        dense = ref.reference_forward(w, cfg | {"dense_attention_every_n_layers": 1}, torch.from_numpy(ids))[0]
    real = sparse[0, 0] > torch.finfo(torch.float32).min
    err = ((sparse - dense)[..., real].abs().max() / (sparse[..., real].max() - sparse[..., real].min())).item()
    assert err > 100 * REL_TOL
    assert not ref.sparse_token_mask(cfg, 512, 512)[0].equal(ref.sparse_token_mask(cfg, 512, 512)[1])  # per-head patterns


def test_fp32_matches_reference_512_tokens(exported, small_ckpt: Path) -> None:
    pkg = exported("fp32-cpu", small_ckpt)
    ids = _ids(512, 600)
    _finite_close(_prefill(pkg, ids), _reference(small_ckpt, ids), "fp32 prefill 512")
    _cached_decode(pkg, small_ckpt, ids[:, :200], prefix=150)


def test_fp32_longrope_past_the_original_context(exported, small_longrope_ckpt: Path) -> None:
    pkg = exported("fp32-cpu", small_longrope_ckpt)
    ids = _ids(512, 600, seed=2)
    _finite_close(_prefill(pkg, ids), _reference(small_longrope_ckpt, ids), "longrope prefill 512 (long factors)")
    _finite_close(_prefill(pkg, ids[:, :100]), _reference(small_longrope_ckpt, ids[:, :100]), "longrope prefill 100 (short)")
    _cached_decode(pkg, small_longrope_ckpt, ids[:, :170], prefix=100)  # crosses 128 token by token


def test_int4_matches_reference_on_dequantized_weights(exported, small_ckpt: Path) -> None:
    """int4-cpu with fp32 compute (accuracy level 0) computes the reference over the int4 round trip of
    every matrix (the tied table included); q/k/v and gegelu rows are permuted whole, blocks run along K."""
    pkg = exported("int4-cpu", small_ckpt, accuracy_level=0)
    block = TARGETS["int4-cpu"].quant.block_size
    w = ref.int4_round_trip(ref.load_weights(small_ckpt), block)
    ids = _ids(300, 600, seed=3)
    _finite_close(_prefill(pkg, ids), _reference(small_ckpt, ids, w), "int4-cpu vs dequantized reference")


# ----------------------------------------------------------------------------- SparseAttention (the CUDA graphs) on the CPU kernel


def test_sparse_attention_graph_matches_reference(small_ckpt: Path, tmp_path: Path) -> None:
    """The CUDA graph shape (SparseAttention with the CSR layout on sparse layers, GQA on dense ones) in fp32,
    run by ORT's CPU SparseAttention kernel with past/present sharing one max-length buffer (IO binding, as
    onnxruntime-genai runs it): prefill 256 and decode past it equal the reference."""
    target = dataclasses.replace(TARGETS["fp16-cuda"], name="fp32-sparse-attention", io_dtype="float32")
    pkg = export(small_ckpt, target, tmp_path / "sparse")
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node if "Attention" in n.op_type]
    assert ops == ["SparseAttention", "GroupQueryAttention"] * 2
    sess, cap = _session(pkg), 320
    buffers = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, i.shape[1], cap, i.shape[3]), np.float32))
               for i in sess.get_inputs() if i.name.startswith("past")}
    ids, w = _ids(300, 600, seed=4), ref.load_weights(small_ckpt)
    got, want = [], []
    for a, b in [(0, 256)] + [(t, t + 1) for t in range(256, 300)]:
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids[:, a:b])
        io.bind_cpu_input("attention_mask", np.ones((1, b), np.int64))
        for name, buf in buffers.items():
            io.bind_ortvalue_input(name, buf)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), buf)
        io.bind_output("logits")
        sess.run_with_iobinding(io)
        got.append(io.copy_outputs_to_cpu()[-1][:, -1:])
        want.append(_reference(small_ckpt, ids[:, :b], w)[:, -1:])
    _finite_close(np.concatenate(got, 1), np.concatenate(want, 1), "SparseAttention (CPU kernel, shared KV) prefill 256 + 44 steps")


# ----------------------------------------------------------------------------- the DirectML form: GQA's cache, plain-op attention


def _dml_fp32(ckpt: Path, tmp_path: Path) -> Path:
    """int4-awq-dml's graph shape (separate q/k/v, RotaryEmbedding, position_ids, sparse layers in plain ops
    over GQA's present) with fp32 weights and activations, so it can be held to the reference's 1e-4."""
    target = dataclasses.replace(TARGETS["int4-awq-dml"], name="fp32-dml-shape", io_dtype="float32", quant=None)
    return export(ckpt, target, tmp_path / "dml-shape")


def _with_positions(sess, feed: dict, start: int) -> dict:
    if any(i.name == "position_ids" for i in sess.get_inputs()):
        feed["position_ids"] = np.arange(start, start + feed["input_ids"].shape[1])[None]
    return feed


def test_dml_sparse_layers_attend_in_plain_ops(small_ckpt: Path, tmp_path: Path) -> None:
    """ORT's DirectML GroupQueryAttention reads only query/key/value/seqlens_k (DmlOperatorGroupQueryAttention:
    no attention_bias, no local_window_size), so a bias on it would be dropped there and the sparse layers would
    attend densely. The DML graph feeds GQA no bias and attends over GQA's present K/V in plain ops: exact
    against the reference at a 300-token prefill (5 sparse blocks) and token by token over a growing past."""
    pkg = _dml_fp32(small_ckpt, tmp_path)
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    assert _attention_ops(model) == [("GroupQueryAttention", False)] * 4
    assert {n.output[0] for n in model.graph.node if n.op_type == "Softmax"} == {
        f"/model/layers.{i}/attn/sparse/Softmax/output_0" for i in (0, 2)}
    sess, ids = _session(pkg), _ids(300, 600, seed=6)
    feed = _with_positions(sess, {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past(sess)}, 0)
    _finite_close(sess.run(["logits"], feed)[0], _reference(small_ckpt, ids), "DML-shaped graph, prefill 300")
    w, cfg, names = ref.load_weights(small_ckpt), _cfg(small_ckpt), [o.name for o in sess.get_outputs()]
    past, cache, got, want = _empty_past(sess), None, [], []
    for a, b in [(0, 120)] + [(t, t + 1) for t in range(120, 200)]:
        out = sess.run(None, _with_positions(sess, {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64), **past}, a))
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        with torch.no_grad():
            logits, cache = ref.reference_forward(w, cfg, torch.from_numpy(ids[:, a:b]), cache)
        got.append(out[0][:, -1:]), want.append(logits[:, -1:].numpy())
    _finite_close(np.concatenate(got, 1), np.concatenate(want, 1), "DML-shaped graph, cached decode 120 -> 200")


def test_dml_shaped_genai_greedy_equals_reference(small_ckpt: Path, tmp_path: Path) -> None:
    """Through onnxruntime-genai (one shared max-length KV buffer: GQA's present is longer than the keys, the
    plain-op attention slices it) on the CPU EP: the reference's greedy tokens across sparse blocks."""
    pkg = _dml_fp32(small_ckpt, tmp_path)
    cfg_path = pkg / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["provider_options"] = []  # run it on the CPU EP here
    cfg_path.write_text(json.dumps(cfg))
    prompt, new = _ids(40, 600, seed=7)[0].tolist(), 90
    got = genai_greedy(pkg, prompt, new)
    with torch.no_grad():
        want = ref.reference_greedy(ref.load_weights(small_ckpt), _cfg(small_ckpt), prompt, new)
    assert got == want


# ----------------------------------------------------------------------------- onnxruntime-genai


@pytest.mark.parametrize("target", ["int4-cuda", "fp16-cuda", "int4-awq-dml"])
def test_graph_capture_off_only_where_sparse_attention_runs(exported, small_ckpt: Path, tiny_ckpt: Path, target: str) -> None:
    """ORT's CUDA SparseAttention synchronizes its stream inside the step, so genai's CUDA graph capture fails
    on it (H200, benchmarks/results/gpu_small_check-h200.log): Phi-3-small CUDA packages say
    enable_cuda_graph "0", Phi-3 CUDA packages keep "1". DirectML's sparse layers attend in plain ops whose shapes
    follow the sequence length, which a replayed graph would freeze: capture off there too."""
    def options(pkg: Path) -> dict:
        entries = json.loads((pkg / "genai_config.json").read_text())["model"]["decoder"]["session_options"]["provider_options"]
        return entries[0][TARGETS[target].provider]

    key = {"cuda": "enable_cuda_graph", "dml": "enable_graph_capture"}[TARGETS[target].provider]
    assert options(exported(target, tiny_ckpt))[key] == "1"
    assert options(exported(target, small_ckpt))[key] == "0"


def test_genai_greedy_equals_reference_greedy(exported, small_ckpt: Path) -> None:
    """onnxruntime-genai (model type phi3small, shared KV buffer, GQA + the block-sparse bias) generates the
    reference's greedy tokens, across block boundaries and past the local window."""
    pkg = exported("fp32-cpu", small_ckpt)
    assert json.loads((pkg / "genai_config.json").read_text())["model"]["type"] == "phi3small"
    prompt, new = _ids(40, 600, seed=5)[0].tolist(), 90
    got = genai_greedy(pkg, prompt, new)
    with torch.no_grad():
        want = ref.reference_greedy(ref.load_weights(small_ckpt), _cfg(small_ckpt), prompt, new)
    assert got == want


def test_runtime_greedy_across_the_original_context(exported, small_longrope_ckpt: Path) -> None:
    """phi3_onnx.runtime (genai underneath) on the LongRoPE variant: one cache rebuild at the crossing of the
    original context (128), greedy tokens equal the reference's with the same rebuild."""
    from phi3_onnx.runtime import GenerationOptions, load

    pkg = exported("fp32-cpu", small_longrope_ckpt)
    prompt = _ids(100, 600, seed=6)[0].tolist()
    model = load(pkg)
    options = GenerationOptions(max_new_tokens=60, min_new_tokens=60)
    decoder = model.new_decoder(options, len(prompt))
    got = list(model.token_ids(decoder, prompt, options))
    with torch.no_grad():
        want = ref.reference_greedy(ref.load_weights(small_longrope_ckpt), _cfg(small_longrope_ckpt), prompt, 60,
                                    rebuild_past_original=True)
    assert decoder.rebuilds == 1 and got == want


# ----------------------------------------------------------------------------- tokenizer


TEXTS = ["Hello world", "  two  spaces\n\nnewlines\t tab", "I'll we've they're DON'T", "12345678 3.14159 1,000,000",
         "café naïve 中文字符 😀👍🏽 Ωmega", "def f(x):\n    return x**2  # ok\n", "   ", "a\r\nb\rc", "ÀÉÎÕÜ ß ﬁ"]
SPECIAL_TEXTS = ["<|user|>\nHi there<|end|>\n<|assistant|>\n", "<|endoftext|><|endoftext|>x", "x<|end|>y<|system|>"]


def test_tokenizer_json_equals_tiktoken_reference(exported, small_ckpt: Path, ranks) -> None:
    """Our tokenizer.json, through `tokenizers` and through onnxruntime-genai's Tokenizer, encodes like a
    plain-Python tiktoken BPE over the same ranks (special tokens included) and decodes back."""
    import onnxruntime_genai as og
    import tokenizers

    pkg = exported("fp32-cpu", small_ckpt)
    specials = tk.special_tokens(_cfg(small_ckpt)["vocab_size"])
    hf = tokenizers.Tokenizer.from_file(str(pkg / "tokenizer.json"))
    genai = og.Tokenizer(og.Model(str(pkg)))
    for text in TEXTS + SPECIAL_TEXTS:
        want = ref.reference_encode(text, ranks, specials)
        assert hf.encode(text, add_special_tokens=False).ids == want, text
        assert [int(i) for i in genai.encode(text)] == want, text
        assert hf.decode(want, skip_special_tokens=False) == ref.reference_decode(want, ranks, specials) == text
    for text in TEXTS:
        assert genai.decode(ref.reference_encode(text, ranks, specials)) == text
    cfg = json.loads((pkg / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tk.DEFAULT_CHAT_TEMPLATE and cfg["eos_token"] == "<|endoftext|>"


def test_merges_follow_rank_order(ranks) -> None:
    merges = tk.merges_from_ranks(ranks)
    merged_ranks = [ranks[a + b] for a, b in merges]
    assert merged_ranks == sorted(merged_ranks) and len(merges) >= len(ranks) - 256


def test_tiktoken_sources_and_errors(small_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Phi3OnnxError, match="--tiktoken FILE") as err:
        tk.find_ranks(bare)
    assert "\n" not in str(err.value)
    assert tk.find_ranks(bare, small_ckpt / "cl100k_base.tiktoken").name == "cl100k_base.tiktoken"
    cached = tk._tiktoken_cache()
    cached.parent.mkdir(parents=True)
    cached.write_bytes((small_ckpt / "cl100k_base.tiktoken").read_bytes())
    assert tk.find_ranks(bare) == cached
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(Phi3OnnxError, match="not a .tiktoken file"):
        tk.read_ranks(bad)
    with pytest.raises(Phi3OnnxError, match="vocab_size"):
        tk.tokenizer_json(tk.read_ranks(small_ckpt / "cl100k_base.tiktoken"), 100352)


def test_export_without_ranks_is_refused(small_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from phi3_onnx.cli import main

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    ckpt = tmp_path / "no-ranks"
    shutil.copytree(small_ckpt, ckpt)
    (ckpt / "cl100k_base.tiktoken").rename(tmp_path / "elsewhere.tiktoken")
    assert main(["export", "--model", str(ckpt), "--target", "fp32-cpu", "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    pkg = export(ckpt, "fp32-cpu", tmp_path / "out2", tiktoken=str(tmp_path / "elsewhere.tiktoken"))
    assert (pkg / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- every target


def _attention_ops(model: onnx.ModelProto) -> list[tuple[str, bool]]:
    """(op, has an attention_bias input) per attention node, in layer order."""
    return [(n.op_type, len(n.input) > 10 and n.input[10] != "") for n in model.graph.node if "Attention" in n.op_type]


@pytest.fixture(scope="module")
def small_awq_weights(small_ckpt: Path) -> dict[str, torch.Tensor]:
    """AWQ's weights (scaled, clipped, GPTQ-rounded; quantize/awq_small.py) as the AWQ targets' exports compute
    them (the same defaults; calibration is deterministic), in the checkpoint's own layout for the reference."""
    from phi3_onnx.quantize.awq_small import awq_small_weights

    return ref.own_layout(small_ckpt, awq_small_weights(small_ckpt, spec_from_folder(small_ckpt), TARGETS["int4-awq-cpu"].quant))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_exports(exported, small_ckpt: Path, target: str, request) -> None:
    """Each target exports (the staged package loads in genai), with the attention op its EP gets on sparse
    layers, biases, LayerNorm and the gegelu clamp; CPU/DML graphs run a step on the CPU EP. The AWQ targets
    run AWQ (quantize/awq_small.py) at the flagship block 128."""
    t = TARGETS[target]
    pkg = exported(target, small_ckpt)
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "SkipLayerNormalization", "IsInf", "Clip"} <= ops
    # input 10: sin cache (SparseAttention) | bias (GQA on CPU); DirectML's GQA takes no bias: plain-op attention
    sparse = {"cuda": ("SparseAttention", True), "cpu": ("GroupQueryAttention", True), "dml": ("GroupQueryAttention", False)}[t.provider]
    assert _attention_ops(model) == [sparse, ("GroupQueryAttention", False)] * 2
    assert ("MatMulNBits" in ops) == (t.quant is not None)
    assert (not t.graph.packed_qkv) == ("RotaryEmbedding" in ops)
    recipe = read_manifest(pkg).recipe["quantization"]
    awq = t.quant is not None and t.quant.method == "awq"
    if awq:
        assert (recipe["method"], recipe["rounding"], recipe["block_size"]) == ("awq", "gptq", FLAGSHIP_BLOCK)
        assert recipe["calibration"]["samples"] == 8 and not {"fallback", "requested_method"} & set(recipe)
        assert read_manifest(pkg).target.quant.block_size == FLAGSHIP_BLOCK
    sess = _session(pkg)
    dtype = np.float16 if t.io_dtype == "float16" else np.float32
    feed = {"input_ids": _ids(40, 600), "attention_mask": np.ones((1, 40), np.int64),
            **{k: v.astype(dtype) for k, v in _empty_past(sess).items()}}
    if t.graph.position_ids_input:
        feed["position_ids"] = np.arange(40)[None]
    if t.provider == "cuda":  # SparseAttention: past/present share one buffer (ORT's CPU kernel runs fp16 too)
        logits = _shared_kv_prefill(sess, feed, 40, dtype)
    else:
        logits = sess.run(["logits"], feed)[0].astype(np.float32)
    quant = read_manifest(pkg).target.quant
    source = request.getfixturevalue("small_awq_weights") if awq else ref.load_weights(small_ckpt)
    weights = ref.int4_round_trip(source, quant.block_size, t.io_dtype, quant.tied_table_block_size) if t.quant else None
    want = _reference(small_ckpt, feed["input_ids"], weights)
    # int4 targets against the reference on their own dequantized weights (fp16 targets: the fp16 round
    # trip); what is left is the int8 activations of accuracy level 4 (CPU: 1.1e-2 of the range here) or fp16
    # activations (fp16-cuda, int4-cuda, int4-awq-dml within 1e-3; the DML graph in fp32 5e-7)
    _finite_close(logits, want, f"{target} vs reference{' (dequantized)' if t.quant else ''}",
                  tol=REL_TOL if t.io_dtype == "float32" and not t.quant else 3e-2 if t.io_dtype == "float32" else 3e-3)


def _shared_kv_prefill(sess, feed: dict, capacity: int, dtype) -> np.ndarray:
    io = sess.io_binding()
    for name, value in feed.items():
        if name.startswith("past_key_values."):
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((*value.shape[:2], capacity, value.shape[3]), dtype))
            io.bind_ortvalue_input(name, buf)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), buf)
        else:
            io.bind_cpu_input(name, value)
    io.bind_output("logits")
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[-1].astype(np.float32)


HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
_EVAL_WINDOW, _EVAL_TOKENS = 256, 6144
_EVAL_TARGETS = sorted(set(TARGETS) - {"fp32-cpu"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every target exported from the trained tiny Phi-3-small (tests/assets/tiny-phi3-small; AWQ with the
    exporter's defaults: 8 x 256 built-in calibration tokens) and one `phi3-onnx eval` of them all against its
    fp32-cpu export on held-out text (the CUDA packages' SparseAttention through the shared KV buffer)."""
    return export_all_and_eval(TINY_PHI3_SMALL, _EVAL_TARGETS, tmp_path_factory.mktemp("trained-small"), HELDOUT, _EVAL_WINDOW,
                               _EVAL_TOKENS, "trained tiny Phi-3-small")


def test_trained_asset_fp32_matches_reference(trained) -> None:
    """The committed asset reads as Phi-3-small, and its fp32-cpu package computes reference_forward over the bf16
    file on 320 held-out tokens (20 sparse blocks: the block-sparse layers' pattern is not causal there)."""
    spec = spec_from_folder(TINY_PHI3_SMALL)
    cfg = _cfg(TINY_PHI3_SMALL)
    assert spec.architecture == "Phi3SmallForCausalLM" and cfg["vocab_size"] == 256 + tk.RESERVED
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["blocksparse_block_size"]) == (256, 4, 16)
    text = HELDOUT.read_text(encoding="utf-8")
    ids = np.array([list(text.encode())[:320]], np.int64)  # byte-level ranks: one token per byte
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(trained["reference"] / "tokenizer.json")).encode(text[:2000]).ids == list(text[:2000].encode())
    _finite_close(_prefill(trained["reference"], ids), _reference(TINY_PHI3_SMALL, ids), "trained fp32 prefill 320")


@pytest.mark.parametrize("target", _EVAL_TARGETS)
def test_every_target_passes_its_default_limits_on_the_trained_small(trained, target: str) -> None:
    """`phi3-onnx eval` (the CPU EP runs every target's graph) against fp32-cpu: within the registry's limits."""
    row = trained["rows"][target]
    assert_within_registry_limits(row, target, _EVAL_TOKENS, _EVAL_WINDOW)
    assert row["metrics"]["max_abs_dlogit"] < 10  # the dummy ids (masked in both) do not count


def test_eval_of_the_trained_small_passes_and_can_fail(trained, tmp_path: Path) -> None:
    """One eval over every target exits 0; the same int4-cpu package under a KL limit it cannot meet exits 1."""
    from phi3_onnx.cli import main

    assert trained["rc"] == 0 and set(trained["rows"]) == set(_EVAL_TARGETS)
    rc = main(["eval", str(trained["root"] / "variants" / "int4-cpu"), "--reference", str(trained["reference"]),
               "--data", str(HELDOUT), "--max-tokens", "512", "--max-kl", "1e-6", "--json", str(tmp_path / "r.json")])
    assert rc == 1


def test_full_size_graphs_and_layout() -> None:
    """Phi-3-small-8k's graphs from the preset (weights stay lazy, nothing is read): CUDA has 16 SparseAttention
    layers over an 8-layout CSR (32 heads use the period-8 pattern cyclically, as ORT assigns head h layout h % 8),
    CPU 16 GQA layers with the block-sparse bias; the CSR rows are the dense block mask's."""
    from phi3_onnx.checkpoint import preset
    from phi3_onnx.graph import build_model
    from phi3_onnx.graph.blocksparse import block_layout, csr_layout

    spec = preset("phi3-small-8k")
    rows, cols = csr_layout(spec)
    assert rows.shape == (8, 129) and cols.shape[0] == 8
    full = dataclasses.replace(spec, num_heads=32)
    layouts = block_layout(full)
    q, k = np.arange(128)[:, None], np.arange(128)[None, :]
    for h in range(32):  # the reference rule per head, against the layout ORT would give head h
        vertical = (np.arange(128) + h + 1) % 8 == 0
        want = (q >= k) & (((q - k) < 16) | vertical[None, :])
        np.testing.assert_array_equal(layouts[h % 8], want)
    for layout in range(8):  # CSR decodes back to the dense mask
        dense = np.zeros((128, 128), bool)
        for r in range(128):
            dense[r, cols[layout, rows[layout, r]:rows[layout, r + 1]]] = True
        np.testing.assert_array_equal(dense, layouts[layout])
    for target, sparse in (("int4-cuda", "SparseAttention"), ("int4-cpu", "GroupQueryAttention")):
        graph = build_model(spec, TARGETS[target], weights=None).graph  # type: ignore[arg-type]
        ops = [n.op_type for n in graph if "Attention" in n.op_type]
        assert ops == [sparse, "GroupQueryAttention"] * 16
