"""Phi-3.5-MoE's (PhimoeForCausalLM) tensors as data, and the view that lets the Phi-3 graph read them.

The hub layout (transformers 5 converts it to packed experts on load and back on save, so a
`save_pretrained` checkpoint has these names too):

    role                      Hugging Face name                                              shape
    embed_tokens              model.embed_tokens.weight                                      [vocab, hidden]
    input_layernorm(_bias)    model.layers.{layer}.input_layernorm.weight / .bias            [hidden]
    q_proj / k_proj / v_proj  model.layers.{layer}.self_attn.{q,k,v}_proj.weight (+ .bias)   [hidden | kv, hidden]
    o_proj(_bias)             model.layers.{layer}.self_attn.o_proj.weight (+ .bias)         [hidden, hidden]
    post_attention_layernorm  model.layers.{layer}.post_attention_layernorm.weight / .bias   [hidden]
    router                    model.layers.{layer}.block_sparse_moe.gate.weight              [experts, hidden]
    w1 (gate) / w3 (up)       model.layers.{layer}.block_sparse_moe.experts.{expert}.w1/w3.weight  [inter, hidden]
    w2 (down)                 model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight     [hidden, inter]
    norm(_bias)               model.norm.weight / .bias                                      [hidden]
    lm_head(_bias)            lm_head.weight (+ lm_head.bias)                                [vocab, hidden] ([vocab])

Biases exist only where the config says (attention_bias, lm_head_bias). The graph code names
Phi-3's fused q/k/v tensor (`qkv_proj`); `PhimoeWeights` serves it as the concatenation of
q_proj, k_proj and v_proj, so the attention subgraphs are shared unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from phi3_onnx.checkpoint.tensors import (
    TensorKey,
    TensorShapes,
    _check_layers,
    tensor_name,
    unused_after_shapes,
)
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import ModelSpec


@dataclass(frozen=True)
class PhimoeTensor:
    role: str
    template: str  # "{layer}" and "{expert}" stand for the layer and expert indices
    shape: Callable[[ModelSpec], tuple[int, ...]]
    present: Callable[[ModelSpec], bool] = lambda s: True

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.template

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.template


def _n_experts(s: ModelSpec) -> int:
    assert s.moe is not None
    return s.moe.num_experts


_H = lambda s: (s.hidden_size,)
_ATTN_BIAS = lambda s: s.attention_bias
_P = "model.layers.{layer}"
PHIMOE_TENSORS: tuple[PhimoeTensor, ...] = (
    PhimoeTensor("embed_tokens", "model.embed_tokens.weight", lambda s: (s.vocab_size, s.hidden_size)),
    PhimoeTensor("input_layernorm", f"{_P}.input_layernorm.weight", _H),
    PhimoeTensor("input_layernorm_bias", f"{_P}.input_layernorm.bias", _H),
    PhimoeTensor("q_proj", f"{_P}.self_attn.q_proj.weight", lambda s: (s.hidden_size, s.hidden_size)),
    PhimoeTensor("k_proj", f"{_P}.self_attn.k_proj.weight", lambda s: (s.kv_dim, s.hidden_size)),
    PhimoeTensor("v_proj", f"{_P}.self_attn.v_proj.weight", lambda s: (s.kv_dim, s.hidden_size)),
    PhimoeTensor("q_proj_bias", f"{_P}.self_attn.q_proj.bias", _H, _ATTN_BIAS),
    PhimoeTensor("k_proj_bias", f"{_P}.self_attn.k_proj.bias", lambda s: (s.kv_dim,), _ATTN_BIAS),
    PhimoeTensor("v_proj_bias", f"{_P}.self_attn.v_proj.bias", lambda s: (s.kv_dim,), _ATTN_BIAS),
    PhimoeTensor("o_proj", f"{_P}.self_attn.o_proj.weight", lambda s: (s.hidden_size, s.hidden_size)),
    PhimoeTensor("o_proj_bias", f"{_P}.self_attn.o_proj.bias", _H, _ATTN_BIAS),
    PhimoeTensor("post_attention_layernorm", f"{_P}.post_attention_layernorm.weight", _H),
    PhimoeTensor("post_attention_layernorm_bias", f"{_P}.post_attention_layernorm.bias", _H),
    PhimoeTensor("router", f"{_P}.block_sparse_moe.gate.weight", lambda s: (_n_experts(s), s.hidden_size)),
    PhimoeTensor("w1", f"{_P}.block_sparse_moe.experts.{{expert}}.w1.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    PhimoeTensor("w2", f"{_P}.block_sparse_moe.experts.{{expert}}.w2.weight", lambda s: (s.hidden_size, s.intermediate_size)),
    PhimoeTensor("w3", f"{_P}.block_sparse_moe.experts.{{expert}}.w3.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    PhimoeTensor("norm", "model.norm.weight", _H),
    PhimoeTensor("norm_bias", "model.norm.bias", _H),
    PhimoeTensor("lm_head", "lm_head.weight", lambda s: (s.vocab_size, s.hidden_size), lambda s: not s.tie_word_embeddings),
    PhimoeTensor("lm_head_bias", "lm_head.bias", lambda s: (s.vocab_size,), lambda s: s.lm_head_bias),
)
_BY_ROLE = {t.role: t for t in PHIMOE_TENSORS}


def phimoe_name(role: str, layer: int | None = None, expert: int | None = None) -> str:
    """The Hugging Face name of a Phimoe tensor role."""
    try:
        t = _BY_ROLE[role]
    except KeyError:
        raise Phi3OnnxError(f"unknown Phi-3.5-MoE tensor role {role!r}; known: {', '.join(_BY_ROLE)}") from None
    if t.per_layer != (layer is not None) or t.per_expert != (expert is not None):
        raise Phi3OnnxError(f"tensor role {role} takes {'a layer' if t.per_layer else 'no layer'}"
                            f"{' and an expert' if t.per_expert else ''} index")
    return t.template.format(layer=layer, expert=expert)


def _pattern(t: PhimoeTensor) -> re.Pattern[str]:
    text = re.escape(t.template).replace(re.escape("{layer}"), r"(?P<layer>\d+)").replace(re.escape("{expert}"), r"(?P<expert>\d+)")
    return re.compile(text)


_PATTERNS = tuple((_pattern(t), t.role) for t in PHIMOE_TENSORS)


def parse_phimoe_name(name: str) -> tuple[str, int | None, int | None]:
    """(role, layer, expert) of a Phimoe checkpoint name; an unknown name is an error."""
    for pattern, role in _PATTERNS:
        m = pattern.fullmatch(name)
        if m is not None:
            g = m.groupdict()
            return role, int(g["layer"]) if g.get("layer") else None, int(g["expert"]) if g.get("expert") else None
    raise Phi3OnnxError(f"unknown checkpoint tensor {name!r}: not a Phi-3.5-MoE tensor name")


def expected_phimoe_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for t in PHIMOE_TENSORS:
        if not t.present(spec):
            continue
        for layer in range(spec.num_layers) if t.per_layer else (None,):
            for expert in range(_n_experts(spec)) if t.per_expert else (None,):
                out[t.template.format(layer=layer, expert=expert)] = t.shape(spec)
    return out


def check_phimoe_tensors(ckpt: TensorShapes, spec: ModelSpec) -> None:
    """Every tensor known, the layer and expert counts right, nothing missing, every shape the config's."""
    parsed = {name: parse_phimoe_name(name) for name in ckpt.names()}
    _check_layers({n: TensorKey(r, layer) for n, (r, layer, _) in parsed.items()}, spec)
    experts = {e for _, _, e in parsed.values() if e is not None}
    if experts and max(experts) >= _n_experts(spec):
        raise Phi3OnnxError(f"config.json says num_local_experts {_n_experts(spec)}, but the checkpoint holds expert {max(experts)}")
    extra = unused_after_shapes(ckpt, expected_phimoe_tensors(spec))
    if extra:
        raise Phi3OnnxError(f"checkpoint holds tensor {extra[0]} that the config does not use"
                            " (attention_bias / lm_head_bias / tie_word_embeddings)")


class _Reads:
    def read(self, name: str) -> np.ndarray: ...


class PhimoeWeights:
    """A Phimoe checkpoint (or a rescaled view of one) read under the Phi-3 names the shared graph uses.

    Phi-3's fused `self_attn.qkv_proj.weight` / `.bias` are served as [q; k; v]; every other name
    passes through.
    """

    def __init__(self, inner: _Reads) -> None:
        self.inner = inner

    def read(self, name: str) -> np.ndarray:
        m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", name)
        if m is None:
            return self.inner.read(name)
        layer, kind = int(m.group(1)), m.group(2)
        suffix = "" if kind == "weight" else "_bias"
        return np.concatenate([self.inner.read(phimoe_name(f"{p}_proj{suffix}", layer)) for p in "qkv"], axis=0)


def qkv_bias_name(layer: int) -> str:
    """The fused q/k/v bias under the Phi-3 name (served by PhimoeWeights)."""
    return tensor_name("qkv_proj", layer).replace(".weight", ".bias")


__all__ = ["PHIMOE_TENSORS", "PhimoeWeights", "check_phimoe_tensors", "expected_phimoe_tensors", "parse_phimoe_name",
           "phimoe_name", "qkv_bias_name"]
