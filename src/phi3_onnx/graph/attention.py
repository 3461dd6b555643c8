"""Attention subgraphs: per-step mask/rotary inputs, Q/K/V projections, rotary, GroupQueryAttention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from phi3_onnx.checkpoint.tensors import tensor_name
from phi3_onnx.graph.builder import (
    MS_DOMAIN,
    Context,
    WeightRef,
    make_bias_add,
    make_linear,
)
from phi3_onnx.graph.rope import rope_caches
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets.providers import PROVIDERS


@dataclass
class AttentionInputs:
    """Per-step tensors shared by every layer's attention, computed once from the graph inputs."""

    seqlens_k: ir.Value  # int32 [batch]: total length - 1
    total_len: ir.Value  # int32 scalar
    cos: ir.Value  # [mask width, rotary_dim/2] rows for this step (LongRoPE: short or long)
    sin: ir.Value
    position_ids: ir.Value | None = None  # int64 [batch, seq]; only graphs with separate RotaryEmbedding use it
    # EPs whose GQA ignores local_window_size (DirectML): which keys each query sees, and how many keys
    window_visible: ir.Value | None = None  # bool [batch, 1, seq, total]
    total_keys: ir.Value | None = None  # int64 [1]


@dataclass
class StepPositions:
    """Key and query positions of this step (right-aligned: the new tokens are the mask's last columns)."""

    kpos: ir.Value  # int64 [T]: 0..T-1
    qpos: ir.Value  # int64 [S, 1]: T-S..T-1
    total_keys: ir.Value  # int64 [1]: T
    causal_keys: ir.Value  # bool [batch, 1, S, T]: kpos <= qpos and the mask's real keys


def step_positions(ctx: Context, mask: ir.Value, prefix: str) -> StepPositions:
    """mask [B, T], input_ids [B, S] ──▶ positions, and causal visibility over the mask's real keys."""
    b = ctx.b
    i64 = lambda name, v: b.const(f"{prefix}/{name}", np.array(v, np.int64))
    total = b.op("Squeeze", [b.op("Shape", [mask], f"{prefix}/mask_shape", start=1, end=2)], f"{prefix}/total")
    seq = b.op("Squeeze", [b.op("Shape", [ctx.input_ids], f"{prefix}/ids_shape", start=1, end=2)], f"{prefix}/seq")
    kpos = b.op("Range", [i64("zero", 0), total, i64("one", 1)], f"{prefix}/kpos")
    qpos = b.op("Range", [b.op("Sub", [total, seq], f"{prefix}/qstart"), total, i64("one_q", 1)], f"{prefix}/qpos")
    qcol = b.op("Unsqueeze", [qpos, i64("axis_last", [1])], f"{prefix}/qpos_col")
    causal = b.op("LessOrEqual", [kpos, qcol], f"{prefix}/causal")  # [S, T]
    keys = b.op("Cast", [b.op("Unsqueeze", [mask, i64("axes_1_2", [1, 2])], f"{prefix}/mask_4d")], f"{prefix}/real_keys",
                to=ir.DataType.BOOL)  # [B, 1, 1, T]
    return StepPositions(kpos, qcol, b.op("Unsqueeze", [total, i64("axis_0", [0])], f"{prefix}/total_1d"),
                         b.op("And", [causal, keys], f"{prefix}/causal_keys"))


def make_window_visible(ctx: Context, mask: ir.Value, window: int) -> tuple[ir.Value, ir.Value]:
    """A query sees the last `window` keys, itself included (transformers' sliding_window; GQA's local_window_size):
    causal & real keys & qpos - kpos < window, bool [B, 1, S, T]; and T."""
    b, pre = ctx.b, "/model/window"
    pos = step_positions(ctx, mask, pre)
    near = b.op("Less", [b.op("Sub", [pos.qpos, pos.kpos], f"{pre}/distance"), b.const(f"{pre}/size", np.array(window, np.int64))],
                f"{pre}/near")
    return b.op("And", [pos.causal_keys, near], f"{pre}/visible"), pos.total_keys


def plain_attention(ctx: Context, prefix: str, q: ir.Value, present_k: ir.Value, present_v: ir.Value, visible: ir.Value,
                    total_keys: ir.Value, scale: float) -> ir.Value:
    """Attention in plain ops over a GQA node's present K/V, for what an EP's GQA kernel does not apply.

    rotated q [B, S, N·H]; present K/V [B, kv, ≥T, H] (a shared max-length buffer holds more: sliced to T);
    visible: bool, broadcast to [B, N, S, T]. Scores and softmax in float32:

        q ─[B, kv, g·S, H]─MatMul(Kᵀ)·scale─[B, N, S, T]─Where(visible, ·, lowest)─Softmax─MatMul(V)─▶ [B, S, N·H]
    """
    b, s = ctx.b, ctx.spec
    p, kv, g, h = prefix, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
    i64 = lambda name, v: b.const(f"{p}/{name}", np.array(v, np.int64))
    keys = b.op("Slice", [present_k, i64("start", [0]), total_keys, i64("axis", [2])], f"{p}/keys")
    values = b.op("Slice", [present_v, i64("start_v", [0]), total_keys, i64("axis_v", [2])], f"{p}/values")
    q5 = b.op("Transpose", [b.op("Reshape", [q, i64("q_5d", [0, 0, kv, g, h])], f"{p}/q_5d")], f"{p}/q_groups", perm=[0, 2, 3, 1, 4])
    qg = b.op("Reshape", [q5, i64("q_grouped", [0, 0, -1, h])], f"{p}/q_grouped")  # [B, kv, g·S, H]
    scores = b.op("MatMul", [qg, b.op("Transpose", [keys], f"{p}/keys_t", perm=[0, 1, 3, 2])], f"{p}/scores")
    scores = b.op("Reshape", [b.op("Cast", [scores], f"{p}/scores_fp32", to=ir.DataType.FLOAT), i64("heads", [0, s.num_heads, -1, 0])],
                  f"{p}/scores_heads")  # [B, N, S, T]
    scaled = b.op("Mul", [scores, b.const(f"{p}/scale", np.array(scale, np.float32))], f"{p}/scaled")
    masked = b.op("Where", [visible, scaled, b.const(f"{p}/lowest", np.array(np.finfo(np.float32).min, np.float32))], f"{p}/masked")
    probs = b.op("Cast", [b.op("Softmax", [masked], f"{p}/Softmax", axis=-1)], f"{p}/probs", to=ctx.dtype)
    pg = b.op("Reshape", [probs, i64("probs_grouped", [0, kv, -1, 0])], f"{p}/probs_grouped")  # [B, kv, g·S, T]
    ctx_g = b.op("Reshape", [b.op("MatMul", [pg, values], f"{p}/context"), i64("ctx_5d", [0, 0, g, -1, h])], f"{p}/ctx_5d")
    out = b.op("Transpose", [ctx_g], f"{p}/ctx_tokens", perm=[0, 3, 1, 2, 4])  # [B, S, kv, g, H]
    return b.op("Reshape", [out, i64("out", [0, 0, s.num_heads * h])], f"{p}/out")


def gqa_applies_window(ctx: Context) -> bool:
    return PROVIDERS[ctx.target.provider].gqa_applies_window


def make_attention_inputs(ctx: Context, attention_mask: ir.Value, position_ids: ir.Value | None = None) -> AttentionInputs:
    """seqlens_k and total_sequence_length from the mask; the rotary caches for this step.

    mask ──ReduceSum──▶ total ──Sub 1──▶ seqlens_k (int32)
    mask ──Shape[1]──▶ total_sequence_length (int32)
    For LongRoPE the short and long caches are selected on the device with Where (no If node,
    no host read of data), so the same graph runs under DirectML and CUDA graph capture/replay.
    """
    b = ctx.b
    total = b.op("ReduceSum", [attention_mask, b.const("/model/constants/axes_1", np.array([1], np.int64))], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = b.op("Sub", [total, b.const("/model/constants/one_i64", np.array(1, np.int64))], "/model/attn_mask/Sub")
    seqlens_k = b.op("Cast", [seqlens], "/model/attn_mask/seqlens_k", to=ir.DataType.INT32)
    shape = b.op("Shape", [attention_mask], "/model/attn_mask/Shape", start=1, end=2)
    total_len = b.op("Cast", [b.op("Squeeze", [shape], "/model/attn_mask/total_len_i64")], "/model/attn_mask/total_seq_len", to=ir.DataType.INT32)
    cos_np, sin_np = rope_caches(ctx.spec)
    cos = b.const("cos_cache", cos_np.astype(ctx.np_dtype))
    sin = b.const("sin_cache", sin_np.astype(ctx.np_dtype))
    if ctx.spec.longrope is not None:
        cos, sin = _select_longrope_rows(ctx, seqlens, shape, cos, sin)
    if position_ids is None and not ctx.target.graph.rotary_in_attention:
        position_ids = _position_ids_from_mask(ctx, total)
    out = AttentionInputs(seqlens_k, total_len, cos, sin, position_ids)
    if ctx.spec.attention_window is not None and not gqa_applies_window(ctx):
        out.window_visible, out.total_keys = make_window_visible(ctx, attention_mask, ctx.spec.attention_window)
    return out


def _position_ids_from_mask(ctx: Context, total: ir.Value) -> ir.Value:
    """Positions of the new tokens when the graph has no position_ids input (right-aligned, no padding).

    total [batch] ──Unsqueeze──▶ [batch, 1] ─┐
    Shape(input_ids)[1] = S ──Range(0, S)──▶ ├─ total - S + range ──▶ position_ids [batch, S]
    """
    b = ctx.b
    seq = b.op("Squeeze", [b.op("Shape", [ctx.input_ids], "/model/pos_ids/Shape", start=1, end=2)], "/model/pos_ids/seq_len")
    zero, one = b.const("/model/constants/zero_i64", np.array(0, np.int64)), b.const("/model/constants/one_i64_step", np.array(1, np.int64))
    steps = b.op("Range", [zero, seq, one], "/model/pos_ids/Range")
    past = b.op("Sub", [total, seq], "/model/pos_ids/past_len")
    past = b.op("Unsqueeze", [past, b.const("/model/constants/axes_1_unsq", np.array([1], np.int64))], "/model/pos_ids/past_len_2d")
    return b.op("Add", [past, steps], "/model/pos_ids/Add")


def _select_longrope_rows(ctx: Context, seqlens: ir.Value, width_1d: ir.Value, cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Long rows once the longest real sequence passes the original context.

    cache[0 : W] (short) ─┐
    cache[orig : orig+W] ─┼─ Where(max(seqlens_k) + 1 > orig) ──▶ rows [W, d/2]   (W = mask width)
    The decision uses the mask's sum (real tokens), not its width: with CUDA graphs genai pads
    the mask to max_length. Slice bounds come from shapes only (constant under a captured graph);
    the choice is a device-side Where, so a replayed graph still switches at the right step.
    """
    b, orig = ctx.b, ctx.spec.original_max_position_embeddings
    last = b.op("ReduceMax", [seqlens], "/model/rotary/max_seqlen", keepdims=0)
    is_long = b.op("Greater", [last, b.const("/model/constants/original_context_m1", np.array(orig - 1, np.int64))], "/model/rotary/is_long")
    zero = b.const("/model/constants/zero_1d", np.array([0], np.int64))
    orig_1d = b.const("/model/constants/original_context_1d", np.array([orig], np.int64))
    long_end = b.op("Add", [orig_1d, width_1d], "/model/rotary/long_end")
    axes = b.const("/model/constants/axes_0_slice", np.array([0], np.int64))
    out = []
    for kind, cache in (("cos", cos), ("sin", sin)):
        short = b.op("Slice", [cache, zero, width_1d, axes], f"/model/rotary/{kind}_short")
        long = b.op("Slice", [cache, orig_1d, long_end, axes], f"/model/rotary/{kind}_long")
        out.append(b.op("Where", [is_long, long, short], f"/model/rotary/{kind}_select"))
    return out[0], out[1]


@dataclass
class QKV:
    """Attention projections: packed (q holds [q | k | v], k and v are None) or separate."""

    q: ir.Value
    k: ir.Value | None = None
    v: ir.Value | None = None


def make_qkv_packed(ctx: Context, layer: int, x: ir.Value) -> QKV:
    """x ──qkv_proj (one MatMul)──▶ [q | k | v]"""
    s = ctx.spec
    hf = tensor_name("qkv_proj", layer)
    return QKV(make_linear(ctx, f"/model/layers.{layer}/attn/qkv_proj", x, hf, s.qkv_dim, s.hidden_size))


def _qkv_rows(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    h, kv = spec.hidden_size, spec.kv_dim
    return {"q": (0, h), "k": (h, h + kv), "v": (h + kv, h + 2 * kv)}


def make_qkv_separate(ctx: Context, layer: int, x: ir.Value) -> QKV:
    """x ──q_proj──▶ q,  x ──k_proj──▶ k,  x ──v_proj──▶ v   (row blocks of qkv_proj)"""
    s = ctx.spec
    out = {}
    for part, (lo, hi) in _qkv_rows(s).items():
        ref = WeightRef.row_block("qkv_proj", layer, part, (lo, hi))
        out[part] = make_linear(ctx, f"/model/layers.{layer}/attn/{part}_proj", x, ref, hi - lo, s.hidden_size)
    return QKV(out["q"], out["k"], out["v"])


def _split_qkv(ctx: Context, layer: int, qkv: QKV) -> QKV:
    """[q | k | v] ──Split──▶ q, k, v   (no-op when already separate)"""
    if qkv.k is not None:
        return qkv
    s = ctx.spec
    sizes = ctx.b.const(f"/model/layers.{layer}/attn/qkv_sizes", np.array([s.hidden_size, s.kv_dim, s.kv_dim], np.int64))
    q, k, v = ctx.b.op_multi("Split", [qkv.q, sizes], f"/model/layers.{layer}/attn/qkv_split", outputs=3, axis=-1)
    return QKV(q, k, v)


def rotary_in_attention(ctx: Context, layer: int, qkv: QKV, attn: AttentionInputs) -> tuple[QKV, list[ir.Value | None], int]:
    """GQA rotates q and k itself: pass cos/sin caches as GQA inputs 7 and 8, do_rotary=1."""
    return qkv, [attn.cos, attn.sin], 1


def rotary_separate(ctx: Context, layer: int, qkv: QKV, attn: AttentionInputs) -> tuple[QKV, list[ir.Value | None], int]:
    """q ──RotaryEmbedding(position_ids)──▶ q',  k ──RotaryEmbedding──▶ k'; GQA then has do_rotary=0.

    The DirectML way: DML's GQA does not rotate, so rotation is a com.microsoft.RotaryEmbedding.
    """
    s, p = ctx.spec, f"/model/layers.{layer}/attn"
    qkv = _split_qkv(ctx, layer, qkv)
    rotated = {}
    partial = {"rotary_embedding_dim": s.rotary_dim} if s.rotary_dim != s.head_dim else {}
    for part, x, heads in (("q", qkv.q, s.num_heads), ("k", qkv.k, s.num_kv_heads)):
        rotated[part] = ctx.b.op(
            "RotaryEmbedding", [x, attn.position_ids, attn.cos, attn.sin], f"{p}/{part}_rotary/RotaryEmbedding",
            domain=MS_DOMAIN, interleaved=0, num_heads=heads, **partial,
        )
    return QKV(rotated["q"], rotated["k"], qkv.v), [], 0


def add_qkv_bias(ctx: Context, layer: int, qkv: QKV) -> QKV:
    """Phi-3.5-MoE's q/k/v biases: one Add over the packed projection, or one per separate projection."""
    s, p = ctx.spec, f"/model/layers.{layer}/attn"
    hf = tensor_name("qkv_proj", layer)  # Phimoe's q/k/v served under the fused Phi-3 name (phimoe_tensors.PhimoeWeights)
    if qkv.k is None:
        return QKV(make_bias_add(ctx, f"{p}/qkv_proj", qkv.q, hf.replace(".weight", ".bias"), s.qkv_dim))
    sizes = {"q": s.hidden_size, "k": s.kv_dim, "v": s.kv_dim}
    out = {part: make_bias_add(ctx, f"{p}/{part}_proj", getattr(qkv, part), hf.replace("qkv_proj.weight", f"{part}_proj.bias"), n)
           for part, n in sizes.items()}
    return QKV(out["q"], out["k"], out["v"])


# graph-shape choices (targets.GraphOptions) → the subgraph function that implements each
PROJECTIONS: dict[bool, Callable[[Context, int, ir.Value], QKV]] = {True: make_qkv_packed, False: make_qkv_separate}
ROTARIES: dict[bool, Callable[[Context, int, QKV, AttentionInputs], tuple[QKV, list[ir.Value | None], int]]] = {
    True: rotary_in_attention,
    False: rotary_separate,
}


def make_attention(ctx: Context, layer: int, x: ir.Value, past_k: ir.Value, past_v: ir.Value, attn: AttentionInputs) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Q/K/V projection, rotary, GroupQueryAttention (KV cache + sliding window), o_proj.

    x ──qkv_proj──▶ qkv ──GQA(past, seqlens_k, total, cos, sin)──▶ attn ──o_proj──▶ out     (packed, do_rotary)
    x ──q/k/v_proj──▶ q,k,v ──RotaryEmbedding(q,k)──▶ GQA(past, seqlens_k, total)──▶ ...    (separate)
                                     └──▶ present key/value
    An EP whose GQA ignores local_window_size (DirectML) gets the window from plain_attention over GQA's
    present K/V instead of GQA's output (package/window_free.py writes the fast copy without it).
    """
    s, opts = ctx.spec, ctx.target.graph
    p = f"/model/layers.{layer}/attn"
    qkv = PROJECTIONS[opts.packed_qkv](ctx, layer, x)
    if s.attention_bias:
        qkv = add_qkv_bias(ctx, layer, qkv)
    qkv, rotary_inputs, do_rotary = ROTARIES[opts.rotary_in_attention](ctx, layer, qkv, attn)
    window = s.attention_window
    out, present_k, present_v = ctx.b.op_multi(
        "GroupQueryAttention",
        [qkv.q, qkv.k, qkv.v, past_k, past_v, attn.seqlens_k, attn.total_len, *rotary_inputs],
        f"{p}/GroupQueryAttention",
        domain=MS_DOMAIN,
        outputs=3,
        num_heads=s.num_heads,
        kv_num_heads=s.num_kv_heads,
        scale=float(1.0 / np.sqrt(s.head_dim)),
        do_rotary=do_rotary,
        rotary_interleaved=0,
        # a query sees the last `window` keys, itself included (transformers' sliding_window)
        local_window_size=window or -1,
    )
    if attn.window_visible is not None:  # this EP's GQA ignores the window: GQA keeps the cache, plain ops attend
        out = plain_attention(ctx, f"{p}/window", qkv.q, present_k, present_v, attn.window_visible, attn.total_keys,
                              float(1.0 / np.sqrt(s.head_dim)))
    o = make_linear(ctx, f"{p}/o_proj", out, tensor_name("o_proj", layer), s.hidden_size, s.hidden_size)
    if s.attention_bias:
        o = make_bias_add(ctx, f"{p}/o_proj", o, tensor_name("o_proj", layer).replace(".weight", ".bias"), s.hidden_size)
    return o, present_k, present_v
