"""Phi-3.5-MoE's sparse MLP: the sparsemixer router in plain ops, the experts in ORT's MoE/QMoE or plain ops.

Router (every target, float32, never quantized): transformers' `sparsemixer` at inference, exactly:

    logits = x W_router^T                                   [B, S, E]
    e1 = argmax(logits);  m1 = softmax(logits masked to experts within 2*eps of the max)[e1]
    e2 = argmax(logits without e1);  m2 = softmax(logits without e1, masked around the second max)[e2]
    out = m1 * expert_e1(x) + m2 * expert_e2(x)

("within 2*eps": (max - l) / max(|l|, max) <= 2 * router_jitter_noise.) The routing weights are
per-choice softmaxes, so m1 + m2 is not 1 and no softmax-top-k op reproduces them directly.

Experts, `target.graph.moe_op`:
  True  com.microsoft.MoE (float weights) / QMoE (int4, block-wise, symmetric) with k=2,
        normalize_routing_weights=1 and router_probs = log(m) at e1/e2 (lowest elsewhere): the op's
        top-2 picks e1, e2 and its normalized softmax gives m_j / (m1 + m2); one Mul by (m1 + m2)
        restores transformers' weights. Why not the op's own use_sparse_mixer: ORT 1.32's CPU MoE and
        QMoE ignore it (they compute plain softmax top-k; measured), and the CUDA kernel fixes the
        jitter eps at 0.01 with no attribute for the config's value. One router for every EP,
        checked against transformers on the CPU.
        fc1 holds [gate; up] rows interleaved (g0, u0, g1, u1, ...: swiglu_fusion=1, the only layout
        ORT's CPU kernels accept); SwiGLU with alpha 1, beta 0 and no limit is silu(gate) * up.
  False plain ops (DirectML has no MoE kernel): every expert runs on every token (MatMul /
        MatMulNBits), weighted by its routing weight (0 for experts not chosen) and summed. No
        control flow, so DML graph capture works; the cost is num_experts / 2 times the expert
        FLOPs and weight reads of the sparse op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from phi3_onnx.checkpoint.phimoe_tensors import phimoe_name
from phi3_onnx.graph.builder import MS_DOMAIN, Context, make_linear

_LOWEST = {"float32": np.finfo(np.float32).min, "float16": np.finfo(np.float16).min}


@dataclass
class Routing:
    """The router's decision for every token: what the op and the plain-op experts read."""

    dense: ir.Value  # [B, S, E] float32: m1 at e1, m2 at e2, 0 elsewhere
    op_probs: ir.Value  # [B*S, E] io dtype: log(m) at e1/e2, lowest elsewhere (for the op's normalized top-2)
    op_scale: ir.Value  # [B, S, 1] io dtype: m1 + m2


def _router_weight(ctx: Context, layer: int) -> ir.Value:
    """W_router^T [hidden, experts] in float32 for every target: the routing decision stays exact."""
    s, name = ctx.spec, phimoe_name("router", layer)

    def load() -> np.ndarray:
        return np.ascontiguousarray(ctx.weights.read(name).T, dtype=np.float32)

    return ctx.b.lazy(name, load, ir.DataType.FLOAT, (s.hidden_size, s.moe.num_experts))


def make_router(ctx: Context, layer: int, x: ir.Value) -> Routing:
    """x ──MatMul(router, fp32)──▶ logits ──sparsemixer (two masked softmaxes)──▶ Routing."""
    s, b = ctx.spec, ctx.b
    p = f"/model/layers.{layer}/moe/router"
    if ctx.dtype != ir.DataType.FLOAT:
        x = b.op("Cast", [x], f"{p}/x_fp32", to=ir.DataType.FLOAT)
    logits = b.op("MatMul", [x, _router_weight(ctx, layer)], f"{p}/MatMul")
    n = s.moe.num_experts
    c = lambda name, a: b.const(f"{p}/{name}", a)
    experts = c("expert_ids", np.arange(n, dtype=np.int64))
    neg_inf, zero = c("neg_inf", np.array(-np.inf, np.float32)), c("zero", np.array(0.0, np.float32))
    two_eps = c("two_eps", np.array(2 * s.moe.router_jitter_eps, np.float32))
    axes = c("axes", np.array([-1], np.int64))
    magnitude = b.op("Abs", [logits], f"{p}/Abs")

    def choose(k: int, scores: ir.Value) -> tuple[ir.Value, ir.Value]:
        """The k-th choice: its one-hot [B, S, E] and its weight [B, S, 1] (softmax over the experts near its logit)."""
        top = b.op("ReduceMax", [scores, axes], f"{p}/top{k}/ReduceMax", keepdims=1)
        index = b.op("ArgMax", [scores], f"{p}/top{k}/ArgMax", axis=-1, keepdims=1)
        onehot = b.op("Equal", [experts, index], f"{p}/top{k}/onehot")
        factor = b.op("Max", [magnitude, top], f"{p}/top{k}/factor")  # |l| clamped below at the chosen logit
        gap = b.op("Div", [b.op("Sub", [top, logits], f"{p}/top{k}/Sub"), factor], f"{p}/top{k}/gap")
        far = b.op("Greater", [gap, two_eps], f"{p}/top{k}/far")
        gates = b.op("Softmax", [b.op("Where", [far, neg_inf, scores], f"{p}/top{k}/masked")], f"{p}/top{k}/Softmax", axis=-1)
        weight = b.op("ReduceSum", [b.op("Where", [onehot, gates, zero], f"{p}/top{k}/pick"), axes], f"{p}/top{k}/weight", keepdims=1)
        return onehot, weight

    one1, m1 = choose(1, logits)
    rest = b.op("Where", [one1, neg_inf, logits], f"{p}/top2/scores")  # the first choice masked out
    one2, m2 = choose(2, rest)
    w1 = b.op("Where", [one1, m1, zero], f"{p}/dense1")
    dense = b.op("Where", [one2, m2, w1], f"{p}/dense")
    chosen = b.op("Or", [one1, one2], f"{p}/chosen")
    lowest = c("lowest", np.array(_LOWEST[ctx.np_dtype], np.float32))
    probs = b.op("Where", [chosen, b.op("Log", [dense], f"{p}/Log"), lowest], f"{p}/log_weights")
    probs = b.op("Reshape", [probs, c("probs_shape", np.array([-1, n], np.int64))], f"{p}/probs_2d")
    scale = b.op("Add", [m1, m2], f"{p}/scale")
    if ctx.dtype != ir.DataType.FLOAT:
        probs = b.op("Cast", [probs], f"{p}/probs_cast", to=ctx.dtype)
        scale = b.op("Cast", [scale], f"{p}/scale_cast", to=ctx.dtype)
    return Routing(dense, probs, scale)


# ----------------------------------------------------------------------------- stacked expert weights


def _expert_rows(ctx: Context, layer: int, expert: int, part: str) -> np.ndarray:
    """fc1 of one expert: [gate; up] interleaved row by row ([2I, H]); fc2: w2 ([H, I])."""
    read = ctx.weights.read
    if part == "fc2":
        return read(phimoe_name("w2", layer, expert))
    gate, up = read(phimoe_name("w1", layer, expert)), read(phimoe_name("w3", layer, expert))
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], gate.shape[1])


def _fc_shape(ctx: Context, part: str) -> tuple[int, int]:
    s = ctx.spec
    return (2 * s.intermediate_size, s.hidden_size) if part == "fc1" else (s.hidden_size, s.intermediate_size)


def _stacked_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{part}"


def _float_experts(ctx: Context, layer: int, part: str) -> ir.Value:
    """[E, N, K] float weights of every expert (MoE's fc1 / fc2)."""
    n_exp, (n, k) = ctx.spec.moe.num_experts, _fc_shape(ctx, part)

    def load() -> np.ndarray:
        out = np.empty((n_exp, n, k), dtype=ctx.np_dtype)
        for e in range(n_exp):
            out[e] = _expert_rows(ctx, layer, e, part)
        return out

    return ctx.b.lazy(_stacked_name(layer, part), load, ctx.dtype, (n_exp, n, k))


@dataclass
class _Stacked:
    packed: np.ndarray  # [E, N, K/2] uint8
    scales: np.ndarray  # [E, N, K/block]


def _int4_experts(ctx: Context, layer: int, part: str) -> tuple[ir.Value, ir.Value]:
    """QMoE's [E, N, K/2] packed int4 (low nibble first, zero point 8) and [E, N, K/block] scales,
    packed expert by expert with the target's int4 packer (MatMulNBits' layout, one row of blocks per N)."""
    recipe, n_exp, (n, k) = ctx.target.quant, ctx.spec.moe.num_experts, _fc_shape(ctx, part)
    bs = recipe.block_size
    key = _stacked_name(layer, part)

    def quantized() -> _Stacked:
        if ctx.pack_int4 is None:
            raise ValueError(f"target {ctx.target.name} is int4 but the graph was given no int4 packer")
        packed = np.empty((n_exp, n, k // 2), np.uint8)
        scales = np.empty((n_exp, n, k // bs), ctx.np_dtype)
        for e in range(n_exp):
            blocks = ctx.pack_int4(_expert_rows(ctx, layer, e, part), bs, True, ctx.np_dtype)
            packed[e] = blocks.packed.reshape(n, k // 2)
            scales[e] = blocks.scales.reshape(n, k // bs)
        return _Stacked(packed, scales)

    parts = frozenset({"packed", "scales"})
    take = lambda name: lambda: ctx.int4.take(key, name, parts, quantized)
    packed = ctx.b.lazy(f"{key}_Q4", take("packed"), ir.DataType.UINT8, (n_exp, n, k // 2))
    scales = ctx.b.lazy(f"{key}_scales", take("scales"), ctx.dtype, (n_exp, n, k // bs))
    return packed, scales


def qmoe_fits(ctx: Context) -> bool:
    """QMoE needs hidden and intermediate sizes that the block size divides (it does not pad K)."""
    bs = ctx.target.quant.block_size
    return ctx.spec.hidden_size % bs == 0 and ctx.spec.intermediate_size % bs == 0


# ----------------------------------------------------------------------------- the block


_OP_ATTRS = {"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0,
             "normalize_routing_weights": 1, "use_sparse_mixer": 0}


def make_moe_op(ctx: Context, layer: int, x: ir.Value, routing: Routing) -> ir.Value:
    """x, router_probs ──MoE / QMoE(k=2, normalized)──▶ y ──Mul(m1 + m2)──▶ out"""
    b, p, recipe = ctx.b, f"/model/layers.{layer}/moe", ctx.target.quant
    if recipe is None:
        fc1, fc2 = _float_experts(ctx, layer, "fc1"), _float_experts(ctx, layer, "fc2")
        y = b.op("MoE", [x, routing.op_probs, fc1, None, fc2], f"{p}/MoE", domain=MS_DOMAIN, **_OP_ATTRS)
    else:
        if not recipe.symmetric:
            raise ValueError("QMoE experts need symmetric int4 (zero point 8)")
        fc1, s1 = _int4_experts(ctx, layer, "fc1")
        fc2, s2 = _int4_experts(ctx, layer, "fc2")
        y = b.op("QMoE", [x, routing.op_probs, fc1, s1, None, fc2, s2], f"{p}/QMoE", domain=MS_DOMAIN, **_OP_ATTRS,
                 expert_weight_bits=recipe.bits, block_size=recipe.block_size, weights_prepacked=0,
                 accuracy_level=recipe.accuracy_level)
    return b.op("Mul", [y, routing.op_scale], f"{p}/routing_scale")


def make_moe_dense(ctx: Context, layer: int, x: ir.Value, routing: Routing) -> ir.Value:
    """Plain ops: out = sum_e w_e * (silu(x W1_e^T) * (x W3_e^T)) W2_e^T, w_e = 0 for experts not chosen."""
    s, b, p = ctx.spec, ctx.b, f"/model/layers.{layer}/moe"
    weights = routing.dense
    if ctx.dtype != ir.DataType.FLOAT:
        weights = b.op("Cast", [weights], f"{p}/weights_cast", to=ctx.dtype)
    axes = b.const(f"{p}/last_axis", np.array([-1], np.int64))
    out = None
    for e in range(s.moe.num_experts):
        q = f"{p}/experts.{e}"
        gate = make_linear(ctx, f"{q}/w1", x, phimoe_name("w1", layer, e), s.intermediate_size, s.hidden_size)
        up = make_linear(ctx, f"{q}/w3", x, phimoe_name("w3", layer, e), s.intermediate_size, s.hidden_size)
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{q}/Sigmoid")], f"{q}/silu")
        h = b.op("Mul", [act, up], f"{q}/Mul")
        y = make_linear(ctx, f"{q}/w2", h, phimoe_name("w2", layer, e), s.hidden_size, s.intermediate_size)
        lo, hi = b.const(f"{q}/lo", np.array([e], np.int64)), b.const(f"{q}/hi", np.array([e + 1], np.int64))
        w = b.op("Slice", [weights, lo, hi, axes], f"{q}/weight")
        y = b.op("Mul", [y, w], f"{q}/weighted")
        out = y if out is None else b.op("Add", [out, y], f"{q}/Add")
    return out


def make_moe(ctx: Context, layer: int, x: ir.Value) -> ir.Value:
    """router ──▶ experts (the op where the target's EP has one and QMoE's block constraint holds; plain ops otherwise)."""
    routing = make_router(ctx, layer, x)
    use_op = ctx.target.graph.moe_op and (ctx.target.quant is None or qmoe_fits(ctx))
    return (make_moe_op if use_op else make_moe_dense)(ctx, layer, x, routing)


__all__ = ["Routing", "make_moe", "make_moe_dense", "make_moe_op", "make_router", "qmoe_fits"]
