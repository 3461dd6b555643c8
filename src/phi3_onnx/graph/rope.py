"""Rotary-embedding caches, computed in float32 the way transformers computes them.

GroupQueryAttention/RotaryEmbedding read cos/sin caches of shape [positions, rotary_dim/2] (rotary_dim =
head_dim unless the model rotates only part of each head, as Phi-4-mini does: ORT infers it from the shape).
LongRoPE has two: short factors (used while the whole sequence fits the original context) and
long factors (used once it does not). Transformers decides per forward call from the largest
position, and keys already in the KV cache keep the rotation they got — so the graph picks the
cache from total_sequence_length each step, without control flow (see `longrope_cache`).
"""

from __future__ import annotations

import numpy as np

from phi3_onnx.spec import ModelSpec


def inv_freq(spec: ModelSpec, factors: tuple[float, ...] | None = None) -> np.ndarray:
    dim = spec.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.power(np.float32(spec.rope_theta), exponent, dtype=np.float32)
    ext = np.ones_like(base) if factors is None else np.asarray(factors, dtype=np.float32)
    return (np.float32(1.0) / (ext * base)).astype(np.float32)


def cos_sin(spec: ModelSpec, positions: int, factors: tuple[float, ...] | None, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [positions, rotary_dim/2], scaled like transformers' `attention_scaling`."""
    freqs = np.outer(np.arange(positions, dtype=np.float32), inv_freq(spec, factors)).astype(np.float32)
    return (np.cos(freqs) * np.float32(scale)).astype(np.float32), (np.sin(freqs) * np.float32(scale)).astype(np.float32)


def rope_cache_rows(spec: ModelSpec) -> int:
    """Rows of the cos/sin caches `rope_caches` builds (known before building them: memory checks)."""
    if spec.longrope is None:
        return spec.max_position_embeddings
    return spec.original_max_position_embeddings + spec.max_position_embeddings


def rope_caches(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin caches the graph stores.

    Plain RoPE: [max_pos, d/2]. LongRoPE: short rows for positions < original context, then long
    rows for all positions, concatenated: [orig + max_pos, d/2]. Rows [0, max_pos) serve
    short-factor steps (positions < orig there); rows [orig, orig + max_pos) serve long-factor steps.
    """
    if spec.longrope is None:
        return cos_sin(spec, spec.max_position_embeddings, None, 1.0)
    r = spec.longrope
    orig = spec.original_max_position_embeddings
    cs, ss = cos_sin(spec, orig, r.short_factor, r.attention_factor)
    cl, sl = cos_sin(spec, spec.max_position_embeddings, r.long_factor, r.long_scale)
    return np.concatenate([cs, cl]), np.concatenate([ss, sl])
