"""config.json → ModelSpec: both config forms found in the wild, resolved in one place."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import LongRope, ModelSpec

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM",)
_UNSUPPORTED_HINTS = {
    "Phi3SmallForCausalLM": "Phi-3-small (blocksparse attention) is not supported yet",
    "Phi3VForCausalLM": "Phi-3-vision is not supported yet",
    "PhiMoEForCausalLM": "Phi-3.5-MoE is not supported yet",
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
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _UNSUPPORTED_HINTS:
            raise Phi3OnnxError(f"{arch}: {_UNSUPPORTED_HINTS[arch]}")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and cfg.get("model_type") != "phi3":
        found = ", ".join(archs) or cfg.get("model_type") or "unknown"
        raise Phi3OnnxError(f"unsupported architecture {found}: phi3-onnx exports Phi3ForCausalLM checkpoints")


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge the transformers-4 (`rope_scaling` + top-level keys) and -5 (`rope_parameters`) forms."""
    merged: dict[str, Any] = {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_type": "default"}
    for key in ("rope_scaling", "rope_parameters"):
        block = cfg.get(key)
        if isinstance(block, dict):
            merged.update(block)
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if merged.get("type") and merged.get("rope_type") == "default":
        kind = merged["type"]
    merged["rope_type"] = "longrope" if kind == "su" else kind
    return merged


def _longrope(rope: dict[str, Any], cfg: dict[str, Any], head_dim: int, orig: int) -> LongRope:
    short, long = rope.get("short_factor"), rope.get("long_factor")
    if not isinstance(short, list) or not isinstance(long, list):
        raise Phi3OnnxError("longrope config needs short_factor and long_factor lists")
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise Phi3OnnxError(f"longrope factors must have head_dim/2 = {head_dim // 2} entries")
    factor = rope.get("factor") or cfg["max_position_embeddings"] / orig
    attn = rope.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return LongRope(tuple(map(float, short)), tuple(map(float, long)), float(attn))


def spec_from_config(cfg: dict[str, Any], name: str = "phi3", generation_eos: list[int] | None = None) -> ModelSpec:
    """One typed spec from either config.json form found in the wild."""
    _check_architecture(cfg)
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = hidden // heads
        if cfg.get("head_dim") not in (None, head_dim):
            raise Phi3OnnxError(f"head_dim {cfg['head_dim']} != hidden_size/num_attention_heads is not supported")
        rope = _rope_params(cfg)
        if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise Phi3OnnxError("partial rotary embeddings are not supported (this is not a Phi-3 config)")
        max_pos = int(cfg["max_position_embeddings"])
        orig = int(rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_pos)
        if rope["rope_type"] not in ("default", "longrope"):
            raise Phi3OnnxError(f"rope type {rope['rope_type']!r} is not supported (Phi-3 uses default or longrope)")
        longrope = _longrope(rope, cfg, head_dim, orig) if rope["rope_type"] == "longrope" else None
        eos = generation_eos or cfg.get("eos_token_id") or []
        eos = [eos] if isinstance(eos, int) else list(eos)
        return ModelSpec(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=max_pos,
            original_max_position_embeddings=orig,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
            longrope=longrope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=int(cfg.get("bos_token_id") or 1),
            eos_token_ids=tuple(int(e) for e in eos),
            pad_token_id=int(cfg["pad_token_id"] if cfg.get("pad_token_id") is not None else eos[0] if eos else 0),
            name=name,
        )
    except KeyError as exc:
        raise Phi3OnnxError(f"config.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise Phi3OnnxError(f"config.json has a malformed value ({exc})") from None
