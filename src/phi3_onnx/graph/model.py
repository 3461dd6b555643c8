"""The Phi-3 decoder graph with ONNX Runtime's fused contrib ops, one small function per subgraph.

Weights are `onnx_ir.LazyTensor`s: nothing is read or quantized until `onnx_ir.save` streams the
initializers to the external-data file one by one, which bounds export memory to a few tensors.

Graph I/O (the onnxruntime-genai "phi3" decoder contract):
    input_ids [batch, seq] int64, attention_mask [batch, total] int64,
    (position_ids [batch, seq] int64 when target.graph.position_ids_input),
    past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
    -> logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]

Graph shape follows `target.graph` (GraphOptions): each flag selects one of two subgraph functions
(PROJECTIONS and ROTARIES in attention.py, GATE_UPS in mlp.py). No target gets control flow (If/Loop): CUDA graphs and
DirectML graph capture replay one recorded decode step, so even the LongRoPE switch is data flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from phi3_onnx.checkpoint.tensors import lm_head_role, tensor_name
from phi3_onnx.checkpoint.phimoe_tensors import PhimoeWeights
from phi3_onnx.graph import phi3_small
from phi3_onnx.graph.attention import AttentionInputs, make_attention, make_attention_inputs
from phi3_onnx.graph.builder import (MS_DOMAIN, OPSET, Context, GraphBuilder, Int4Packer, WeightSource, make_bias_add,
                                     make_int4_weight, make_linear, make_weight)
from phi3_onnx.graph.mlp import make_mlp
from phi3_onnx.graph.moe import make_moe
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target


def make_norm(ctx: Context, name: str, x: ir.Value | None, residual: ir.Value, hf_name: str) -> tuple[ir.Value, ir.Value]:
    """RMSNorm, fused with the residual add when there is one.

    residual ──SimplifiedLayerNorm──▶ normed              (first layer: residual is the embedding)
    x, residual ──SkipSimplifiedLayerNorm──▶ normed, x + residual
    """
    gamma = make_weight(ctx, hf_name, (ctx.spec.hidden_size,))
    eps = ctx.spec.rms_norm_eps
    if ctx.spec.norm == "layer":
        return make_layer_norm(ctx, name, x, residual, gamma, hf_name)
    if x is None:
        normed = ctx.b.op("SimplifiedLayerNormalization", [residual, gamma], f"{name}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
        return normed, residual
    outs = ctx.b.op_multi("SkipSimplifiedLayerNormalization", [x, residual, gamma], f"{name}/SkipLayerNorm", domain=MS_DOMAIN, outputs=4, epsilon=eps)
    return outs[0], outs[3]


def make_layer_norm(ctx: Context, name: str, x: ir.Value | None, residual: ir.Value, gamma: ir.Value, hf_name: str) -> tuple[ir.Value, ir.Value]:
    """LayerNorm with bias (Phi-3.5-MoE, Phi-3-small; eps is the config's rms_norm_eps / layer_norm_epsilon).

    residual ──LayerNormalization(gamma, beta)──▶ normed            (first layer)
    x, residual ──SkipLayerNormalization(gamma, beta)──▶ normed, x + residual
    """
    beta = make_weight(ctx, hf_name.replace(".weight", ".bias"), (ctx.spec.hidden_size,))
    eps = ctx.spec.rms_norm_eps
    if x is None:
        normed = ctx.b.op("LayerNormalization", [residual, gamma, beta], f"{name}/LayerNorm", axis=-1, epsilon=eps, stash_type=1)
        return normed, residual
    outs = ctx.b.op_multi("SkipLayerNormalization", [x, residual, gamma, beta], f"{name}/SkipLayerNorm", domain=MS_DOMAIN, outputs=4, epsilon=eps)
    return outs[0], outs[3]


def embedding_is_quantized(ctx: Context) -> bool:
    """int4 embedding table: asked for (`quantize_embedding`), or tied to an int4 lm_head (one shared table)."""
    q = ctx.target.quant
    if q is None:
        return False
    return q.quantize_embedding or (ctx.spec.tie_word_embeddings and q.quantize_lm_head)


def make_embedding(ctx: Context, input_ids: ir.Value) -> ir.Value:
    """input_ids ──Gather(table)──▶ hidden, or ──GatherBlockQuantized(int4 table)──▶ hidden."""
    s = ctx.spec
    if embedding_is_quantized(ctx):
        return make_quantized_embedding(ctx, input_ids)
    table = make_weight(ctx, tensor_name("embed_tokens"), (s.vocab_size, s.hidden_size))
    return ctx.b.op("Gather", [table, input_ids], "/model/embed_tokens/Gather", axis=0)


def make_quantized_embedding(ctx: Context, input_ids: ir.Value) -> ir.Value:
    """Rows of the int4 table dequantized on the fly; with tied weights the lm_head MatMulNBits reads the same bytes.

    ids ──GatherBlockQuantized(packed [V, k_blocks, block/2], scales [V, k_blocks, 1])──▶ [B, S, k_blocks, block]
        ──Reshape──▶ [B, S, hidden]
    (MatMulNBits' scales are [V * k_blocks]; the Reshape of that initializer is folded when ORT loads the model.)
    """
    s, b, p = ctx.spec, ctx.b, "/model/embed_tokens"
    if not ctx.target.quant.symmetric:
        raise ValueError("an int4 embedding table needs symmetric quantization")
    w = make_int4_weight(ctx, tensor_name("embed_tokens"), s.vocab_size, s.hidden_size)
    k_blocks = -(-s.hidden_size // w.block_size)  # a padded last block (hidden not a multiple) is sliced off
    scales = b.op("Reshape", [w.scales, b.const(f"{p}/scales_shape", np.array([s.vocab_size, k_blocks, 1], np.int64))], f"{p}/scales_3d")
    rows = b.op("GatherBlockQuantized", [w.packed, input_ids, scales], f"{p}/GatherBlockQuantized", domain=MS_DOMAIN,
                bits=ctx.target.quant.bits, block_size=w.block_size, gather_axis=0, quantize_axis=2)
    padded = k_blocks * w.block_size
    hidden = b.op("Reshape", [rows, b.const(f"{p}/hidden_shape", np.array([0, 0, padded], np.int64))], f"{p}/Reshape")
    if padded == s.hidden_size:
        return hidden
    ends = b.const(f"{p}/hidden_end", np.array([s.hidden_size], np.int64))
    return b.op("Slice", [hidden, b.const(f"{p}/zero", np.array([0], np.int64)), ends, b.const(f"{p}/last_axis", np.array([-1], np.int64))],
                f"{p}/unpad")


def make_lm_head(ctx: Context, x: ir.Value) -> ir.Value:
    """normed ──MatMul / MatMulNBits(lm_head)──▶ logits; tied float weights: Gemm(transB) over the embedding table."""
    s = ctx.spec
    name = tensor_name(lm_head_role(s))
    quantize = bool(ctx.target.quant and ctx.target.quant.quantize_lm_head)
    if s.tie_word_embeddings and not quantize:
        return make_tied_float_head(ctx, x)
    logits = make_linear(ctx, "/lm_head", x, name, s.vocab_size, s.hidden_size, quantize=quantize)
    if s.lm_head_bias:
        logits = make_bias_add(ctx, "/lm_head", logits, tensor_name("lm_head").replace(".weight", ".bias"), s.vocab_size)
    return logits


def make_tied_float_head(ctx: Context, x: ir.Value) -> ir.Value:
    """Tied, unquantized: one [V, hidden] table for the Gather and the head, read transposed by Gemm.

    x [B, S, H] ──Reshape──▶ [B*S, H] ──Gemm(table, transB=1)──▶ [B*S, V] ──Reshape(B, S, V)──▶ logits
    """
    s, b, p = ctx.spec, ctx.b, "/lm_head"
    table = make_weight(ctx, tensor_name("embed_tokens"), (s.vocab_size, s.hidden_size))
    flat = b.op("Reshape", [x, b.const(f"{p}/flat_shape", np.array([-1, s.hidden_size], np.int64))], f"{p}/Flatten")
    logits = b.op("Gemm", [flat, table], f"{p}/Gemm", transB=1)
    lead = b.op("Shape", [x], f"{p}/Shape", start=0, end=2)
    vocab = b.const(f"{p}/vocab", np.array([s.vocab_size], np.int64))
    shape = b.op("Concat", [lead, vocab], f"{p}/out_shape", axis=0)
    return b.op("Reshape", [logits, shape], f"{p}/Reshape")


# ----------------------------------------------------------------------------- model


def _io(name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
    return ir.val(name, dtype, shape)


def make_position_ids_input(ctx: Context) -> ir.Value | None:
    """position_ids [batch, seq] int64 as a graph input (DirectML-style graphs), or None."""
    if not ctx.target.graph.position_ids_input:
        return None
    return _io("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])


@dataclass(frozen=True)
class DecoderParts:
    """The subgraph functions of one architecture; build_model wires them the same way for all."""

    attention_inputs: Callable[..., AttentionInputs]
    embedding: Callable[[Context, ir.Value], ir.Value]
    norm: Callable[[Context, str, ir.Value | None, ir.Value, str], tuple[ir.Value, ir.Value]]
    attention: Callable[..., tuple[ir.Value, ir.Value, ir.Value]]
    mlp: Callable[[Context, int, ir.Value], ir.Value]
    head: Callable[[Context, ir.Value], ir.Value]


def make_phi3_mlp(ctx: Context, layer: int, x: ir.Value) -> ir.Value:
    """Phi-3's SwiGLU MLP, or Phi-3.5-MoE's mixture of them (graph/moe.py)."""
    return make_mlp(ctx, layer, x) if ctx.spec.moe is None else make_moe(ctx, layer, x)


PHI3 = DecoderParts(make_attention_inputs, make_embedding, make_norm, make_attention, make_phi3_mlp, make_lm_head)
PHI3_SMALL = DecoderParts(  # LayerNorm + biases, gegelu, muP scaling, block-sparse attention (graph/phi3_small.py)
    phi3_small.make_small_attention_inputs,
    lambda ctx, ids: phi3_small.scale_embedding(ctx, make_embedding(ctx, ids)),
    make_norm,  # spec.norm == "layer": LayerNorm with bias
    phi3_small.make_small_attention,
    phi3_small.make_gegelu_mlp,
    lambda ctx, x: phi3_small.scale_logits(ctx, make_lm_head(ctx, x)),
)


def decoder_parts(spec: ModelSpec) -> DecoderParts:
    return PHI3_SMALL if spec.small is not None else PHI3


def build_model(spec: ModelSpec, target: Target, weights: WeightSource, pack_int4: Int4Packer | None = None) -> ir.Model:
    """The whole decoder graph for one target; weights stay lazy until saved.

    `pack_int4` quantizes each weight of an int4 target when it is saved (the quantizer's packer).
    """
    if spec.moe is not None:  # Phimoe's q/k/v read as Phi-3's fused qkv_proj (checkpoint/phimoe_tensors.py)
        weights = PhimoeWeights(weights)
    ctx = Context(GraphBuilder(), spec, target, weights, pack_int4)
    kv_shape: list[int | str] = ["batch_size", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    present_shape: list[int | str] = ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim]
    input_ids = ctx.input_ids = _io("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    mask = _io("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
    position_ids = make_position_ids_input(ctx)
    inputs = [input_ids, mask, *([position_ids] if position_ids is not None else [])]
    parts = decoder_parts(spec)
    attn = parts.attention_inputs(ctx, mask, position_ids)
    hidden, residual = None, parts.embedding(ctx, input_ids)
    presents = []
    for i in range(spec.num_layers):
        past_k = _io(f"past_key_values.{i}.key", ctx.dtype, kv_shape)
        past_v = _io(f"past_key_values.{i}.value", ctx.dtype, kv_shape)
        inputs += [past_k, past_v]
        normed, residual = parts.norm(ctx, f"/model/layers.{i}/input_layernorm", hidden, residual, tensor_name("input_layernorm", i))
        attn_out, pk, pv = parts.attention(ctx, i, normed, past_k, past_v, attn)
        normed, residual = parts.norm(ctx, f"/model/layers.{i}/post_attention_layernorm", attn_out, residual, tensor_name("post_attention_layernorm", i))
        hidden = parts.mlp(ctx, i, normed)
        pk.name, pv.name = f"present.{i}.key", f"present.{i}.value"
        pk.type, pv.type = ir.TensorType(ctx.dtype), ir.TensorType(ctx.dtype)
        pk.shape, pv.shape = ir.Shape(present_shape), ir.Shape(present_shape)
        presents += [pk, pv]
    normed, _ = parts.norm(ctx, "/model/norm", hidden, residual, tensor_name("norm"))
    logits = parts.head(ctx, normed)
    logits.name = "logits"
    logits.type, logits.shape = ir.TensorType(ctx.dtype), ir.Shape(["batch_size", "sequence_length", spec.vocab_size])
    outputs = [logits, *presents]
    graph = ir.Graph(
        inputs, outputs, nodes=ctx.b.nodes, initializers=ctx.b.initializers,
        opset_imports={"": OPSET, MS_DOMAIN: 1}, name="phi3",
    )
    return ir.Model(graph, ir_version=10, producer_name="phi3-onnx")
