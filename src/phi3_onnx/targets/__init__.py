"""The one registry that connects the stages: exporter, quantizer, package manifest, runtime, eval.

A `Target` says everything a package variant is: weight precision and quantization recipe, the
execution provider it is built for, the activation dtype, graph-shape options and the default
accuracy-drift limits. CLI choices are the keys of `TARGETS`; the manifest stores `to_dict()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from phi3_onnx.registry import registry
from phi3_onnx.targets.providers import PROVIDERS, ProviderName

Provider = ProviderName  # the keys of targets.providers.PROVIDERS
DType = Literal["float32", "float16"]


@dataclass(frozen=True)
class QuantRecipe:
    """Block-wise int4 weight quantization, packed for com.microsoft.MatMulNBits."""

    method: Literal["rtn", "awq"]
    bits: int = 4
    block_size: int = 32
    # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (fastest on CPU)
    accuracy_level: int = 4
    symmetric: bool = True
    quantize_lm_head: bool = True
    # int4 embedding table (GatherBlockQuantized); tied models share it with lm_head whatever this says
    quantize_embedding: bool = False
    # block size of a tied embedding/lm_head table (None: block_size). AWQ cannot scale or clip a table the
    # embedding Gather also reads, so the flagships round it as int4-cpu does (RTN, block 32)
    tied_table_block_size: int | None = None


@dataclass(frozen=True)
class GraphOptions:
    """Graph-shape choices that differ between execution providers."""

    packed_qkv: bool = True  # one MatMul for Q, K and V feeding GroupQueryAttention
    rotary_in_attention: bool = True  # GQA do_rotary; False: separate RotaryEmbedding nodes
    position_ids_input: bool = False  # DirectML-style graphs take position_ids explicitly
    packed_gate_up: bool = True  # one MatMul + Split for the MLP's gate and up; False: two MatMuls, no Split
    # also ship a copy of the decoder without GQA's sliding window, over the same weights file, for
    # sequences that fit the window (see phi3_onnx.package.window_free: CUDA's windowed decode kernel is slower)
    window_free_decoder: bool = False
    moe_op: bool = True  # Phi-3.5-MoE experts in com.microsoft MoE/QMoE; False: plain ops (graph/moe.py)


@dataclass(frozen=True)
class DriftLimits:
    """Default pass/fail limits of `phi3-onnx eval` against the fp32 reference."""

    max_ppl_increase_pct: float
    max_kl: float
    min_top1: float


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    provider: Provider
    io_dtype: DType
    quant: QuantRecipe | None
    graph: GraphOptions
    limits: DriftLimits

    @property
    def weight_dtype(self) -> str:
        return "int4" if self.quant else self.io_dtype

    def with_overrides(self, block_size: int | None = None, accuracy_level: int | None = None,
                       quantize_embedding: bool | None = None) -> Target:
        """This target with a different int4 block size, accuracy level or embedding quantization (CLI overrides)."""
        if block_size is None and accuracy_level is None and quantize_embedding is None:
            return self
        if self.quant is None:
            raise ValueError(f"target {self.name} is not quantized: --block-size/--accuracy-level/--quantize-embedding do not apply")
        quant = self.quant
        if quantize_embedding is not None:
            quant = dataclasses.replace(quant, quantize_embedding=quantize_embedding)
        if block_size is not None:  # --block-size N: every int4 weight at N, a tied table included
            if block_size < 16 or block_size & (block_size - 1):
                raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
            quant = dataclasses.replace(quant, block_size=block_size, tied_table_block_size=None)
        if accuracy_level is not None:
            if accuracy_level not in (0, 1, 2, 3, 4):
                raise ValueError(f"accuracy level must be 0..4, got {accuracy_level}")
            quant = dataclasses.replace(quant, accuracy_level=accuracy_level)
        return dataclasses.replace(self, quant=quant)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        data = dict(data)
        quant = data.pop("quant")
        return cls(
            quant=QuantRecipe(**quant) if quant else None,
            graph=GraphOptions(**data.pop("graph")),
            limits=DriftLimits(**data.pop("limits")),
            **data,
        )


_CPU_GRAPH = GraphOptions()
# CUDA: packed QKV MatMul and rotary inside GQA, like the CPU graph; gate and up as two MatMulNBits
# (no Split copy after the GEMV: 401 -> 411 tok/s int4 on an H100, two runs, benchmarks/RESULTS.md).
# No control flow, so CUDA graphs capture it.
# A sliding-window model also gets a window-free decoder copy (package.window_free): ORT's CUDA GQA picks
# Flash split-KV for a windowed decode at head size 96 (~0.87x the window-free graph's speed).
_CUDA_GRAPH = GraphOptions(packed_gate_up=False, window_free_decoder=True)
# DirectML: its GQA does not rotate, and packed QKV is not supported there (the model builder's
# DML graphs too): separate q/k/v MatMuls, com.microsoft.RotaryEmbedding, position_ids input.
# DirectML has no MoE/QMoE kernel: Phi-3.5-MoE's experts run as plain MatMulNBits (graph/moe.py).
_DML_GRAPH = GraphOptions(packed_qkv=False, rotary_in_attention=False, position_ids_input=True, packed_gate_up=False,
                          moe_op=False)
# MatMulNBits accuracy_level on GPUs: 0 (unset), as the model builder writes for CUDA/DML. ORT's CUDA
# MatMulNBits never reads the attribute (fp16 compute); 4 (int8 compute) is a CPU (MLAS) path.
_GPU_LEVEL = 0

# The AWQ flagships' one block size for every MatMulNBits (lm_head included): 128. Why: the int4-cpu
# graph decodes 1.30x faster at block 128 than at 32 (64: 1.11x, short of the 1.25x asked; full-size
# Phi-3-mini, 2 cores, benchmarks/RESULTS.md), and AWQ (with GPTQ rounding) at 128 is more accurate
# than RTN at 32: held-out KL 0.40x int4-cpu's on tiny-phi3 and 0.88x on tiny-phi3-w192, whose
# widths are not multiples of 128 (benchmarks/results/frontier_accuracy.md). So int4-awq-cpu is
# exactly the graph of `int4-cpu --block-size 128` with AWQ's weights, and int4-awq-cuda that of
# `int4-cuda --block-size 128` (tests/test_flagship.py checks the graphs and the accuracy).
FLAGSHIP_BLOCK = 128
# except a tied embedding/lm_head table (Phi-4-mini, Phi-3-small): AWQ cannot scale or clip it, so it keeps
# int4-cpu's block. On tiny Phi-3-small checkpoints the table alone costs KL 0.22 at block 128 vs 0.15 at 32
# (tests/test_awq_small.py); its share of the weights is 6 % (Phi-3-small) to 16 % (Phi-4-mini).
_RTN_BLOCK = 32

# Drift limits (`phi3-onnx eval` against the fp32-cpu export; perplexity increase in %, mean
# KL(ref || variant) in nats, top-1 agreement). Measured on tests/assets/tiny-phi3, 3 windows of 128
# held-out tokens (`--max-tokens 384`), all on the CPU EP: fp16 KL 1e-6, top-1 0.997; int4 RTN KL
# 0.0073, top-1 0.934, ppl +1.7%; AWQ block 32 KL 0.0052, top-1 0.942, ppl +0.4% and block 128 KL
# 0.0066, top-1 0.937, ppl +0.4% (both before GPTQ rounding; the flagships now, block 128 with GPTQ:
# KL ~0.003, tests/test_eval_targets.py prints it). On an H100 the CUDA EP gave fp16 KL 1e-6,
# top-1 0.995, and int4-awq-cuda (then block 32) calibrated there passed against the checkpoint (KL
# 0.0049, top-1 0.934, 1016 tokens).
# Each limit leaves a correct export at most half its headroom (tests/test_eval_targets.py).
# Not yet measured on full-size Phi-3 checkpoints: there, tune with eval's --max-*/--min-top1 overrides.
_INT4_RTN_LIMITS = DriftLimits(max_ppl_increase_pct=5.0, max_kl=0.05, min_top1=0.85)
_INT4_AWQ_LIMITS = DriftLimits(max_ppl_increase_pct=4.0, max_kl=0.04, min_top1=0.85)

TARGETS: dict[str, Target] = registry((
    Target(
        name="fp32-cpu",
        description="fp32 weights and activations on the CPU EP; the accuracy reference",
        provider="cpu",
        io_dtype="float32",
        quant=None,
        graph=_CPU_GRAPH,
        limits=DriftLimits(max_ppl_increase_pct=0.1, max_kl=1e-4, min_top1=0.999),
    ),
    Target(
        name="int4-cpu",
        description="int4 RTN (symmetric, block 32, int8 compute), fp32 activations, CPU/mobile",
        provider="cpu",
        io_dtype="float32",
        quant=QuantRecipe(method="rtn", block_size=32, accuracy_level=4),
        graph=_CPU_GRAPH,
        limits=_INT4_RTN_LIMITS,
    ),
    Target(
        name="int4-awq-cpu",
        description="int4 AWQ (activation-aware scales, block 128, int8 compute), fp32 activations, CPU; the flagship",
        provider="cpu",
        io_dtype="float32",
        quant=QuantRecipe(method="awq", block_size=FLAGSHIP_BLOCK, accuracy_level=4, tied_table_block_size=_RTN_BLOCK),
        graph=_CPU_GRAPH,
        limits=_INT4_AWQ_LIMITS,
    ),
    Target(
        name="fp16-cuda",
        description="fp16 weights and activations on the CUDA EP; packed QKV, rotary in GQA, CUDA graphs",
        provider="cuda",
        io_dtype="float16",
        quant=None,
        graph=_CUDA_GRAPH,
        limits=DriftLimits(max_ppl_increase_pct=0.5, max_kl=1e-3, min_top1=0.99),
    ),
    Target(
        name="int4-cuda",
        description="int4 RTN (symmetric, block 32), fp16 activations on the CUDA EP; CUDA graphs",
        provider="cuda",
        io_dtype="float16",
        quant=QuantRecipe(method="rtn", block_size=32, accuracy_level=_GPU_LEVEL),
        graph=_CUDA_GRAPH,
        limits=_INT4_RTN_LIMITS,
    ),
    Target(
        name="int4-awq-cuda",
        description="int4 AWQ (block 128), fp16 activations on the CUDA EP; CUDA graphs",
        provider="cuda",
        io_dtype="float16",
        quant=QuantRecipe(method="awq", block_size=FLAGSHIP_BLOCK, accuracy_level=_GPU_LEVEL, tied_table_block_size=_RTN_BLOCK),
        graph=_CUDA_GRAPH,
        limits=_INT4_AWQ_LIMITS,
    ),
    Target(
        name="int4-awq-dml",
        description="int4 AWQ (block 128), fp16 I/O, DirectML-safe graph (separate q/k/v, RotaryEmbedding, position_ids)",
        provider="dml",
        io_dtype="float16",
        quant=QuantRecipe(method="awq", block_size=FLAGSHIP_BLOCK, accuracy_level=_GPU_LEVEL, tied_table_block_size=_RTN_BLOCK),
        graph=_DML_GRAPH,
        limits=DriftLimits(max_ppl_increase_pct=6.0, max_kl=0.06, min_top1=0.80),
    ),
), key=lambda t: t.name, what="target")


# EPs whose Phi-3-small graphs run block-sparse layers with com.microsoft.SparseAttention, which keeps past
# and present in one shared max-length buffer: such packages must be fed that way (IO binding; genai does)
SPARSE_ATTENTION_PROVIDERS: tuple[str, ...] = ("cuda",)
# EPs whose GroupQueryAttention kernel applies `attention_bias` (input 10), so Phi-3-small's block-sparse rule
# can ride on GQA as an additive bias (CUDA has SparseAttention). Not DirectML (providers.py): its sparse
# layers attend in plain ops over GQA's present cache (graph/phi3_small.py)
BIASED_GQA_PROVIDERS: tuple[str, ...] = tuple(n for n, p in PROVIDERS.items() if p.gqa_applies_bias and n not in SPARSE_ATTENTION_PROVIDERS)


def needs_shared_kv(spec: Any, target: Target) -> bool:
    """The package's graph needs past/present bound to one max-length buffer (a plain empty past fails)."""
    small = getattr(spec, "small", None)
    if small is None or target.provider not in SPARSE_ATTENTION_PROVIDERS:
        return False
    return small.has_sparse_layer(spec.num_layers)


def graph_capture_ok(spec: Any, target: Target) -> bool:
    """Whether genai may capture the package's decode step as a graph (CUDA graphs, DML graph capture).

    Not with SparseAttention: ORT 1.31's CUDA kernel synchronizes its stream inside the step
    (cudaStreamSynchronize in sparse_attention_impl.cu), which a capture refuses ("operation not permitted
    when stream is capturing", measured on an H200, benchmarks/results/gpu_small_check-h200.log). Not with
    plain-op attention over GQA's cache (graph.attention.plain_attention, where an EP's GQA ignores the window
    or the bias): its shapes follow the sequence length each step, which a replayed graph would freeze.
    """
    if needs_shared_kv(spec, target):
        return False
    provider = PROVIDERS[target.provider]
    window_in_plain_ops = getattr(spec, "attention_window", None) is not None and not provider.gqa_applies_window
    small = getattr(spec, "small", None)
    sparse_in_plain_ops = small is not None and not provider.gqa_applies_bias and small.has_sparse_layer(spec.num_layers)
    return not (window_in_plain_ops or sparse_in_plain_ops)


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        several = "; several targets (a bundle): repeat -t, e.g. -t int4-cpu -t fp32-cpu" if "," in name else ""
        raise KeyError(f"unknown target {name!r}; choose from: {', '.join(TARGETS)}{several}") from None


__all__ = ["BIASED_GQA_PROVIDERS", "DriftLimits", "GraphOptions", "QuantRecipe", "SPARSE_ATTENTION_PROVIDERS", "TARGETS", "Target", "get_target",
           "graph_capture_ok", "needs_shared_kv"]
