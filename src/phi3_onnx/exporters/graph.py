"""Phi-3 decoder graph with ONNX Runtime's fused contrib ops, one small function per subgraph.

Weights are `onnx_ir.LazyTensor`s: nothing is read or quantized until `onnx_ir.save` streams the
initializers to the external-data file one by one, which bounds export memory to a few tensors.

Graph I/O (the onnxruntime-genai "phi3" decoder contract):
    input_ids [batch, seq] int64, attention_mask [batch, total] int64,
    (position_ids [batch, seq] int64 when target.graph.position_ids_input),
    past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
    -> logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]

Graph shape follows `target.graph` (GraphOptions): each flag selects one of two subgraph functions
(PROJECTIONS, ROTARIES, GATE_UPS below). No target gets control flow (If/Loop): CUDA graphs and
DirectML graph capture replay one recorded decode step, so even the LongRoPE switch is data flow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir

from phi3_onnx.exporters.rope import rope_caches
from phi3_onnx.quantize.rtn import Int4Packed, quantize_int4
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target

OPSET = 21
MS_DOMAIN = "com.microsoft"
_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


class WeightSource(Protocol):
    """Anything that hands out Hugging Face-named tensors as float32 (a checkpoint, or AWQ's rescaled view)."""

    def read(self, name: str) -> np.ndarray: ...


# ----------------------------------------------------------------------------- plumbing


@dataclass
class GraphBuilder:
    """Collects nodes and initializers; names every output after its node so names are deterministic."""

    nodes: list[ir.Node] = field(default_factory=list)
    initializers: list[ir.Value] = field(default_factory=list)

    def op(self, op_type: str, inputs: list[ir.Value | None], name: str, *, domain: str = "", outputs: int = 1, **attrs) -> ir.Value:
        return self.op_multi(op_type, inputs, name, domain=domain, outputs=outputs, **attrs)[0]

    def op_multi(self, op_type: str, inputs: list[ir.Value | None], name: str, *, domain: str = "", outputs: int = 1, **attrs) -> list[ir.Value]:
        node = ir.node(op_type, inputs, attributes=attrs or None, domain=domain, num_outputs=outputs, name=name)
        for k, value in enumerate(node.outputs):
            value.name = f"{name}/output_{k}"
        self.nodes.append(node)
        return list(node.outputs)

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(array.shape)
        self.initializers.append(value)
        return value

    def lazy(self, name: str, make: Callable[[], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
        tensor = ir.LazyTensor(lambda: ir.tensor(make(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.initializers.append(value)
        return value


@dataclass
class _Int4Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: Int4Packed | None = None
    taken: set[str] = field(default_factory=set)


class _Int4Cache:
    """Quantize a weight once for all its initializers (blocks, scales, zero points), then forget it.

    One lock per weight, so the save workers quantize different weights in parallel.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Int4Entry] = {}

    def take(self, key: str, part: str, parts: frozenset[str], make: Callable[[], Int4Packed]) -> np.ndarray:
        with self._lock:
            entry = self._entries.setdefault(key, _Int4Entry())
        with entry.lock:
            if entry.value is None:
                entry.value = make()
            entry.taken.add(part)
            value = getattr(entry.value, part)
            if entry.taken >= parts:
                with self._lock:
                    self._entries.pop(key, None)
        return value


@dataclass
class Context:
    """What every subgraph function needs: the builder, the spec, the target and the weights."""

    b: GraphBuilder
    spec: ModelSpec
    target: Target
    weights: WeightSource
    int4: _Int4Cache = field(default_factory=_Int4Cache)
    input_ids: ir.Value | None = None

    @property
    def dtype(self) -> ir.DataType:
        return _DTYPES[self.target.io_dtype]

    @property
    def np_dtype(self) -> str:
        return self.target.io_dtype


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightRef:
    """A checkpoint tensor, or a block of its rows (q/k/v are row blocks of Phi-3's fused qkv_proj).

    `name` is the initializer's base name: the Hugging Face name for whole tensors, so graphs
    that use whole tensors keep their historical initializer names.
    """

    hf_name: str
    name: str
    rows: tuple[int, int] | None = None

    @classmethod
    def of(cls, ref: WeightRef | str) -> WeightRef:
        return ref if isinstance(ref, WeightRef) else cls(ref, ref)

    def read(self, weights: WeightSource) -> np.ndarray:
        w = weights.read(self.hf_name)
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]


def make_weight(ctx: Context, hf_name: WeightRef | str, shape: tuple[int, ...], transform: Callable[[np.ndarray], np.ndarray] | None = None) -> ir.Value:
    """A float initializer read lazily from the checkpoint, cast to the target's dtype."""
    ref = WeightRef.of(hf_name)

    def load() -> np.ndarray:
        w = ref.read(ctx.weights)
        return np.ascontiguousarray(transform(w) if transform else w, dtype=ctx.np_dtype)

    return ctx.b.lazy(ref.name, load, ctx.dtype, shape)


def make_linear(ctx: Context, name: str, x: ir.Value, hf_name: WeightRef | str, out_f: int, in_f: int, quantize: bool = True) -> ir.Value:
    """y = x W^T: MatMulNBits for int4 targets, MatMul with the transposed weight otherwise.

    x ──MatMul(W^T)──▶ y          or          x ──MatMulNBits(B, scales)──▶ y
    """
    recipe, ref = ctx.target.quant, WeightRef.of(hf_name)
    if recipe is None or not quantize:
        w_t = make_weight(ctx, ref, (in_f, out_f), transform=lambda w: w.T)
        return ctx.b.op("MatMul", [x, w_t], f"{name}/MatMul")
    bs = recipe.block_size
    k_blocks = in_f // bs

    def quantized() -> Int4Packed:
        return quantize_int4(ref.read(ctx.weights), bs, recipe.symmetric, ctx.np_dtype)

    key = ref.name
    parts = frozenset({"packed", "scales"} if recipe.symmetric else {"packed", "scales", "zero_points"})

    def part(name: str) -> Callable[[], np.ndarray]:
        return lambda: ctx.int4.take(key, name, parts, quantized)

    packed = ctx.b.lazy(f"{key}_Q4", part("packed"), ir.DataType.UINT8, (out_f, k_blocks, bs // 2))
    scales = ctx.b.lazy(f"{key}_scales", part("scales"), ctx.dtype, (out_f * k_blocks,))
    inputs = [x, packed, scales]
    if not recipe.symmetric:
        inputs.append(ctx.b.lazy(f"{key}_zp", part("zero_points"), ir.DataType.UINT8, (out_f, (k_blocks + 1) // 2)))
    return ctx.b.op(
        "MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN,
        K=in_f, N=out_f, bits=recipe.bits, block_size=bs, accuracy_level=recipe.accuracy_level,
    )


# ----------------------------------------------------------------------------- subgraphs


def make_norm(ctx: Context, name: str, x: ir.Value | None, residual: ir.Value, hf_name: str) -> tuple[ir.Value, ir.Value]:
    """RMSNorm, fused with the residual add when there is one.

    residual ──SimplifiedLayerNorm──▶ normed              (first layer: residual is the embedding)
    x, residual ──SkipSimplifiedLayerNorm──▶ normed, x + residual
    """
    gamma = make_weight(ctx, hf_name, (ctx.spec.hidden_size,))
    eps = ctx.spec.rms_norm_eps
    if x is None:
        normed = ctx.b.op("SimplifiedLayerNormalization", [residual, gamma], f"{name}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
        return normed, residual
    outs = ctx.b.op_multi("SkipSimplifiedLayerNormalization", [x, residual, gamma], f"{name}/SkipLayerNorm", domain=MS_DOMAIN, outputs=4, epsilon=eps)
    return outs[0], outs[3]


@dataclass
class AttentionInputs:
    """Per-step tensors shared by every layer's attention, computed once from the graph inputs."""

    seqlens_k: ir.Value  # int32 [batch]: total length - 1
    total_len: ir.Value  # int32 scalar
    cos: ir.Value  # [mask width, head_dim/2] rows for this step (LongRoPE: short or long)
    sin: ir.Value
    position_ids: ir.Value | None = None  # int64 [batch, seq]; only graphs with separate RotaryEmbedding use it


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
    return AttentionInputs(seqlens_k, total_len, cos, sin, position_ids)


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
    hf = f"model.layers.{layer}.self_attn.qkv_proj.weight"
    return QKV(make_linear(ctx, f"/model/layers.{layer}/attn/qkv_proj", x, hf, s.qkv_dim, s.hidden_size))


def _qkv_rows(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    h, kv = spec.hidden_size, spec.kv_dim
    return {"q": (0, h), "k": (h, h + kv), "v": (h + kv, h + 2 * kv)}


def make_qkv_separate(ctx: Context, layer: int, x: ir.Value) -> QKV:
    """x ──q_proj──▶ q,  x ──k_proj──▶ k,  x ──v_proj──▶ v   (row blocks of qkv_proj)"""
    s, hf = ctx.spec, f"model.layers.{layer}.self_attn"
    out = {}
    for part, (lo, hi) in _qkv_rows(s).items():
        ref = WeightRef(f"{hf}.qkv_proj.weight", f"{hf}.{part}_proj.weight", (lo, hi))
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
    for part, x, heads in (("q", qkv.q, s.num_heads), ("k", qkv.k, s.num_kv_heads)):
        rotated[part] = ctx.b.op(
            "RotaryEmbedding", [x, attn.position_ids, attn.cos, attn.sin], f"{p}/{part}_rotary/RotaryEmbedding",
            domain=MS_DOMAIN, interleaved=0, num_heads=heads,
        )
    return QKV(rotated["q"], rotated["k"], qkv.v), [], 0


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
    """
    s, opts = ctx.spec, ctx.target.graph
    p = f"/model/layers.{layer}/attn"
    qkv = PROJECTIONS[opts.packed_qkv](ctx, layer, x)
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
    o = make_linear(ctx, f"{p}/o_proj", out, f"model.layers.{layer}.self_attn.o_proj.weight", s.hidden_size, s.hidden_size)
    return o, present_k, present_v


def make_gate_up_packed(ctx: Context, layer: int, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """x ──gate_up_proj (one MatMul)──▶ [gate | up] ──Split──▶ gate, up"""
    s, p = ctx.spec, f"/model/layers.{layer}/mlp"
    hf = f"model.layers.{layer}.mlp.gate_up_proj.weight"
    gate_up = make_linear(ctx, f"{p}/gate_up_proj", x, hf, 2 * s.intermediate_size, s.hidden_size)
    gate, up = ctx.b.op_multi("Split", [gate_up], f"{p}/Split", outputs=2, axis=-1, num_outputs=2)
    return gate, up


def make_gate_up_separate(ctx: Context, layer: int, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """x ──gate_proj──▶ gate,  x ──up_proj──▶ up   (row halves of gate_up_proj; no Split copy)"""
    s, p = ctx.spec, f"/model/layers.{layer}/mlp"
    hf, i = f"model.layers.{layer}.mlp", s.intermediate_size
    out = []
    for part, rows in (("gate", (0, i)), ("up", (i, 2 * i))):
        ref = WeightRef(f"{hf}.gate_up_proj.weight", f"{hf}.{part}_proj.weight", rows)
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
    return make_linear(ctx, f"{p}/down_proj", h, f"model.layers.{layer}.mlp.down_proj.weight", s.hidden_size, s.intermediate_size)


def make_embedding(ctx: Context, input_ids: ir.Value) -> ir.Value:
    s = ctx.spec
    table = make_weight(ctx, "model.embed_tokens.weight", (s.vocab_size, s.hidden_size))
    return ctx.b.op("Gather", [table, input_ids], "/model/embed_tokens/Gather", axis=0)


def make_lm_head(ctx: Context, x: ir.Value) -> ir.Value:
    s = ctx.spec
    name = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
    quantize = bool(ctx.target.quant and ctx.target.quant.quantize_lm_head)
    return make_linear(ctx, "/lm_head", x, name, s.vocab_size, s.hidden_size, quantize=quantize)


# ----------------------------------------------------------------------------- model


def _io(name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
    return ir.val(name, dtype, shape)


def make_position_ids_input(ctx: Context) -> ir.Value | None:
    """position_ids [batch, seq] int64 as a graph input (DirectML-style graphs), or None."""
    if not ctx.target.graph.position_ids_input:
        return None
    return _io("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])


def build_model(spec: ModelSpec, target: Target, weights: WeightSource) -> ir.Model:
    """The whole decoder graph for one target; weights stay lazy until saved."""
    ctx = Context(GraphBuilder(), spec, target, weights)
    kv_shape: list[int | str] = ["batch_size", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    present_shape: list[int | str] = ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim]
    input_ids = ctx.input_ids = _io("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    mask = _io("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
    position_ids = make_position_ids_input(ctx)
    inputs = [input_ids, mask, *([position_ids] if position_ids is not None else [])]
    attn = make_attention_inputs(ctx, mask, position_ids)
    hidden, residual = None, make_embedding(ctx, input_ids)
    presents = []
    for i in range(spec.num_layers):
        past_k = _io(f"past_key_values.{i}.key", ctx.dtype, kv_shape)
        past_v = _io(f"past_key_values.{i}.value", ctx.dtype, kv_shape)
        inputs += [past_k, past_v]
        normed, residual = make_norm(ctx, f"/model/layers.{i}/input_layernorm", hidden, residual, f"model.layers.{i}.input_layernorm.weight")
        attn_out, pk, pv = make_attention(ctx, i, normed, past_k, past_v, attn)
        normed, residual = make_norm(ctx, f"/model/layers.{i}/post_attention_layernorm", attn_out, residual, f"model.layers.{i}.post_attention_layernorm.weight")
        hidden = make_mlp(ctx, i, normed)
        pk.name, pv.name = f"present.{i}.key", f"present.{i}.value"
        pk.type, pv.type = ir.TensorType(ctx.dtype), ir.TensorType(ctx.dtype)
        pk.shape, pv.shape = ir.Shape(present_shape), ir.Shape(present_shape)
        presents += [pk, pv]
    normed, _ = make_norm(ctx, "/model/norm", hidden, residual, "model.norm.weight")
    logits = make_lm_head(ctx, normed)
    logits.name = "logits"
    logits.type, logits.shape = ir.TensorType(ctx.dtype), ir.Shape(["batch_size", "sequence_length", spec.vocab_size])
    outputs = [logits, *presents]
    graph = ir.Graph(
        inputs, outputs, nodes=ctx.b.nodes, initializers=ctx.b.initializers,
        opset_imports={"": OPSET, MS_DOMAIN: 1}, name="phi3",
    )
    return ir.Model(graph, ir_version=10, producer_name="phi3-onnx")
