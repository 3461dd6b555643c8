"""The checkpoint's tensors as data: one table of Hugging Face names, shapes and roles.

Every stage that names a checkpoint tensor goes through this table: the reader's checks
(`check_tensors`), the graph (`phi3_onnx.graph`), AWQ and its PyTorch layer (`phi3_onnx.quantize`).
A role that is not in the table, or a checkpoint name that matches no entry, is an error, never a
fall-through.

    role                      Hugging Face name                                   shape
    embed_tokens              model.embed_tokens.weight                           [vocab, hidden]
    input_layernorm           model.layers.{layer}.input_layernorm.weight         [hidden]
    qkv_proj                  model.layers.{layer}.self_attn.qkv_proj.weight      [hidden + 2 kv, hidden]
    o_proj                    model.layers.{layer}.self_attn.o_proj.weight        [hidden, hidden]
    post_attention_layernorm  model.layers.{layer}.post_attention_layernorm.weight [hidden]
    gate_up_proj              model.layers.{layer}.mlp.gate_up_proj.weight        [2 intermediate, hidden]
    down_proj                 model.layers.{layer}.mlp.down_proj.weight           [hidden, intermediate]
    norm                      model.norm.weight                                   [hidden]
    lm_head                   lm_head.weight (absent when tied to embed_tokens)   [vocab, hidden]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.registry import registry
from phi3_onnx.spec import ModelSpec

Kind = Literal["embedding", "norm", "linear"]


@dataclass(frozen=True)
class TensorInfo:
    """One row of the table: a role, its Hugging Face name template and its shape for a spec."""

    role: str
    template: str  # "{layer}" stands for the decoder layer index in per-layer tensors
    kind: Kind
    shape: Callable[[ModelSpec], tuple[int, ...]]

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.template

    def name(self, layer: int | None = None) -> str:
        if self.per_layer != (layer is not None):
            raise Phi3OnnxError(f"tensor role {self.role} {'needs a' if self.per_layer else 'takes no'} layer index")
        return self.template.format(layer=layer)


TENSORS: dict[str, TensorInfo] = registry((
    TensorInfo("embed_tokens", "model.embed_tokens.weight", "embedding", lambda s: (s.vocab_size, s.hidden_size)),
    TensorInfo("input_layernorm", "model.layers.{layer}.input_layernorm.weight", "norm", lambda s: (s.hidden_size,)),
    TensorInfo("qkv_proj", "model.layers.{layer}.self_attn.qkv_proj.weight", "linear", lambda s: (s.qkv_dim, s.hidden_size)),
    TensorInfo("o_proj", "model.layers.{layer}.self_attn.o_proj.weight", "linear", lambda s: (s.hidden_size, s.hidden_size)),
    TensorInfo("post_attention_layernorm", "model.layers.{layer}.post_attention_layernorm.weight", "norm", lambda s: (s.hidden_size,)),
    TensorInfo("gate_up_proj", "model.layers.{layer}.mlp.gate_up_proj.weight", "linear", lambda s: (2 * s.intermediate_size, s.hidden_size)),
    TensorInfo("down_proj", "model.layers.{layer}.mlp.down_proj.weight", "linear", lambda s: (s.hidden_size, s.intermediate_size)),
    TensorInfo("norm", "model.norm.weight", "norm", lambda s: (s.hidden_size,)),
    TensorInfo("lm_head", "lm_head.weight", "linear", lambda s: (s.vocab_size, s.hidden_size)),
), key=lambda t: t.role, what="tensor role")

LAYER_ROLES: tuple[str, ...] = tuple(r for r, t in TENSORS.items() if t.per_layer)
LAYER_LINEARS: tuple[str, ...] = tuple(r for r in LAYER_ROLES if TENSORS[r].kind == "linear")


def info(role: str) -> TensorInfo:
    try:
        return TENSORS[role]
    except KeyError:
        raise Phi3OnnxError(f"unknown tensor role {role!r}; known: {', '.join(TENSORS)}") from None


def tensor_name(role: str, layer: int | None = None) -> str:
    """The Hugging Face name of `role` (in decoder layer `layer` for per-layer roles)."""
    return info(role).name(layer)


def lm_head_role(spec: ModelSpec) -> str:
    """The tensor the output projection reads: the embedding table when the two are tied."""
    return "embed_tokens" if spec.tie_word_embeddings else "lm_head"


@dataclass(frozen=True)
class TensorKey:
    """A checkpoint name parsed back into the table: its role and layer (None for model-level tensors)."""

    role: str
    layer: int | None = None


def _pattern(t: TensorInfo) -> re.Pattern[str]:
    return re.compile(re.escape(t.template).replace(re.escape("{layer}"), r"(\d+)"))


_PATTERNS = tuple((_pattern(t), t.role) for t in TENSORS.values())


def parse_name(name: str) -> TensorKey:
    """Role and layer of a Hugging Face tensor name; a name the table does not know is an error."""
    for pattern, role in _PATTERNS:
        m = pattern.fullmatch(name)
        if m is not None:
            return TensorKey(role, int(m.group(1)) if m.groups() else None)
    raise Phi3OnnxError(f"unknown checkpoint tensor {name!r}: not a Phi-3 tensor name")


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes a Phi3ForCausalLM checkpoint of this spec must contain
    (every architecture: phi3_onnx.checkpoint.expected_tensors)."""
    out: dict[str, tuple[int, ...]] = {}
    for role, t in TENSORS.items():
        if role == "lm_head" and spec.tie_word_embeddings:
            continue
        for layer in range(spec.num_layers) if t.per_layer else (None,):
            out[t.name(layer)] = t.shape(spec)
    return out


class TensorShapes(Protocol):
    """What `check_tensors` needs of a checkpoint reader."""

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def _check_layers(keys: dict[str, TensorKey], spec: ModelSpec) -> None:
    """num_hidden_layers must equal the layers present: fewer would silently truncate the model."""
    layers = {k.layer for k in keys.values() if k.layer is not None}
    if len(layers) == spec.num_layers and (not layers or (min(layers) == 0 and max(layers) == spec.num_layers - 1)):
        return  # (compared without building range(num_layers): a config may claim 10**9 layers)
    present = f"layers 0..{max(layers)}" if layers else "no decoder layers"
    gaps = sorted(set(range(max(layers, default=-1) + 1)) - layers)
    detail = f" (layer {gaps[0]} missing)" if gaps else ""
    raise Phi3OnnxError(f"config.json says num_hidden_layers {spec.num_layers}, but the checkpoint holds {present}{detail}")


def unused_after_shapes(ckpt: TensorShapes, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Every `expected` tensor present with its shape (else a one-line error); returns the checkpoint's
    other names, sorted (each architecture words that error itself)."""
    for name, shape in expected.items():
        if name not in ckpt:
            raise Phi3OnnxError(f"checkpoint lacks tensor {name}")
        if ckpt.shape(name) != shape:
            raise Phi3OnnxError(f"tensor {name} has shape {ckpt.shape(name)}, config says {shape}")
    return sorted(set(ckpt.names()) - set(expected))


def check_tensors(ckpt: TensorShapes, spec: ModelSpec) -> None:
    """Phi3ForCausalLM: every tensor known, the layer count right, nothing missing, every shape the config's
    (every architecture: phi3_onnx.checkpoint.check_tensors)."""
    keys = {name: parse_name(name) for name in ckpt.names()}  # an unknown name is an error
    _check_layers(keys, spec)
    extra = unused_after_shapes(ckpt, expected_tensors(spec))
    if extra:
        why = " while tie_word_embeddings is true" if extra == [tensor_name("lm_head")] else ""
        raise Phi3OnnxError(f"checkpoint holds tensor {extra[0]} that the config does not use{why}")


__all__ = ["LAYER_LINEARS", "LAYER_ROLES", "TENSORS", "TensorInfo", "TensorKey", "check_tensors",
           "expected_tensors", "info", "lm_head_role", "parse_name", "tensor_name", "unused_after_shapes"]
