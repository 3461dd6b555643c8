"""MLP subgraphs: gate/up projections (packed or separate), SiLU gating, down projection."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from phi3_onnx.checkpoint.tensors import tensor_name
from phi3_onnx.graph.builder import Context, WeightRef, make_linear


def make_gate_up_packed(ctx: Context, layer: int, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """x ──gate_up_proj (one MatMul)──▶ [gate | up] ──Split──▶ gate, up"""
    s, p = ctx.spec, f"/model/layers.{layer}/mlp"
    hf = tensor_name("gate_up_proj", layer)
    gate_up = make_linear(ctx, f"{p}/gate_up_proj", x, hf, 2 * s.intermediate_size, s.hidden_size)
    gate, up = ctx.b.op_multi("Split", [gate_up], f"{p}/Split", outputs=2, axis=-1, num_outputs=2)
    return gate, up


def make_gate_up_separate(ctx: Context, layer: int, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """x ──gate_proj──▶ gate,  x ──up_proj──▶ up   (row halves of gate_up_proj; no Split copy)"""
    s, p = ctx.spec, f"/model/layers.{layer}/mlp"
    i = s.intermediate_size
    out = []
    for part, rows in (("gate", (0, i)), ("up", (i, 2 * i))):
        ref = WeightRef.row_block("gate_up_proj", layer, part, rows)
        out.append(make_linear(ctx, f"{p}/{part}_proj", x, ref, i, s.hidden_size))
    return out[0], out[1]


GATE_UPS: dict[bool, Callable[[Context, int, ir.Value], tuple[ir.Value, ir.Value]]] = {
    True: make_gate_up_packed,
    False: make_gate_up_separate,
}


def make_mlp(ctx: Context, layer: int, x: ir.Value) -> ir.Value:
    """gate, up ──▶ silu(gate) * up ──down_proj──▶ out"""
    s, b = ctx.spec, ctx.b
    p = f"/model/layers.{layer}/mlp"
    gate, up = GATE_UPS[ctx.target.graph.packed_gate_up](ctx, layer, x)
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/act_fn/Sigmoid")], f"{p}/act_fn/Mul")
    h = b.op("Mul", [act, up], f"{p}/Mul")
    return make_linear(ctx, f"{p}/down_proj", h, tensor_name("down_proj", layer), s.hidden_size, s.intermediate_size)
