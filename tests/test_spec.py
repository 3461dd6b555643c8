"""Config parsing: both config.json forms, the published presets, and what transformers makes of them."""

from __future__ import annotations

import json
import math

import pytest

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.checkpoint import PRESET_NAMES, preset, preset_config, spec_from_config, spec_from_folder


def _v5_form(cfg: dict) -> dict:
    """The transformers-5 spelling of a 4.x config: rope data moves into rope_parameters."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_scaling", None) or {}
    params = {"rope_theta": cfg.pop("rope_theta", 10000.0), "rope_type": "default",
              "partial_rotary_factor": cfg.pop("partial_rotary_factor", 1.0)}
    if rope:
        params |= {"rope_type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"],
                   "original_max_position_embeddings": cfg.pop("original_max_position_embeddings")}
    cfg["rope_parameters"] = params
    return cfg


# Phi3ForCausalLM presets: Phi-3-small's config (remote code, one form only, PretrainedConfig defaults such as
# tied embeddings) is not Phi3Config's; tests/test_phi3_small.py checks its preset
PHI3_PRESETS = [n for n in PRESET_NAMES if not n.startswith("phi3-small")]


@pytest.mark.parametrize("name", PHI3_PRESETS)
def test_both_config_forms_give_one_spec(name: str) -> None:
    cfg = preset_config(name)
    assert spec_from_config(_v5_form(cfg), name=name) == spec_from_config(cfg, name=name)


@pytest.mark.parametrize("name", PHI3_PRESETS)
def test_presets_match_transformers_reading(name: str) -> None:
    """Spec fields and the LongRoPE attention factor agree with transformers' own parsing."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = {k: v for k, v in preset_config(name).items() if not k.startswith("_") and k != "auto_map"}
    if (cfg.get("rope_scaling") or {}).get("type") == "su":  # transformers 5.23 no longer reads "su"; we do
        cfg["rope_scaling"] = dict(cfg["rope_scaling"], type="longrope")
    hf = Phi3Config(**cfg)
    spec = preset(name)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.vocab_size) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size)
    assert spec.max_position_embeddings == hf.max_position_embeddings
    assert spec.sliding_window == hf.sliding_window
    assert spec.tie_word_embeddings == hf.tie_word_embeddings
    head_dim = hf.hidden_size // hf.num_attention_heads
    assert spec.rotary_dim == int(head_dim * hf.rope_parameters.get("partial_rotary_factor", 1.0))
    kind = hf.rope_parameters["rope_type"]
    assert (spec.longrope is not None) == (kind == "longrope")
    if spec.longrope:
        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu")
        assert math.isclose(spec.longrope.attention_factor, attention_factor, rel_tol=1e-9)
        assert list(spec.longrope.long_factor) == hf.rope_parameters["long_factor"]
        assert spec.original_max_position_embeddings == hf.rope_parameters["original_max_position_embeddings"]


def test_known_preset_facts() -> None:
    mini = preset("phi3-mini-4k")
    assert (mini.hidden_size, mini.num_layers, mini.sliding_window, mini.attention_window) == (3072, 32, 2047, 2047)
    assert 3.7e9 < mini.num_params() < 3.9e9
    assert preset("phi3-medium-4k").num_kv_heads == 10
    long = preset("phi3-mini-128k")
    assert long.longrope and len(long.longrope.long_factor) == 48 and long.max_position_embeddings == 131072
    assert long.attention_window is None  # its 262144 window covers the whole context
    p4m = preset("phi4-mini-instruct")  # partial rotary 0.75: 96 of 128 dims, 48 LongRoPE factors; tied
    assert (p4m.head_dim, p4m.rotary_dim, len(p4m.longrope.long_factor), p4m.tie_word_embeddings) == (128, 96, 48, True)
    assert 3.7e9 < p4m.num_params() < 3.9e9 and p4m.vocab_size == 200064
    p4 = preset("phi4")
    assert (p4.num_heads, p4.num_kv_heads, p4.rope_theta, p4.longrope) == (40, 10, 250000.0, None)
    assert 14.5e9 < p4.num_params() < 14.8e9


def test_su_is_longrope_and_eos_from_generation_config() -> None:
    cfg = preset_config("phi3-mini-128k") | {}
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], type="su")
    assert spec_from_config(cfg).longrope == preset("phi3-mini-128k").longrope
    assert preset("phi3-mini-4k").eos_token_ids == (32000, 32001, 32007)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["Phi3SmallForCausalLM"]}, "Phi-3-small"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unsupported architecture"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor 1.5 gives rotary dim 144"),
        ({"partial_rotary_factor": 0.01}, "partial_rotary_factor 0.01 gives rotary dim 0"),
        ({"hidden_size": None}, "hidden_size must be an integer"),
        # issue 9: configs that used to export into wrong or unloadable packages
        ({"architectures": ["LlamaForCausalLM"], "model_type": "phi3"}, "unsupported architecture LlamaForCausalLM"),
        ({"model_type": "llama"}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"hidden_size": 3000}, "not divisible by num_attention_heads"),
        ({"num_key_value_heads": 5}, "not divisible by num_key_value_heads"),
        ({"hidden_size": 3072.5}, "hidden_size must be an integer, got 3072.5"),
        ({"max_position_embeddings": 1e9}, "max_position_embeddings must be an integer"),
        ({"num_hidden_layers": 1e9}, "num_hidden_layers must be an integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
        ({"intermediate_size": 0}, "intermediate_size must be >= 1"),
        ({"vocab_size": -5}, "vocab_size must be >= 1"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a positive finite number"),
        ({"rope_theta": -1}, "rope_theta must be a positive finite number"),
        ({"eos_token_id": 10**9}, "outside the vocabulary"),
        ({"eos_token_id": "end"}, "eos_token_id must be a token id"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"sliding_window": 20.5}, "sliding_window must be an integer"),
        ({"architectures": "Phi3ForCausalLM"}, "architectures must be a list"),
    ],
)
def test_unsupported_configs_are_one_line_errors(change: dict, message: str) -> None:
    cfg = preset_config("phi3-mini-4k") | change
    with pytest.raises(Phi3OnnxError, match=message) as info:
        spec_from_config(cfg)
    assert "\n" not in str(info.value)


def test_tiny_checkpoint_stops_at_end_token(tiny_ckpt) -> None:
    """<|end|> ends a chat turn: it must be among the eos ids even where config.json names one eos."""
    spec = spec_from_folder(tiny_ckpt)
    added = {t["content"]: t["id"] for t in json.loads((tiny_ckpt / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|end|>"] in spec.eos_token_ids and added["<|endoftext|>"] in spec.eos_token_ids
