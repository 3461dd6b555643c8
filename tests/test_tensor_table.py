"""The tensor-name table (checkpoint/tensors.py) against a real checkpoint and the stages that use it."""

from __future__ import annotations

import pytest

from phi3_onnx.checkpoint import SafetensorsCheckpoint, spec_from_folder
from phi3_onnx.checkpoint.tensors import TENSORS, expected_tensors, parse_name, tensor_name
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.quantize import QUANTIZERS
from phi3_onnx.targets import TARGETS


def test_table_names_exactly_the_committed_checkpoint(tiny_ckpt):
    """Every tensor of the trained tiny checkpoint is in the table, with the table's shape, and nothing is left over."""
    ckpt, spec = SafetensorsCheckpoint(tiny_ckpt), spec_from_folder(tiny_ckpt)
    expected = expected_tensors(spec)
    assert set(expected) == set(ckpt.entries)
    assert all(ckpt.shape(n) == s for n, s in expected.items())


@pytest.mark.parametrize("role", list(TENSORS))
def test_names_parse_back_to_their_role(role):
    layer = 7 if TENSORS[role].per_layer else None
    key = parse_name(tensor_name(role, layer))
    assert (key.role, key.layer) == (role, layer)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.x.mlp.down_proj.weight",
                                  "lm_head.bias", "model.embed_tokens.weight.extra", ""])
def test_unknown_names_are_errors_not_fall_throughs(name):
    with pytest.raises(Phi3OnnxError, match="unknown checkpoint tensor"):
        parse_name(name)


def test_unknown_role_and_layer_misuse_are_errors():
    with pytest.raises(Phi3OnnxError, match="unknown tensor role"):
        tensor_name("q_proj", 0)
    with pytest.raises(Phi3OnnxError, match="needs a layer"):
        tensor_name("qkv_proj")
    with pytest.raises(Phi3OnnxError, match="takes no layer"):
        tensor_name("lm_head", 3)


def test_tied_embeddings_have_no_lm_head(tiny_ckpt):
    import dataclasses

    spec = dataclasses.replace(spec_from_folder(tiny_ckpt), tie_word_embeddings=True)
    assert "lm_head.weight" not in expected_tensors(spec)


def test_every_target_method_has_a_quantizer():
    methods = {t.quant.method for t in TARGETS.values() if t.quant}
    assert methods <= set(QUANTIZERS), methods - set(QUANTIZERS)


def test_registries_refuse_a_duplicate_name():
    from phi3_onnx.registry import registry

    with pytest.raises(ValueError, match="duplicate thing a"):
        registry(["a", "b", "a"], key=str, what="thing")
    assert list(registry(["b", "a"], key=str, what="thing")) == ["b", "a"]


def test_provider_registry_drives_every_stage():
    """One row per EP: each target's provider is registered, auto prefers CUDA > DirectML > CPU, genai_config
    carries the row's options, and a GPU EP is usable only with its probed device present."""
    from phi3_onnx.evaluate.sources import EP_NAMES
    from phi3_onnx.package.genai_config import genai_config
    from phi3_onnx.runtime.providers import Environment
    from phi3_onnx.checkpoint import preset
    from phi3_onnx.targets.providers import PROVIDER_ORDER, PROVIDERS

    assert PROVIDER_ORDER == ("cuda", "dml", "cpu")
    assert {t.provider for t in TARGETS.values()} <= set(PROVIDERS)
    assert EP_NAMES == {n: p.ort_name for n, p in PROVIDERS.items()}
    for name, dml_capture in (("phi3-mini-128k", "1"), ("phi3-mini-4k", "0")):  # 4k: DML's window is in plain ops
        spec = preset(name)
        for target in TARGETS.values():
            session = genai_config(spec, target, 64)["model"]["decoder"]["session_options"]
            want = PROVIDERS[target.provider].provider_options()
            if target.provider == "dml":
                want = [{"dml": {"enable_graph_capture": dml_capture}}]
            assert session["provider_options"] == want
    installed = tuple(p.ort_name for p in PROVIDERS.values())
    assert not Environment(installed, cuda_devices=0).usable("cuda")
    assert Environment(installed, cuda_devices=1).usable("cuda") and Environment(installed).usable("cpu")
