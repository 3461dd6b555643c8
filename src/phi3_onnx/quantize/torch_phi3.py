"""A Phi-3 decoder layer in a few PyTorch functions, for AWQ calibration (needs the `[awq]` extra).

AWQ streams the model one layer at a time: it loads one layer's weights from the safetensors,
runs the calibration hidden states through it, and lets an observer see every linear's input.
The maths matches transformers' Phi3DecoderLayer (tests/test_awq.py checks it against transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint
from phi3_onnx.checkpoint.tensors import LAYER_LINEARS, LAYER_ROLES, tensor_name
from phi3_onnx.graph.rope import rope_caches
from phi3_onnx.spec import ModelSpec

# The four linears of a layer, by their role in the tensor table (checkpoint.tensors).
LINEARS = LAYER_LINEARS

Observer = Callable[[str, torch.Tensor], None]  # (linear name, its input [tokens, in_features])


@dataclass
class LayerWeights:
    """One decoder layer's float32 tensors, Hugging Face layout ([out, in] for linears)."""

    input_layernorm: torch.Tensor
    qkv_proj: torch.Tensor
    o_proj: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor


def load_layer(ckpt: SafetensorsCheckpoint, layer: int, device: torch.device) -> LayerWeights:
    """Read one layer from the checkpoint, widened to float32."""
    return LayerWeights(**{role: torch.from_numpy(ckpt.read(tensor_name(role, layer))).to(device) for role in LAYER_ROLES})


@dataclass(frozen=True)
class Rotary:
    """cos/sin tables [positions, rotary_dim] for one calibration sequence length."""

    cos: torch.Tensor
    sin: torch.Tensor


def rotary_for(spec: ModelSpec, seq_len: int, device: torch.device) -> Rotary:
    """The graph's own caches; LongRoPE takes the long rows once the sequence passes the original context."""
    cos, sin = rope_caches(spec)
    start = spec.original_max_position_embeddings if spec.longrope and seq_len > spec.original_max_position_embeddings else 0
    cos, sin = (torch.from_numpy(a[start:start + seq_len]).to(device) for a in (cos, sin))
    return Rotary(torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return gamma * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head (all of them unless partial rotary); pass the rest."""
    dim = rope.cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * rope.cos + rotated * rope.sin, rest], -1)


def _causal_mask(spec: ModelSpec, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """None (plain causal) unless the sliding window is shorter than the sequence."""
    window = spec.attention_window
    if window is None or window >= seq_len:
        return None
    pos = torch.arange(seq_len, device=device)
    dist = pos[:, None] - pos[None, :]
    return (dist >= 0) & (dist < window)


def attend(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rotary, scale: float | None = None,
           visible: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [batch, seq, q_heads * head_dim] over k, v [batch, seq, kv_heads * head_dim].

    Any whole number of query heads per KV head (GQA): AWQ's scale search calls it on a subset of
    KV heads with their query heads. Returns [batch, seq, q_heads * head_dim]. Phi-3-small passes its
    softmax scale (None: 1/sqrt(head_dim)) and which keys each query sees, bool [q_heads or 1, seq, seq]
    with causality included (None: causal, within the sliding window).
    """
    b, n, _ = q.shape
    hd = spec.head_dim
    q = _rotate(q.view(b, n, -1, hd).transpose(1, 2), rope)
    k = _rotate(k.view(b, n, -1, hd).transpose(1, 2), rope)
    v = v.view(b, n, -1, hd).transpose(1, 2)
    mask = _causal_mask(spec, n, q.device) if visible is None else visible
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, n, -1)


def attention(spec: ModelSpec, qkv: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """Causal GQA over packed qkv [batch, seq, qkv_dim] -> [batch, seq, hidden]."""
    return attend(spec, *qkv.split([spec.hidden_size, spec.kv_dim, spec.kv_dim], -1), rope)


def layer_forward(spec: ModelSpec, w: LayerWeights, x: torch.Tensor, rope: Rotary, observe: Observer | None = None) -> torch.Tensor:
    """One decoder layer on hidden states [batch, seq, hidden]; `observe` sees each linear's input."""
    def linear(name: str, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if observe is not None:
            observe(name, inp.reshape(-1, inp.shape[-1]))
        return inp @ weight.T

    h = rms_norm(x, w.input_layernorm, spec.rms_norm_eps)
    attn = attention(spec, linear("qkv_proj", h, w.qkv_proj), rope)
    x = x + linear("o_proj", attn, w.o_proj)
    h = rms_norm(x, w.post_attention_layernorm, spec.rms_norm_eps)
    gate, up = linear("gate_up_proj", h, w.gate_up_proj).chunk(2, -1)
    return x + linear("down_proj", F.silu(gate) * up, w.down_proj)
