"""Phi-3-small's subgraphs: LayerNorm with bias, biased projections, block-sparse attention, gegelu, muP scaling.

The checkpoint is read under Phi-3 names with q/k/v and the gegelu halves de-interleaved
(`checkpoint.phi3_small`), so the projections reuse Phi-3's packed/separate choices; what differs:

    embedding ──Mul(mup_embedding_multiplier)──▶ hidden
    LayerNormalization / SkipLayerNormalization (gamma, beta)
    x ──qkv MatMul──Add(bias)──▶ GQA (dense layers: dense every n-th)             ──o_proj──Add(bias)
                              └─▶ GQA + block-sparse attention_bias   (CPU)
                              └─▶ GQA (cache) ─▶ present K/V ─▶ plain-op attention + rule  (DML)
                              └─▶ SparseAttention(block_row/col_indices)  (CUDA)
    gate_up ──Add(bias)──Split──▶ gelu half: Where(IsInf, x, Min(x, limit))  ──x·σ(1.702x)──┐
                              └─▶ linear half: Where(IsInf, x, Clip(±limit)) + 1 ──────────Mul──down──Add(bias)
    logits ──Div(mup_width_multiplier)──Where(dummy ids, -65504)──▶ logits

Which attention op a sparse layer gets (`sparse_op`): ORT's SparseAttention needs past and present
in one shared buffer (a max-length KV cache bound with IO binding: what onnxruntime-genai does), and
its CPU kernel refuses anything else; a plain InferenceSession with a growing past cannot feed it.
So CUDA graphs use SparseAttention; the CPU graphs GroupQueryAttention with an additive bias that holds
the same block-sparse rule. DirectML's GQA kernel ignores attention_bias (it reads query, key, value and
seqlens_k only), so its sparse layers let GQA append to the cache and attend in plain ops over GQA's
present K/V with the rule as a Where (`_plain_sparse_attention`; GQA's own dense output goes unused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from phi3_onnx.checkpoint.phi3_small import bias_name
from phi3_onnx.checkpoint.tensors import tensor_name
from phi3_onnx.graph.attention import (
    QKV,
    ROTARIES,
    AttentionInputs,
    _qkv_rows,
    make_attention_inputs,
    plain_attention,
    step_positions,
)
from phi3_onnx.graph.blocksparse import csr_layout, head_offsets
from phi3_onnx.graph.builder import (
    MS_DOMAIN,
    Context,
    WeightRef,
    make_linear,
    make_weight,
)
from phi3_onnx.spec import SmallSpec
from phi3_onnx.targets import BIASED_GQA_PROVIDERS, SPARSE_ATTENTION_PROVIDERS

SPARSE_BLOCK_SIZES = (16, 32, 64, 128)  # SparseAttention's sparse_block_size choices


def small_of(ctx: Context) -> SmallSpec:
    assert ctx.spec.small is not None
    return ctx.spec.small


def sparse_op(ctx: Context) -> str:
    """A block-sparse layer's form: SparseAttention (CUDA), GQA with the rule as attention_bias (EPs whose GQA
    applies the bias: CPU), or "PlainAttention" (DirectML: GQA keeps the cache, plain ops attend over it)."""
    if ctx.target.provider in SPARSE_ATTENTION_PROVIDERS:
        return "SparseAttention"
    return "GroupQueryAttention" if ctx.target.provider in BIASED_GQA_PROVIDERS else "PlainAttention"


@dataclass
class SmallAttentionInputs(AttentionInputs):
    """Phi-3's per-step attention inputs plus the sparse layers': a bias (GQA) or the CSR layout (SparseAttention)."""

    sparse_bias: ir.Value | None = None  # [1, heads or 1, seq, total]: 0 where visible, lowest elsewhere
    sparse_visible: ir.Value | None = None  # bool [batch, heads or 1, seq, total]: the rule, causal and the mask (PlainAttention)
    total_keys: ir.Value | None = None  # int64 [1]: keys this step attends over (PlainAttention slices the cache to it)
    block_rows: ir.Value | None = None
    block_cols: ir.Value | None = None
    key_lengths: ir.Value | None = None  # int32 [batch]: real keys per sequence (SparseAttention)


def _c(ctx: Context, name: str, value: np.ndarray) -> ir.Value:
    return ctx.b.const(f"/model/sparse/{name}", value)


def make_sparse_bias(ctx: Context, mask: ir.Value) -> ir.Value:
    """The block-sparse rule over this step's positions, as GQA's additive attention_bias
    (causality inside and across blocks is GQA's own)."""
    b = ctx.b
    visible = _sparse_rule(ctx, mask)
    lowest = np.array(np.finfo(ctx.np_dtype).min, ctx.np_dtype)
    bias = b.op("Where", [visible, _c(ctx, "zero_f", np.array(0, ctx.np_dtype)), _c(ctx, "lowest", lowest)], "/model/sparse/bias_3d")
    return b.op("Unsqueeze", [bias, _c(ctx, "axis_0", np.array([0], np.int64))], "/model/sparse/bias")


def make_sparse_visible(ctx: Context, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """PlainAttention's visibility: the block-sparse rule & causal (kpos <= qpos) & the attention mask's real
    keys, bool [batch, heads|1, S, T]; and T as int64 [1]."""
    pos = step_positions(ctx, mask, "/model/sparse_plain")
    visible = ctx.b.op("And", [_sparse_rule(ctx, mask), pos.causal_keys], "/model/sparse/visible_4d")
    return visible, pos.total_keys


def _sparse_rule(ctx: Context, mask: ir.Value) -> ir.Value:
    """The block-sparse rule over this step's positions, bool [heads|1, S, T].

    kpos = 0..T-1, qpos = T-S..T-1 (T: mask width, S: new tokens); kb, qb = pos // block
    visible = (qb - kb < local_blocks) | ((kb + head_offset + 1) % vert_stride == 0)
    """
    b, small = ctx.b, small_of(ctx)
    i64 = lambda name, v: _c(ctx, name, np.array(v, np.int64))
    total = b.op("Squeeze", [b.op("Shape", [mask], "/model/sparse/mask_shape", start=1, end=2)], "/model/sparse/total")
    seq = b.op("Squeeze", [b.op("Shape", [ctx.input_ids], "/model/sparse/ids_shape", start=1, end=2)], "/model/sparse/seq")
    one, block = i64("one", 1), i64("block", small.block_size)
    kb = b.op("Div", [b.op("Range", [i64("zero", 0), total, one], "/model/sparse/kpos"), block], "/model/sparse/kb")
    start = b.op("Sub", [total, seq], "/model/sparse/qstart")
    qb = b.op("Div", [b.op("Range", [start, total, one], "/model/sparse/qpos"), block], "/model/sparse/qb")
    qb_col = b.op("Unsqueeze", [qb, i64("axis_last", [1])], "/model/sparse/qb_col")
    local = b.op("Less", [b.op("Sub", [qb_col, kb], "/model/sparse/dist"), i64("local", small.local_blocks)], "/model/sparse/local")
    offsets = _c(ctx, "head_offsets", (head_offsets(small, ctx.spec.num_heads) + 1).reshape(-1, 1, 1))
    shifted = b.op("Add", [kb, offsets], "/model/sparse/kb_shifted")  # [H|1, 1, T]
    vertical = b.op("Equal", [b.op("Mod", [shifted, i64("vert", small.vert_stride)], "/model/sparse/mod"), i64("zero_v", 0)],
                    "/model/sparse/vertical")
    return b.op("Or", [local, vertical], "/model/sparse/visible")  # [H|1, S, T]


def make_small_attention_inputs(ctx: Context, mask: ir.Value, position_ids: ir.Value | None = None) -> SmallAttentionInputs:
    """Phi-3's inputs (seqlens_k, total, rotary rows), plus what the sparse layers' op needs."""
    base = make_attention_inputs(ctx, mask, position_ids)
    out = SmallAttentionInputs(**vars(base))
    small, spec = small_of(ctx), ctx.spec
    if not small.has_sparse_layer(spec.num_layers):
        return out
    if sparse_op(ctx) == "GroupQueryAttention":
        out.sparse_bias = make_sparse_bias(ctx, mask)
        return out
    if sparse_op(ctx) == "PlainAttention":
        out.sparse_visible, out.total_keys = make_sparse_visible(ctx, mask)
        return out
    if small.block_size not in SPARSE_BLOCK_SIZES:
        raise ValueError(f"SparseAttention takes block sizes {SPARSE_BLOCK_SIZES}, the model has {small.block_size}")
    rows, cols = csr_layout(spec)
    out.block_rows, out.block_cols = ctx.b.const("block_row_indices", rows), ctx.b.const("block_col_indices", cols)
    out.key_lengths = ctx.b.op("Add", [out.seqlens_k, _c(ctx, "one_i32", np.array(1, np.int32))], "/model/sparse/key_lengths")
    return out


def make_bias(ctx: Context, name: str, y: ir.Value, ref: WeightRef, size: int) -> ir.Value:
    """y ──Add(bias)──▶"""
    return ctx.b.op("Add", [y, make_weight(ctx, ref, (size,))], f"{name}/Add")


def _biased_linear(ctx: Context, name: str, x: ir.Value, role: str, layer: int, out_f: int, in_f: int) -> ir.Value:
    y = make_linear(ctx, name, x, tensor_name(role, layer), out_f, in_f)
    return make_bias(ctx, name, y, WeightRef.of(bias_name(role, layer)), out_f)


def _row_block_bias(role: str, layer: int, part: str, rows: tuple[int, int]) -> WeightRef:
    hf = bias_name(role, layer)
    return WeightRef(hf, hf.replace(f".{role}.", f".{part}_proj."), rows)


def make_small_qkv(ctx: Context, layer: int, x: ir.Value) -> QKV:
    """Packed: x ──qkv MatMul──Add──▶ [q|k|v]; separate: three MatMul + Add over the row blocks."""
    s, p = ctx.spec, f"/model/layers.{layer}/attn"
    if ctx.target.graph.packed_qkv:
        return QKV(_biased_linear(ctx, f"{p}/qkv_proj", x, "qkv_proj", layer, s.qkv_dim, s.hidden_size))
    out = {}
    for part, (lo, hi) in _qkv_rows(s).items():
        ref = WeightRef.row_block("qkv_proj", layer, part, (lo, hi))
        y = make_linear(ctx, f"{p}/{part}_proj", x, ref, hi - lo, s.hidden_size)
        out[part] = make_bias(ctx, f"{p}/{part}_proj", y, _row_block_bias("qkv_proj", layer, part, (lo, hi)), hi - lo)
    return QKV(out["q"], out["k"], out["v"])


def make_small_attention(ctx: Context, layer: int, x: ir.Value, past_k: ir.Value, past_v: ir.Value,
                         attn: SmallAttentionInputs) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Biased qkv, then GQA (dense layers, or with the sparse bias) or SparseAttention; biased o_proj."""
    s, small, p = ctx.spec, small_of(ctx), f"/model/layers.{layer}/attn"
    qkv = make_small_qkv(ctx, layer, x)
    if not small.is_dense(layer) and sparse_op(ctx) == "SparseAttention":
        out, pk, pv = _sparse_attention(ctx, layer, qkv, past_k, past_v, attn)
    else:
        qkv, rotary_inputs, do_rotary = ROTARIES[ctx.target.graph.rotary_in_attention](ctx, layer, qkv, attn)
        cos_sin = rotary_inputs or [None, None]
        bias = [None, attn.sparse_bias] if not small.is_dense(layer) and attn.sparse_bias is not None else []
        out, pk, pv = ctx.b.op_multi(
            "GroupQueryAttention",
            [qkv.q, qkv.k, qkv.v, past_k, past_v, attn.seqlens_k, attn.total_len, *(cos_sin if bias or rotary_inputs else []), *bias],
            f"{p}/GroupQueryAttention", domain=MS_DOMAIN, outputs=3, num_heads=s.num_heads, kv_num_heads=s.num_kv_heads,
            scale=float(small.attention_scale), do_rotary=do_rotary, rotary_interleaved=0, local_window_size=-1,
        )
        if not small.is_dense(layer) and attn.sparse_visible is not None:  # GQA only appended to the cache
            out = plain_attention(ctx, f"{p}/sparse", qkv.q, pk, pv, attn.sparse_visible, attn.total_keys, float(small.attention_scale))
    o = _biased_linear(ctx, f"{p}/o_proj", out, "o_proj", layer, s.hidden_size, s.hidden_size)
    return o, pk, pv


def _sparse_attention(ctx: Context, layer: int, qkv: QKV, past_k: ir.Value, past_v: ir.Value,
                      attn: SmallAttentionInputs) -> list[ir.Value]:
    """packed qkv ──SparseAttention(shared KV buffers, CSR layout, rotary)──▶ out, present k/v"""
    s, small = ctx.spec, small_of(ctx)
    return ctx.b.op_multi(
        "SparseAttention",
        [qkv.q, None, None, past_k, past_v, attn.block_rows, attn.block_cols, attn.total_len, attn.key_lengths, attn.cos, attn.sin],
        f"/model/layers.{layer}/attn/SparseAttention", domain=MS_DOMAIN, outputs=3, num_heads=s.num_heads,
        kv_num_heads=s.num_kv_heads, scale=float(small.attention_scale), sparse_block_size=small.block_size,
        do_rotary=1, rotary_interleaved=0,
    )


def _clamp(ctx: Context, name: str, x: ir.Value, low: float | None, high: float) -> ir.Value:
    """Where(IsInf(x), x, Clip(x, low, high)): the reference clamps finite values only."""
    b, dt = ctx.b, ctx.np_dtype
    lo = b.const(f"{name}/low", np.array(low, dt)) if low is not None else None
    clipped = b.op("Clip", [x, lo, b.const(f"{name}/high", np.array(high, dt))], f"{name}/Clip")
    return b.op("Where", [b.op("IsInf", [x], f"{name}/IsInf"), x, clipped], f"{name}/Where")


def make_gegelu_mlp(ctx: Context, layer: int, x: ir.Value) -> ir.Value:
    """gelu, linear halves of up_proj ──clamp──▶ quick_gelu(gelu) * (linear + 1) ──down_proj──▶"""
    s, b, small = ctx.spec, ctx.b, small_of(ctx)
    p, i = f"/model/layers.{layer}/mlp", s.intermediate_size
    if ctx.target.graph.packed_gate_up:
        gate_up = _biased_linear(ctx, f"{p}/gate_up_proj", x, "gate_up_proj", layer, 2 * i, s.hidden_size)
        gelu, linear = b.op_multi("Split", [gate_up], f"{p}/Split", outputs=2, axis=-1, num_outputs=2)
    else:
        halves = []
        for part, rows in (("gate", (0, i)), ("up", (i, 2 * i))):
            y = make_linear(ctx, f"{p}/{part}_proj", x, WeightRef.row_block("gate_up_proj", layer, part, rows), i, s.hidden_size)
            halves.append(make_bias(ctx, f"{p}/{part}_proj", y, _row_block_bias("gate_up_proj", layer, part, rows), i))
        gelu, linear = halves
    if small.gegelu_limit is not None:
        gelu = _clamp(ctx, f"{p}/gelu", gelu, None, small.gegelu_limit)
        linear = _clamp(ctx, f"{p}/linear", linear, -small.gegelu_limit, small.gegelu_limit)
    dt = ctx.np_dtype
    sig = b.op("Sigmoid", [b.op("Mul", [gelu, b.const(f"{p}/act/alpha", np.array(1.702, dt))], f"{p}/act/scaled")], f"{p}/act/Sigmoid")
    act = b.op("Mul", [gelu, sig], f"{p}/act/Mul")
    h = b.op("Mul", [act, b.op("Add", [linear, b.const(f"{p}/linear/one", np.array(1, dt))], f"{p}/linear/Add")], f"{p}/Mul")
    y = make_linear(ctx, f"{p}/down_proj", h, tensor_name("down_proj", layer), s.hidden_size, i)
    return make_bias(ctx, f"{p}/down_proj", y, WeightRef.of(bias_name("down_proj", layer)), s.hidden_size)


def scale_embedding(ctx: Context, rows: ir.Value) -> ir.Value:
    """embedding rows ──Mul(mup_embedding_multiplier)──▶ (no Mul when the multiplier is <= 0, as the reference)"""
    m = small_of(ctx).embedding_multiplier
    if m <= 0:
        return rows
    return ctx.b.op("Mul", [rows, ctx.b.const("/model/embed_tokens/mup_multiplier", np.array(m, ctx.np_dtype))], "/model/embed_tokens/Mul")


# the logit of dummy vocabulary ids in every dtype: fp16's lowest value. The reference writes its dtype's
# minimum; either way their probability is exactly 0, and fp16 and fp32 packages agree there
MASKED_LOGIT = float(np.finfo(np.float16).min)


def scale_logits(ctx: Context, logits: ir.Value) -> ir.Value:
    """logits / mup_width_multiplier; dummy vocabulary ids forced to MASKED_LOGIT (the reference: the dtype's minimum)."""
    b, small, dt = ctx.b, small_of(ctx), ctx.np_dtype
    out = b.op("Div", [logits, b.const("/lm_head/mup_width", np.array(small.width_multiplier, dt))], "/lm_head/mup_Div")
    if not small.dummy_token_ids:
        return out
    dummy = np.zeros(ctx.spec.vocab_size, bool)
    dummy[list(small.dummy_token_ids)] = True
    return b.op("Where", [b.const("/lm_head/dummy_tokens", dummy), b.const("/lm_head/masked", np.array(MASKED_LOGIT, dt)), out],
                "/lm_head/dummy_Where")


__all__ = [
    "SPARSE_ATTENTION_PROVIDERS",
    "SmallAttentionInputs",
    "make_gegelu_mlp",
    "make_small_attention",
    "make_small_attention_inputs",
    "make_sparse_bias",
    "scale_embedding",
    "scale_logits",
    "sparse_op",
]
