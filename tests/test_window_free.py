"""The window-free decoder copy of sliding-window CUDA packages (issue 10 item 3, package.window_free).

A CUDA package of a sliding-window model holds model.onnx (GQA with the window) and model.nowindow.onnx
(the same graph and weights file without it, exact only while a sequence fits the window). The runtime
runs the window-free one and moves to the windowed one before a sequence passes the window. Checked on
the tiny trained weights with a 100-token window: the two graphs differ in nothing but the window;
their logits agree inside the window and not past it; greedy text through the runtime, crossing the
window, equals transformers' (fp32: a CPU target given the CUDA graph's option), with and without
n-gram speculative decoding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from phi3_onnx import export
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import read_manifest
from phi3_onnx.package.window_free import WINDOW_FREE_DECODER, wants_window_free
from phi3_onnx.runtime import load
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import TARGETS
from test_export import _empty_past, _ids, _reference, _torch_greedy_cached

WINDOW = 100  # tiny_sliding_ckpt's sliding_window


@pytest.fixture(scope="module")
def fp32_dual(tiny_sliding_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32-cpu with the CUDA targets' window-free copy turned on: exact numerics against transformers."""
    fp32 = TARGETS["fp32-cpu"]
    target = dataclasses.replace(fp32, name="fp32-cpu", graph=dataclasses.replace(fp32.graph, window_free_decoder=True))
    return export(tiny_sliding_ckpt, target, tmp_path_factory.mktemp("wf") / "fp32-dual")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("target", ["int4-cuda", "fp16-cuda", "int4-awq-cuda"])
def test_cuda_packages_hold_a_window_free_copy(exported, tiny_sliding_ckpt: Path, target: str) -> None:
    pkg = exported(target, tiny_sliding_ckpt)
    assert read_manifest(pkg).window_free_decoder == WINDOW_FREE_DECODER
    main = onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph
    free = onnx.load(str(pkg / WINDOW_FREE_DECODER), load_external_data=False).graph
    assert len(main.node) == len(free.node)
    windows = set()
    for a, b in zip(main.node, free.node):
        assert (a.name, a.op_type, list(a.input), list(a.output)) == (b.name, b.op_type, list(b.input), list(b.output))
        attrs_a, attrs_b = _attrs(a), _attrs(b)
        if a.op_type == "GroupQueryAttention":
            windows.add((attrs_a.pop("local_window_size"), attrs_b.pop("local_window_size")))
        assert attrs_a == attrs_b
    assert windows == {(WINDOW, -1)}
    # the same initializers, pointing at the same bytes of the one weights file
    assert [(i.name, list(i.external_data)) for i in main.initializer] == [(i.name, list(i.external_data)) for i in free.initializer]
    assert sorted(p.name for p in pkg.glob("*.data")) == ["model.onnx.data"]


def test_no_copy_where_it_would_not_help(exported, tiny_ckpt: Path, tiny_sliding_ckpt: Path) -> None:
    assert read_manifest(exported("int4-cuda", tiny_ckpt)).window_free_decoder is None  # no window at all
    assert read_manifest(exported("int4-cpu", tiny_sliding_ckpt)).window_free_decoder is None  # CPU graph
    capped = exported("int4-cuda", tiny_sliding_ckpt, context_length=WINDOW)  # the context fits the window
    assert read_manifest(capped).window_free_decoder is None and not (capped / WINDOW_FREE_DECODER).exists()
    mini4k = ModelSpec(hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32, num_kv_heads=32,
                       vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096,
                       sliding_window=2047)
    assert wants_window_free(mini4k, TARGETS["int4-cuda"]) and wants_window_free(mini4k, TARGETS["fp16-cuda"])
    medium = dataclasses.replace(mini4k, hidden_size=5120, num_heads=40, num_kv_heads=10)  # head 128: XQA takes windows
    assert not wants_window_free(medium, TARGETS["int4-cuda"])
    # DirectML's GQA ignores the window: its model.onnx attends in plain ops, the copy is the fast graph
    assert wants_window_free(mini4k, TARGETS["int4-awq-dml"]) and wants_window_free(medium, TARGETS["int4-awq-dml"])


def test_the_two_graphs_agree_inside_the_window_only(fp32_dual: Path) -> None:
    ids = _ids(160, seed=7)
    logits = {}
    for name in ("model.onnx", WINDOW_FREE_DECODER):
        sess = ort.InferenceSession(str(fp32_dual / name), providers=["CPUExecutionProvider"])
        logits[name] = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past(sess)})[0][0]
    diff = np.abs(logits["model.onnx"] - logits[WINDOW_FREE_DECODER]).max(axis=-1)
    assert diff[:WINDOW].max() < 1e-4  # no query inside the window sees past it
    assert diff[WINDOW:].min() > 1e-3  # past it, every query would see keys the window hides


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_runtime_greedy_across_the_window_equals_transformers(fp32_dual: Path, tiny_sliding_ckpt: Path,
                                                              speculative: str | None) -> None:
    model = load(fp32_dual, device="cpu", max_length=256)
    assert model.window_free == WINDOW_FREE_DECODER
    prompt = _ids(30, seed=3)[0].tolist()
    options = model.options(max_new_tokens=170, min_new_tokens=170, speculative=speculative)
    decoder = model.new_decoder(options, len(prompt))
    got = []
    for token in model.token_ids(decoder, prompt, options):
        got.append(token)
        if len(prompt) + len(got) < WINDOW - 4:
            assert not decoder.windowed  # still on the window-free decoder
    assert decoder.windowed and decoder.rebuilds == 1  # moved once, before passing the window
    ref = _torch_greedy_cached(_reference(tiny_sliding_ckpt), np.array([prompt]), 170, tuple(model.stop_token_ids))
    assert got == ref


def _runtime_greedy_and_reference(package: Path, ckpt: Path, prompt_tokens: int, seed: int, new_tokens: int):
    """phi3_onnx.runtime's greedy tokens for a random prompt (every new token generated), the model and the
    decoder that made them, and transformers' greedy tokens for the same prompt."""
    model = load(package, device="cpu", max_length=256)
    prompt = _ids(prompt_tokens, seed=seed)[0].tolist()
    options = model.options(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    decoder = model.new_decoder(options, len(prompt))
    got = list(model.token_ids(decoder, prompt, options))
    ref = _torch_greedy_cached(_reference(ckpt), np.array([prompt]), new_tokens, tuple(model.stop_token_ids))
    return model, decoder, got, ref


def test_a_prompt_longer_than_the_window_starts_on_the_windowed_decoder(fp32_dual: Path, tiny_sliding_ckpt: Path) -> None:
    _, decoder, got, ref = _runtime_greedy_and_reference(fp32_dual, tiny_sliding_ckpt, 120, seed=4, new_tokens=20)
    assert decoder.windowed and decoder.rebuilds == 0
    assert got == ref


def test_engine_and_short_loads_pick_the_right_decoder(fp32_dual: Path, tiny_sliding_ckpt: Path) -> None:
    """genai's batching Engine runs the window-free decoder and cannot move a request, so it takes only turns
    that fit the window; the rest run on their own Generator (serve does that), exact either way."""
    import queue

    from phi3_onnx.runtime.batch import BatchEngine

    short = load(fp32_dual, device="cpu", max_length=WINDOW)  # no sequence can pass the window
    assert short.window_switch() is None
    long = load(fp32_dual, device="cpu", max_length=256)
    assert long.window_switch().after == WINDOW
    engine = BatchEngine(long).start()
    try:
        fits, passes = long.options(max_new_tokens=40, min_new_tokens=40), long.options(max_new_tokens=90)
        prompt = _ids(30, seed=6)[0].tolist()
        assert engine.accepts(fits, len(prompt)) and not engine.accepts(passes, len(prompt))
        with pytest.raises(Phi3OnnxError, match="sliding window"):
            engine.submit(prompt, passes, lambda event: None)
        events: queue.Queue = queue.Queue()
        engine.submit(prompt, fits, events.put)
        got = []
        while (event := events.get(timeout=60)).token is not None:
            got.append(event.token)
        ref = _torch_greedy_cached(_reference(tiny_sliding_ckpt), np.array([prompt]), 40, tuple(long.stop_token_ids))
        assert got == ref and long._og_windowed is None  # ran on the window-free decoder, exactly
    finally:
        engine.close()


def test_one_shot_generators_are_sized_to_the_call(fp32_dual: Path) -> None:
    """generate/stream size the KV cache to prompt + max_new_tokens (CUDA graphs attend over all of it);
    a call that cannot pass the window never loads the windowed decoder; a chat keeps max_length."""
    model = load(fp32_dual, device="cpu", max_length=256)
    short = model.new_decoder(model.options(max_new_tokens=20), prompt_length=30)
    assert short.max_length == 50
    model.generate("def join(a, b):", max_new_tokens=20)
    assert model._og_windowed is None  # 50 tokens fit the 100-token window
    assert model.new_decoder(model.options(max_new_tokens=1000), prompt_length=30).max_length == 256
    chat = model.chat()
    chat.send("hello", max_new_tokens=4)
    assert chat._decoder.max_length == 256


# ----------------------------------------------------------------------------- DirectML: the window in plain ops


@pytest.fixture(scope="module")
def dml_fp32(tiny_sliding_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int4-awq-dml's graph shape (separate q/k/v, RotaryEmbedding, position_ids) in fp32 without quantization."""
    target = dataclasses.replace(TARGETS["int4-awq-dml"], name="fp32-dml-shape", io_dtype="float32", quant=None)
    return export(tiny_sliding_ckpt, target, tmp_path_factory.mktemp("wf") / "dml-shape")


def _dml_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None], **_empty_past(sess)}
    return sess.run(["logits"], feed)[0][0]


def test_dml_window_is_applied_in_plain_ops(dml_fp32: Path, tiny_sliding_ckpt: Path) -> None:
    """ORT's DirectML GroupQueryAttention reads only query/key/value/seqlens_k (DmlOperatorGroupQueryAttention),
    so local_window_size does nothing there. The DML model.onnx attends over GQA's present K/V in plain ops with
    the window as a mask: equal to transformers past the window (160 tokens, window 100). Its copy takes GQA's
    own output with no window: what DirectML computes, equal inside the window only."""
    import torch

    assert read_manifest(dml_fp32).window_free_decoder == WINDOW_FREE_DECODER
    main = onnx.load(str(dml_fp32 / "model.onnx"), load_external_data=False).graph
    free = onnx.load(str(dml_fp32 / WINDOW_FREE_DECODER), load_external_data=False).graph
    n_layers = sum(n.op_type == "GroupQueryAttention" for n in main.node)
    assert sum(n.name.endswith("/attn/window/Softmax") for n in main.node) == n_layers
    assert not [n.name for n in free.node if "/window" in n.name]
    assert {_attrs(n)["local_window_size"] for n in free.node if n.op_type == "GroupQueryAttention"} == {-1}
    assert {i.name for i in free.initializer} <= {i.name for i in main.initializer}
    # what DirectML runs: the same graph with every GQA window ignored (beside model.onnx, for its weights file)
    for node in main.node:
        if node.op_type == "GroupQueryAttention":
            next(a for a in node.attribute if a.name == "local_window_size").i = -1
    as_dml = onnx.load(str(dml_fp32 / "model.onnx"), load_external_data=False)
    as_dml.graph.CopyFrom(main)
    onnx.save(as_dml, str(dml_fp32 / "model.as-dml.onnx"))
    ids = _ids(160, seed=8)
    with torch.no_grad():
        want = _reference(tiny_sliding_ckpt)(torch.from_numpy(ids)).logits[0].numpy()
    fast = _dml_logits(dml_fp32 / WINDOW_FREE_DECODER, ids)
    for name in ("model.onnx", "model.as-dml.onnx"):
        err = np.abs(_dml_logits(dml_fp32 / name, ids) - want).max() / np.ptp(want)
        assert err < 1e-4, (name, err)
    (dml_fp32 / "model.as-dml.onnx").unlink()
    diff = np.abs(fast - want).max(axis=-1)
    assert diff[:WINDOW].max() < 1e-4 * np.ptp(want) and diff[WINDOW:].min() > 1e-3


def test_dml_runtime_greedy_across_the_window_equals_transformers(dml_fp32: Path, tiny_sliding_ckpt: Path) -> None:
    """phi3_onnx.runtime runs the DML package's fast copy, then moves to the plain-op windowed graph (one
    re-prefill, genai's shared KV buffer) before passing the window: transformers' greedy tokens throughout."""
    model, decoder, got, ref = _runtime_greedy_and_reference(dml_fp32, tiny_sliding_ckpt, 30, seed=5, new_tokens=150)
    assert model.window_free == WINDOW_FREE_DECODER
    assert decoder.windowed and decoder.rebuilds == 1
    assert got == ref


def test_graph_capture_where_shapes_are_static(exported, tiny_ckpt: Path, tiny_sliding_ckpt: Path, dml_fp32: Path) -> None:
    """A replayed captured graph freezes shapes; the plain-op window attention's follow the sequence length.
    So a DML package of a sliding-window model turns capture off in genai_config (model.onnx, what plain genai
    runs), and the runtime turns it back on for the window-free decoder, a plain GQA graph; a DML package
    without a window and CUDA packages keep capture everywhere."""
    from phi3_onnx.runtime.model import decoder_provider_options

    def written(pkg: Path, ep: str) -> dict:
        return json.loads((pkg / "genai_config.json").read_text())["model"]["decoder"]["session_options"]["provider_options"][0][ep]

    windowed_dml = exported("int4-awq-dml", tiny_sliding_ckpt)
    assert written(windowed_dml, "dml") == {"enable_graph_capture": "0"}
    assert decoder_provider_options(windowed_dml, "dml", None) == {"enable_graph_capture": "0"}
    assert decoder_provider_options(windowed_dml, "dml", WINDOW_FREE_DECODER) == {"enable_graph_capture": "1"}
    assert written(exported("int4-awq-dml", tiny_ckpt), "dml") == {"enable_graph_capture": "1"}
    cuda = exported("int4-cuda", tiny_sliding_ckpt)
    assert written(cuda, "cuda") == {"enable_cuda_graph": "1"}
    assert decoder_provider_options(cuda, "cuda", WINDOW_FREE_DECODER) == {"enable_cuda_graph": "1"}
