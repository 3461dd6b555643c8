"""Graph plumbing shared by the subgraph modules: the builder, the per-export context, weights.

Weights are `onnx_ir.LazyTensor`s: nothing is read or quantized until `onnx_ir.save` streams the
initializers to the external-data file one by one, which bounds export memory to a few tensors.
int4 packing is handed in (`Context.pack_int4`, by `phi3_onnx.package` from `phi3_onnx.quantize`),
so the graph never imports a quantizer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_ir as ir

from phi3_onnx.checkpoint.tensors import tensor_name
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target

OPSET = 21
MS_DOMAIN = "com.microsoft"
_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


class WeightSource(Protocol):
    """Anything that hands out Hugging Face-named tensors as float32 (a checkpoint, or AWQ's rescaled view)."""

    def read(self, name: str) -> np.ndarray: ...


class Int4Blocks(Protocol):
    """MatMulNBits inputs of one weight (`phi3_onnx.quantize.rtn.Int4Packed`)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


# (weight [N, K] float32, block size, symmetric, scale dtype) -> the packed blocks
Int4Packer = Callable[[np.ndarray, int, bool, str], Int4Blocks]


@dataclass
class GraphBuilder:
    """Collects nodes and initializers; names every output after its node so names are deterministic."""

    nodes: list[ir.Node] = field(default_factory=list)
    initializers: list[ir.Value] = field(default_factory=list)
    _lazy: dict[str, ir.Value] = field(default_factory=dict)  # name -> value: one initializer a name

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
        """A lazily read initializer; asking again for a name returns the same value (tied weights share it)."""
        if name in self._lazy:
            value = self._lazy[name]
            if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                raise ValueError(f"initializer {name} asked for as {dtype}{list(shape)}, built as {value.dtype}{list(value.shape)}")
            return value
        tensor = ir.LazyTensor(lambda: ir.tensor(make(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.initializers.append(value)
        self._lazy[name] = value
        return value


@dataclass
class _Int4Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: Int4Blocks | None = None
    taken: set[str] = field(default_factory=set)


class _Int4Cache:
    """Quantize a weight once for all its initializers (blocks, scales, zero points), then forget it.

    One lock per weight, so the save workers quantize different weights in parallel.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Int4Entry] = {}

    def take(self, key: str, part: str, parts: frozenset[str], make: Callable[[], Int4Blocks]) -> np.ndarray:
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
    pack_int4: Int4Packer | None = None
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
    def row_block(cls, role: str, layer: int, part: str, rows: tuple[int, int]) -> WeightRef:
        """Rows `rows` of a fused tensor (q of qkv_proj, gate of gate_up_proj) as their own initializer,
        named like the unfused Hugging Face tensor (`...self_attn.q_proj.weight`)."""
        hf = tensor_name(role, layer)
        return cls(hf, hf.replace(f".{role}.", f".{part}_proj."), rows)

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

    MatMulNBits' B is [N, ceil(K / block_size), block_size / 2]: the packer pads K with zeros.
    """
    recipe, ref = ctx.target.quant, WeightRef.of(hf_name)
    if recipe is None or not quantize:
        w_t = make_weight(ctx, ref, (in_f, out_f), transform=lambda w: w.T)
        return ctx.b.op("MatMul", [x, w_t], f"{name}/MatMul")
    w = make_int4_weight(ctx, ref, out_f, in_f)
    inputs = [x, w.packed, w.scales, *([w.zero_points] if w.zero_points is not None else [])]
    return ctx.b.op(
        "MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN,
        K=in_f, N=out_f, bits=recipe.bits, block_size=w.block_size, accuracy_level=recipe.accuracy_level,
    )


def make_bias_add(ctx: Context, name: str, y: ir.Value, hf_name: str, size: int) -> ir.Value:
    """y ──Add(bias)──▶ y + b   (Phi-3.5-MoE's attention and lm_head biases, in the target's dtype)"""
    return ctx.b.op("Add", [y, make_weight(ctx, hf_name, (size,))], f"{name}/BiasAdd")


@dataclass(frozen=True)
class Int4Weight:
    """The MatMulNBits initializers of one weight: packed [N, k_blocks, block/2] uint8, scales [N * k_blocks]."""

    packed: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    block_size: int


def make_int4_weight(ctx: Context, hf_name: WeightRef | str, out_f: int, in_f: int) -> Int4Weight:
    """A weight's int4 initializers, quantized once when saved; asked for twice (a tied embedding), the same ones."""
    recipe, ref = ctx.target.quant, WeightRef.of(hf_name)
    assert recipe is not None
    bs = recipe.block_size
    if recipe.tied_table_block_size and ctx.spec.tie_word_embeddings and ref.name == tensor_name("embed_tokens"):
        bs = recipe.tied_table_block_size
    k_blocks = -(-in_f // bs)  # ceil: a K that bs does not divide is zero-padded in the last block (K stays in_f)

    def quantized() -> Int4Blocks:  # runs when the weight is saved; a graph only planned needs no packer
        if ctx.pack_int4 is None:
            raise ValueError(f"target {ctx.target.name} is int4 but the graph was given no int4 packer")
        return ctx.pack_int4(ref.read(ctx.weights), bs, recipe.symmetric, ctx.np_dtype)

    key = ref.name
    parts = frozenset({"packed", "scales"} if recipe.symmetric else {"packed", "scales", "zero_points"})

    def part(name: str) -> Callable[[], np.ndarray]:
        return lambda: ctx.int4.take(key, name, parts, quantized)

    packed = ctx.b.lazy(f"{key}_Q4", part("packed"), ir.DataType.UINT8, (out_f, k_blocks, bs // 2))
    scales = ctx.b.lazy(f"{key}_scales", part("scales"), ctx.dtype, (out_f * k_blocks,))
    zp = None
    if not recipe.symmetric:
        zp = ctx.b.lazy(f"{key}_zp", part("zero_points"), ir.DataType.UINT8, (out_f, (k_blocks + 1) // 2))
    return Int4Weight(packed, scales, zp, bs)
