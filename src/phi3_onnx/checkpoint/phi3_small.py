"""Phi-3-small (Phi3SmallForCausalLM, model_type phi3small): its config.json keys and its tensors.

Its checkpoint names and lays out tensors its own way; `Phi3SmallCheckpoint` serves them under the
Phi-3 names of `checkpoint.tensors` (biases as `<weight name without "weight">bias`), so every later stage
reads one layout:

    Phi-3-small tensor                                    served as (Phi-3 name)            layout change
    model.layers.{l}.self_attn.query_key_value.{w,b}      ...self_attn.qkv_proj.{w,b}       per-KV-group [q.. k v] -> [q | k | v]
    model.layers.{l}.self_attn.dense.{w,b}                ...self_attn.o_proj.{w,b}
    model.layers.{l}.mlp.up_proj.{w,b}                    ...mlp.gate_up_proj.{w,b}         interleaved (gelu, linear) rows -> [gelu | linear]
    model.layers.{l}.mlp.down_proj.{w,b}                  ...mlp.down_proj.{w,b}
    model.layers.{l}.{input,post_attention}_layernorm.{w,b}  the same
    model.final_layernorm.{w,b}                           model.norm.{w,b}
    model.embed_tokens.weight, lm_head.weight (untied)    the same
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint, TensorEntry
from phi3_onnx.checkpoint.tensors import TensorShapes, tensor_name, unused_after_shapes
from phi3_onnx.checkpoint.tiktoken import RESERVED, chat_stop_ids
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import ModelSpec, SmallSpec

ARCHITECTURE = "Phi3SmallForCausalLM"
MODEL_TYPE = "phi3small"


def is_phi3_small(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures")
    return cfg.get("model_type") == MODEL_TYPE or (isinstance(archs, list) and ARCHITECTURE in archs)


def bias_name(role: str, layer: int | None = None) -> str:
    """The served (Phi-3-style) name of a linear's or norm's bias: `...qkv_proj.bias`."""
    return tensor_name(role, layer).removesuffix("weight") + "bias"


# ----------------------------------------------------------------------------- config.json -> ModelSpec


def _number(cfg: dict[str, Any], key: str, default: float | None, positive: bool = True) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise Phi3OnnxError(f"config.json: {key} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return float(value)


def _flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise Phi3OnnxError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _intermediate(cfg: dict[str, Any], hidden: int, as_int: Callable[..., int]) -> int:
    """ff_intermediate_size, else ff_dim_multiplier * (hidden // 3) * 2, padded to 256 with gegelu_pad_to_256."""
    if cfg.get("ff_intermediate_size") is not None:
        return as_int(cfg, "ff_intermediate_size")
    if cfg.get("ff_dim_multiplier") is None:
        raise Phi3OnnxError("config.json lacks 'ff_intermediate_size' (and 'ff_dim_multiplier')")
    size = as_int(cfg, "ff_dim_multiplier") * (hidden // 3) * 2
    return -(-size // 256) * 256 if _flag(cfg, "gegelu_pad_to_256", True) else size


def _small(cfg: dict[str, Any], heads: int, head_dim: int, as_int: Callable[..., int]) -> SmallSpec:
    use_scaling = _flag(cfg, "mup_use_scaling", True)
    attn_mult = _number(cfg, "mup_attn_multiplier", 1.0)
    dummies = cfg.get("dummy_token_indices") or []
    if not isinstance(dummies, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg["vocab_size"]
                                                 for i in dummies):
        raise Phi3OnnxError(f"config.json: dummy_token_indices must be token ids below vocab_size, got {str(dummies)[:80]}")
    small = SmallSpec(
        block_size=as_int(cfg, "blocksparse_block_size", 64),
        local_blocks=as_int(cfg, "blocksparse_num_local_blocks", 16),
        vert_stride=as_int(cfg, "blocksparse_vert_stride", 8),
        homo_head_pattern=_flag(cfg, "blocksparse_homo_head_pattern", False),
        dense_every=as_int(cfg, "dense_attention_every_n_layers", 0, minimum=0),
        gegelu_limit=_number(cfg, "gegelu_limit", None),
        embedding_multiplier=_number(cfg, "mup_embedding_multiplier", 0.0, positive=False),
        width_multiplier=_number(cfg, "mup_width_multiplier", 1.0),
        attention_scale=attn_mult / head_dim if use_scaling else 1.0 / math.sqrt(head_dim),
        dummy_token_ids=tuple(sorted(set(dummies))),
    )
    kernel = cfg.get("blocksparse_triton_kernel_block_size", small.block_size)
    if kernel != small.block_size:
        raise Phi3OnnxError(f"config.json: blocksparse_triton_kernel_block_size {kernel!r} != blocksparse_block_size "
                            f"{small.block_size} is not supported")
    return small


def spec_from_small_config(cfg: dict[str, Any], name: str, generation_eos: list[int] | None,
                           as_int: Callable[..., int], rope_spec: Callable[..., dict[str, Any]]) -> ModelSpec:
    """Phi-3-small's config.json -> ModelSpec (the integer and rope readers are config.py's, passed in)."""
    if cfg.get("hidden_act", "gegelu") != "gegelu":
        raise Phi3OnnxError(f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported (Phi-3-small uses gegelu)")
    if _number(cfg, "rope_position_scale", 1.0) != 1.0:
        raise Phi3OnnxError(f"config.json: rope_position_scale {cfg['rope_position_scale']!r} is not supported (only 1.0)")
    hidden, heads = as_int(cfg, "hidden_size"), as_int(cfg, "num_attention_heads")
    vocab = as_int(cfg, "vocab_size")
    rope_cfg = {k: v for k, v in cfg.items() if k not in ("hidden_act", "rms_norm_eps", "intermediate_size")}
    rope_cfg |= {"rope_theta": cfg.get("rope_embedding_base", 1_000_000.0), "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
                 "intermediate_size": _intermediate(cfg, hidden, as_int), "hidden_act": "silu",
                 "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}  # PretrainedConfig's default: tied
    eos = generation_eos or ([cfg["eos_token_id"]] if isinstance(cfg.get("eos_token_id"), int) else list(cfg.get("eos_token_id") or []))
    if vocab > RESERVED:  # <|end|> and <|endoftext|> of the tokenizer's layout
        eos = list(dict.fromkeys([*eos, *chat_stop_ids(vocab)]))
    base = rope_spec(rope_cfg, name=name, generation_eos=eos or None)
    return _with_small(base, _small(cfg, heads, base.head_dim, as_int))


def _with_small(base: ModelSpec, small: SmallSpec) -> ModelSpec:
    import dataclasses

    return dataclasses.replace(base, architecture=ARCHITECTURE, norm="layer", attention_bias=True, small=small)


# ----------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Row:
    role: str  # the Phi-3 role it is served as (checkpoint.tensors)
    template: str  # Phi-3-small's own name, "{layer}" for per-layer tensors
    bias: bool  # also has a .bias
    shape: Callable[[ModelSpec], tuple[int, ...]]


SMALL_TENSORS: tuple[_Row, ...] = (
    _Row("embed_tokens", "model.embed_tokens.weight", False, lambda s: (s.vocab_size, s.hidden_size)),
    _Row("input_layernorm", "model.layers.{layer}.input_layernorm.weight", True, lambda s: (s.hidden_size,)),
    _Row("qkv_proj", "model.layers.{layer}.self_attn.query_key_value.weight", True, lambda s: (s.qkv_dim, s.hidden_size)),
    _Row("o_proj", "model.layers.{layer}.self_attn.dense.weight", True, lambda s: (s.hidden_size, s.hidden_size)),
    _Row("post_attention_layernorm", "model.layers.{layer}.post_attention_layernorm.weight", True, lambda s: (s.hidden_size,)),
    _Row("gate_up_proj", "model.layers.{layer}.mlp.up_proj.weight", True, lambda s: (2 * s.intermediate_size, s.hidden_size)),
    _Row("down_proj", "model.layers.{layer}.mlp.down_proj.weight", True, lambda s: (s.hidden_size, s.intermediate_size)),
    _Row("norm", "model.final_layernorm.weight", True, lambda s: (s.hidden_size,)),
    _Row("lm_head", "lm_head.weight", False, lambda s: (s.vocab_size, s.hidden_size)),
)


def _deinterleave_qkv(spec: ModelSpec, w: np.ndarray) -> np.ndarray:
    """[kv groups x (q_per_kv queries, k, v) x head_dim] rows -> [all q | all k | all v] (query head g*q_per_kv + j)."""
    group = spec.num_heads // spec.num_kv_heads
    g = w.reshape(spec.num_kv_heads, group + 2, spec.head_dim, *w.shape[1:])
    parts = [g[:, :group], g[:, group:group + 1], g[:, group + 1:]]
    return np.concatenate([p.reshape(-1, *w.shape[1:]) for p in parts])


def _deinterleave_gegelu(spec: ModelSpec, w: np.ndarray) -> np.ndarray:
    """up_proj rows alternate (gelu, linear): -> [gelu rows | linear rows]."""
    return np.concatenate([w[0::2], w[1::2]])


_LAYOUT: dict[str, Callable[[ModelSpec, np.ndarray], np.ndarray]] = {"qkv_proj": _deinterleave_qkv, "gate_up_proj": _deinterleave_gegelu}


def small_names(spec: ModelSpec) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """served name -> (Phi-3-small name, role, shape) for every tensor this spec's checkpoint must hold."""
    out = {}
    for row in SMALL_TENSORS:
        if row.role == "lm_head" and spec.tie_word_embeddings:
            continue
        shape = row.shape(spec)
        for layer in range(spec.num_layers) if "{layer}" in row.template else (None,):
            own = row.template.format(layer=layer)
            out[tensor_name(row.role, layer)] = (own, row.role, shape)
            if row.bias:
                out[bias_name(row.role, layer)] = (own.removesuffix("weight") + "bias", row.role, shape[:1])
    return out


class Phi3SmallCheckpoint:
    """A Phi-3-small safetensors checkpoint read under the Phi-3 names, q/k/v and gelu/linear rows de-interleaved."""

    def __init__(self, raw: SafetensorsCheckpoint, spec: ModelSpec):
        self.raw, self.spec = raw, spec
        self._names = small_names(spec)

    @property
    def entries(self) -> dict[str, TensorEntry]:
        return self.raw.entries

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._names[name][2]

    def read(self, name: str, dtype: str = "float32") -> np.ndarray:
        if name not in self._names:
            raise Phi3OnnxError(f"unknown checkpoint tensor {name!r}: not a Phi-3-small tensor")
        own, role, _ = self._names[name]
        w = self.raw.read(own, dtype)
        fix = _LAYOUT.get(role)
        return np.ascontiguousarray(fix(self.spec, w)) if fix else w


def check_small_tensors(ckpt: TensorShapes, spec: ModelSpec) -> None:
    """Every Phi-3-small tensor present with the config's shape, nothing else (layer count included)."""
    raw = ckpt.raw if isinstance(ckpt, Phi3SmallCheckpoint) else ckpt
    extra = unused_after_shapes(raw, {own: shape for own, _, shape in small_names(spec).values()})
    if extra:
        why = " while tie_word_embeddings is true" if extra == ["lm_head.weight"] else ""
        layer = " (more decoder layers than num_hidden_layers?)" if ".layers." in extra[0] else ""
        raise Phi3OnnxError(f"checkpoint holds tensor {extra[0]} that the config does not use{why}{layer}")


def open_small(folder: Path, spec: ModelSpec) -> Phi3SmallCheckpoint:
    return Phi3SmallCheckpoint(SafetensorsCheckpoint(folder), spec)


__all__ = [
    "ARCHITECTURE",
    "MODEL_TYPE",
    "SMALL_TENSORS",
    "Phi3SmallCheckpoint",
    "bias_name",
    "check_small_tensors",
    "is_phi3_small",
    "open_small",
    "small_names",
    "spec_from_small_config",
]
