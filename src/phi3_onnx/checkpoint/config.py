"""config.json → ModelSpec: both config forms found in the wild, resolved in one place."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from phi3_onnx.checkpoint.phi3_small import is_phi3_small, spec_from_small_config
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import LongRope, ModelSpec, MoeSpec

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM", "PhimoeForCausalLM", "PhiMoEForCausalLM", "Phi3SmallForCausalLM")
# model_type -> the architectures it may name (the hub's Phi-3.5-MoE config spells it PhiMoEForCausalLM);
# Phi-3-small configs (model_type phi3small) are read by checkpoint.phi3_small before this check
_MODEL_TYPES = {"phi3": ("Phi3ForCausalLM",), "phimoe": ("PhimoeForCausalLM", "PhiMoEForCausalLM")}
_UNSUPPORTED_HINTS = {
    "Phi3VForCausalLM": "Phi-3-vision is not supported yet",
}


def load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise Phi3OnnxError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Phi3OnnxError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(cfg, dict):
        raise Phi3OnnxError(f"{path} is not a JSON object")
    return cfg


def _generation_eos(folder: Path) -> list[int] | None:
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [eos] if isinstance(eos, int) else eos


CHAT_STOP_TOKENS = ("<|end|>", "<|endoftext|>")


def _chat_stop_ids(folder: Path) -> list[int]:
    """Ids of Phi-3's end-of-turn tokens, so generation stops at <|end|> even if the config omits it."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    try:
        added = json.loads(path.read_text()).get("added_tokens", [])
    except (json.JSONDecodeError, AttributeError):
        return []
    return [t["id"] for t in added if t.get("content") in CHAT_STOP_TOKENS]


def spec_from_folder(folder: Path) -> ModelSpec:
    cfg = load_config(folder)
    eos = _generation_eos(folder) or _config_eos(cfg)
    eos = list(dict.fromkeys([*eos, *_chat_stop_ids(folder)]))
    return spec_from_config(cfg, name=folder.name, generation_eos=eos or None)


def _config_eos(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def _check_architecture(cfg: dict[str, Any]) -> None:
    archs = cfg.get("architectures")
    if archs is None:
        archs = []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise Phi3OnnxError(f"config.json: architectures must be a list of names, got {archs!r}")
    for arch in archs:
        if arch in _UNSUPPORTED_HINTS:
            raise Phi3OnnxError(f"{arch}: {_UNSUPPORTED_HINTS[arch]}")
    model_type = cfg.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise Phi3OnnxError(f"config.json: model_type must be a string, got {model_type!r:.80}")
    known = _MODEL_TYPES.get(model_type, ()) if model_type is not None else SUPPORTED_ARCHITECTURES
    if model_type is not None and model_type not in _MODEL_TYPES or archs and not any(a in known for a in archs):
        found = ", ".join(archs) or str(model_type)
        raise Phi3OnnxError(f"unsupported architecture {found} (model_type {model_type!r}): "
                            "phi3-onnx exports Phi3ForCausalLM (model_type phi3), PhimoeForCausalLM (phimoe) and "
                            "Phi3SmallForCausalLM (phi3small) checkpoints")
    if not archs and model_type is None:
        raise Phi3OnnxError("config.json names neither architectures nor model_type: not a Phi-3 config")


def _is_phimoe(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "phimoe" or any(a in _MODEL_TYPES["phimoe"] for a in cfg.get("architectures") or [])


_MISSING = object()


def _int(cfg: dict[str, Any], key: str, default: Any = _MISSING, minimum: int = 1) -> int:
    """An integer field: JSON floats (1e9, 64.5) and booleans are refused, never truncated."""
    value = cfg.get(key, _MISSING)
    if value is _MISSING or value is None and default is not _MISSING:
        value = default
    if value is _MISSING:
        raise Phi3OnnxError(f"config.json lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise Phi3OnnxError(f"config.json: {key} must be an integer, got {value!r}")
    if value < minimum:
        raise Phi3OnnxError(f"config.json: {key} must be >= {minimum}, got {value}")
    return value


def _float(cfg: dict[str, Any], key: str, default: float) -> float:
    """A positive finite number."""
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise Phi3OnnxError(f"config.json: {key} must be a positive finite number, got {value!r}")
    return float(value)


def _token_ids(value: Any, key: str) -> list[int]:
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise Phi3OnnxError(f"config.json: {key} must be a token id or a list of token ids, got {value!r}")
    return ids


_SUPPORTED_ACTIVATIONS = ("silu",)


def _check_heads(hidden: int, heads: int, kv_heads: int) -> None:
    if hidden % heads:
        raise Phi3OnnxError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv_heads:
        raise Phi3OnnxError(f"config.json: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    if (hidden // heads) % 2:
        raise Phi3OnnxError(f"config.json: head size {hidden // heads} is odd (rotary embeddings need an even one)")


def _check_token_ids(vocab: int, ids: dict[str, list[int]]) -> None:
    for key, values in ids.items():
        bad = [i for i in values if i >= vocab]
        if bad:
            raise Phi3OnnxError(f"config.json: {key} {bad[0]} is outside the vocabulary (vocab_size {vocab})")


def _check_activation(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTIVATIONS:
        raise Phi3OnnxError(f"config.json: hidden_act {act!r} is not supported (Phi-3 uses silu)")


def _rope_params(cfg: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """Merge the transformers-4 (`rope_scaling` + top-level keys) and -5 (`rope_parameters`) forms."""
    merged: dict[str, Any] = {"rope_theta": cfg.get("rope_theta", default_theta), "rope_type": "default"}
    for key in ("rope_scaling", "rope_parameters"):
        block = cfg.get(key)
        if isinstance(block, dict):
            merged.update(block)
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if merged.get("type") and merged.get("rope_type") == "default":
        kind = merged["type"]
    merged["rope_type"] = "longrope" if kind == "su" else kind
    return merged


def _partial_rotary(rope: dict[str, Any], cfg: dict[str, Any], head_dim: int) -> float:
    """partial_rotary_factor (top level in transformers 4 configs, in rope_parameters in 5): 0 < f <= 1, even rotary dim."""
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    factor = 1.0 if factor is None else _float({"partial_rotary_factor": factor}, "partial_rotary_factor", 1.0)
    rotary = int(head_dim * factor)
    if factor > 1.0 or rotary < 2 or rotary % 2:
        raise Phi3OnnxError(f"config.json: partial_rotary_factor {factor} gives rotary dim {rotary} of head size {head_dim}; "
                            "it must be an even number of dims, at most the head size")
    return factor


def _factors(rope: dict[str, Any], key: str, count: int) -> tuple[float, ...]:
    values = rope.get(key)
    if not isinstance(values, list):
        raise Phi3OnnxError(f"config.json: longrope config needs a {key} list")
    if len(values) != count:
        raise Phi3OnnxError(f"config.json: longrope {key} must have rotary_dim/2 = {count} entries, got {len(values)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        raise Phi3OnnxError(f"config.json: longrope {key} must hold positive finite numbers")
    return tuple(float(v) for v in values)


def _longrope(rope: dict[str, Any], max_pos: int, rotary_dim: int, orig: int, phimoe: bool = False) -> LongRope:
    short, long = _factors(rope, "short_factor", rotary_dim // 2), _factors(rope, "long_factor", rotary_dim // 2)
    if phimoe:  # Phimoe's rotary scales cos/sin by short_mscale / long_mscale (both required), never attention_factor
        if rope.get("short_mscale") is None or rope.get("long_mscale") is None:
            raise Phi3OnnxError("config.json: a Phi-3.5-MoE longrope config needs short_mscale and long_mscale")
        return LongRope(short, long, _float(rope, "short_mscale", 1.0), _float(rope, "long_mscale", 1.0))
    factor = _float(rope, "factor", max_pos / orig)
    attn = rope.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return LongRope(short, long, _float({"attention_factor": attn}, "attention_factor", 1.0))


def spec_from_config(cfg: dict[str, Any], name: str = "phi3", generation_eos: list[int] | None = None) -> ModelSpec:
    """One typed spec from either config.json form found in the wild; every field checked, none truncated."""
    if is_phi3_small(cfg):
        return spec_from_small_config(cfg, name, generation_eos, _int, _phi3_spec)
    _check_architecture(cfg)
    _check_activation(cfg)
    return _phi3_spec(cfg, name, generation_eos)


def _phi3_spec(cfg: dict[str, Any], name: str = "phi3", generation_eos: list[int] | None = None) -> ModelSpec:
    hidden, heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads", heads)
    vocab = _int(cfg, "vocab_size")
    _check_heads(hidden, heads, kv_heads)
    head_dim = hidden // heads
    if cfg.get("head_dim") is not None and cfg.get("head_dim") != head_dim:
        raise Phi3OnnxError(f"config.json: head_dim {cfg['head_dim']!r} != hidden_size/num_attention_heads is not supported")
    rope = _rope_params(cfg, 1e6 if _is_phimoe(cfg) else 10000.0)  # PhimoeConfig.default_theta is 1e6
    partial = _partial_rotary(rope, cfg, hidden // heads)
    max_pos = _int(cfg, "max_position_embeddings")
    orig_key = "original_max_position_embeddings"
    orig = _int(rope if rope.get(orig_key) is not None else cfg, orig_key, max_pos)
    if rope["rope_type"] not in ("default", "longrope"):
        raise Phi3OnnxError(f"rope type {rope['rope_type']!r} is not supported (Phi-3 uses default or longrope)")
    eos = _token_ids(generation_eos if generation_eos else cfg.get("eos_token_id") or [], "eos_token_id")
    pad = cfg.get("pad_token_id")
    pad = (eos[0] if eos else 0) if pad is None else _int(cfg, "pad_token_id", minimum=0)
    bos = _int(cfg, "bos_token_id", 1, minimum=0)
    _check_token_ids(vocab, {"eos_token_id": eos, "pad_token_id": [pad], "bos_token_id": [bos]})
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise Phi3OnnxError(f"config.json: tie_word_embeddings must be true or false, got {tied!r}")
    window = cfg.get("sliding_window")
    phimoe = _is_phimoe(cfg)
    return ModelSpec(
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size"),
        num_layers=_int(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        rope_theta=_float(rope, "rope_theta", 1e6 if phimoe else 10000.0),
        rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-5),
        sliding_window=_int(cfg, "sliding_window") if window else None,
        longrope=_longrope(rope, max_pos, int(hidden // heads * partial), orig, phimoe) if rope["rope_type"] == "longrope" else None,
        partial_rotary_factor=partial,
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_ids=tuple(eos),
        pad_token_id=pad,
        name=name,
        **(_phimoe_fields(cfg) if phimoe else {}),
    )


def _bool(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise Phi3OnnxError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _phimoe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """What PhimoeConfig adds: LayerNorm (eps = rms_norm_eps), biases, and the sparsemixer-routed experts.

    input_jitter_noise only perturbs training inputs; router_jitter_noise is sparsemixer's inference threshold.
    """
    experts, top_k = _int(cfg, "num_local_experts", 16), _int(cfg, "num_experts_per_tok", 2)
    if top_k != 2:
        raise Phi3OnnxError(f"config.json: num_experts_per_tok {top_k} is not supported (Phi-3.5-MoE's sparsemixer routes to 2 experts)")
    if experts < 2:
        raise Phi3OnnxError(f"config.json: num_local_experts must be >= 2, got {experts}")
    eps = cfg.get("router_jitter_noise", 0.01)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise Phi3OnnxError(f"config.json: router_jitter_noise must be a finite number >= 0, got {eps!r}")
    return {"architecture": "PhimoeForCausalLM", "norm": "layer", "attention_bias": _bool(cfg, "attention_bias", False),
            "lm_head_bias": _bool(cfg, "lm_head_bias", False), "moe": MoeSpec(experts, top_k, float(eps))}
