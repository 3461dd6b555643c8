"""Structure of every registered target's graph (tiny checkpoint and its LongRoPE variant).

Parametrized over `phi3_onnx.targets.TARGETS`, so a new target cannot skip these checks. They are
what can be checked off Windows for DirectML, and before a GPU for CUDA: op types and their
attributes/inputs as of ONNX Runtime 1.24 (the oldest runtime the GPU/DML packages aim at), no
control flow (If/Loop/Scan break DML graphs and CUDA graph capture), opsets, I/O dtypes, and the
genai_config keys onnxruntime-genai 0.14 reads.

AWQ targets are exported here with `weights=<the checkpoint>`: these are STRUCTURE tests of the
graph shape only (the AWQ quantizer and its numerics are tested by its own module).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import onnx
import pytest

from phi3_onnx.checkpoint import SafetensorsCheckpoint
from phi3_onnx.manifest import read_manifest
from phi3_onnx.targets import TARGETS, Target

MAX_OPSET = 21  # ORT 1.24 (DirectML's) runs opset <= 23; we stay at 21 like the model builder of genai 0.14
CONTROL_FLOW = {"If", "Loop", "Scan"}
ALLOWED_OPS = {
    "": {"Gather", "SimplifiedLayerNormalization", "MatMul", "Split", "Sigmoid", "Mul", "Add", "Sub", "ReduceSum",
         "ReduceMax", "Cast", "Shape", "Squeeze", "Unsqueeze", "Greater", "Slice", "Where", "Range"},
    "com.microsoft": {"SkipSimplifiedLayerNormalization", "MatMulNBits", "GroupQueryAttention", "RotaryEmbedding"},
}
# attributes each contrib op had in ORT 1.24 (a newer attribute would fail to load there)
ORT_1_24_ATTRS = {
    "GroupQueryAttention": {"num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary",
                            "rotary_interleaved", "smooth_softmax", "qk_output"},
    "RotaryEmbedding": {"interleaved", "num_heads", "rotary_embedding_dim", "scale", "is_packed_batching"},
    "MatMulNBits": {"K", "N", "bits", "block_size", "accuracy_level"},
    "SkipSimplifiedLayerNormalization": {"epsilon"},
}
GQA_MAX_INPUTS = 9  # query..sin_cache; position_ids/attention_bias/head_sink (9+) are newer
GENAI_014_DECODER_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_names", "past_value_names"}
ONNX_DTYPE = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


@cache
def _plain_weights(ckpt: Path) -> SafetensorsCheckpoint:
    return SafetensorsCheckpoint(ckpt)  # one object per checkpoint, so `exported` caches the export


def _export(exported, target: Target, ckpt: Path) -> Path:
    """AWQ targets: structure only, with the plain checkpoint as the weight source."""
    if target.quant is not None and target.quant.method == "awq":
        return exported(target.name, ckpt, weights=_plain_weights(ckpt))
    return exported(target.name, ckpt)


@pytest.fixture(params=["plain", "longrope"])
def ckpt(request, tiny_ckpt: Path, tiny_longrope_ckpt: Path) -> Path:
    return tiny_longrope_ckpt if request.param == "longrope" else tiny_ckpt


@pytest.fixture(params=sorted(TARGETS))
def package(request, exported, ckpt: Path) -> tuple[Target, Path, onnx.ModelProto]:
    target = TARGETS[request.param]
    folder = _export(exported, target, ckpt)
    return target, folder, onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _all_nodes(sub)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_no_control_flow_and_known_ops(package) -> None:
    target, _, model = package
    ops = {(n.domain or "", n.op_type) for n in _all_nodes(model.graph)}
    assert not {op for _, op in ops} & CONTROL_FLOW
    unknown = {(d, op) for d, op in ops if op not in ALLOWED_OPS.get(d, set())}
    assert not unknown, f"{target.name}: ops outside the DML/CUDA-safe set: {unknown}"


def test_opsets(package) -> None:
    _, _, model = package
    opsets = {o.domain or "": o.version for o in model.opset_import}
    assert opsets[""] <= MAX_OPSET and opsets["com.microsoft"] == 1


def test_contrib_op_attributes_and_inputs_as_of_ort_1_24(package) -> None:
    target, _, model = package
    for node in _all_nodes(model.graph):
        if node.domain == "com.microsoft":
            assert set(_attrs(node)) <= ORT_1_24_ATTRS[node.op_type], node.name
        if node.op_type == "GroupQueryAttention":
            assert len(node.input) <= GQA_MAX_INPUTS, node.name


def test_attention_shape_follows_graph_options(package) -> None:
    target, folder, model = package
    spec, opts = read_manifest(folder).model, target.graph
    counts = Counter(n.op_type for n in model.graph.node)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == spec.num_layers
    assert counts["RotaryEmbedding"] == (0 if opts.rotary_in_attention else 2 * spec.num_layers)
    for node in gqa:
        attrs = _attrs(node)
        assert attrs["do_rotary"] == int(opts.rotary_in_attention)
        assert bool(node.input[1]) == (not opts.packed_qkv)  # separate key input only when unpacked
        assert len(node.input) == (9 if opts.rotary_in_attention else 7)
    names = {n.name for n in model.graph.node}
    proj = ["qkv_proj"] if opts.packed_qkv else ["q_proj", "k_proj", "v_proj"]
    kind = "MatMulNBits" if target.quant else "MatMul"
    for part in proj:
        assert f"/model/layers.0/attn/{part}/{kind}" in names
    mlp = ["gate_up_proj"] if opts.packed_gate_up else ["gate_proj", "up_proj"]
    for part in mlp:
        assert f"/model/layers.0/mlp/{part}/{kind}" in names
    assert counts["Split"] == spec.num_layers * (int(opts.packed_gate_up) + int(opts.packed_qkv and not opts.rotary_in_attention))


def test_matmuls_match_quant_recipe(package) -> None:
    target, folder, model = package
    spec = read_manifest(folder).model
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    floats = [n for n in model.graph.node if n.op_type == "MatMul"]
    opts = target.graph
    per_layer = (1 if opts.packed_qkv else 3) + 1 + (1 if opts.packed_gate_up else 2) + 1  # qkv|q,k,v; o; gate_up|gate,up; down
    expected = spec.num_layers * per_layer + 1  # + lm_head
    if target.quant is None:
        assert not nbits and len(floats) == expected
        return
    assert not floats and len(nbits) == expected
    for node in nbits:
        attrs = _attrs(node)
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (
            target.quant.bits, target.quant.block_size, target.quant.accuracy_level
        ), node.name


def test_io_and_initializer_dtypes(package) -> None:
    target, _, model = package
    io = ONNX_DTYPE[target.io_dtype]
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    outputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.output}
    assert inputs.pop("input_ids") == inputs.pop("attention_mask") == onnx.TensorProto.INT64
    assert ("position_ids" in inputs) == target.graph.position_ids_input
    assert inputs.pop("position_ids", onnx.TensorProto.INT64) == onnx.TensorProto.INT64
    assert set(inputs.values()) == {io} and set(outputs.values()) == {io}
    float_inits = {i.data_type for i in model.graph.initializer} & set(ONNX_DTYPE.values())
    assert float_inits == {io}, f"{target.name}: float initializers {float_inits}, expected only {io}"


def test_genai_config_provider_and_inputs(package) -> None:
    target, folder, _ = package
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    provider_options = decoder["session_options"]["provider_options"]
    assert [next(iter(p)) for p in provider_options] == ([] if target.provider == "cpu" else [target.provider])
    if target.provider == "cuda":
        assert provider_options[0]["cuda"]["enable_cuda_graph"] == "1"
    assert set(decoder["inputs"]) <= GENAI_014_DECODER_INPUTS
    assert ("position_ids" in decoder["inputs"]) == target.graph.position_ids_input


def test_longrope_selection_has_no_host_read(exported, tiny_longrope_ckpt: Path) -> None:
    """LongRoPE picks its rows with Where on the device: Slice bounds come from shapes only.

    A Slice whose start depended on the mask's values would need a device-to-host copy, which
    CUDA graph capture cannot hold (a replay would keep the captured choice).
    """
    model = onnx.load(str(exported("fp16-cuda", tiny_longrope_ckpt) / "model.onnx"), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}

    def depends_on_mask_values(name: str, seen: set[str]) -> bool:
        node = producers.get(name)
        if node is None or name in seen or node.op_type == "Shape":
            return False
        seen.add(name)
        return node.op_type == "ReduceSum" or any(depends_on_mask_values(i, seen) for i in node.input if i)

    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    assert slices and [n.op_type for n in model.graph.node].count("Where") == 2
    for node in slices:
        assert not any(depends_on_mask_values(i, set()) for i in node.input[1:]), node.name


def test_gpu_targets_share_kv_buffers_for_graph_capture(package) -> None:
    """CUDA graphs / DML graph capture need genai's static past==present buffers."""
    target, folder, _ = package
    search = json.loads((folder / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] is True


def test_int4_cuda_block_size_override(exported, tiny_ckpt: Path) -> None:
    model = onnx.load(str(exported("int4-cuda", tiny_ckpt, block_size=128) / "model.onnx"), load_external_data=False)
    sizes = {_attrs(n)["block_size"] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert sizes == {128}
