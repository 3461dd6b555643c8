"""The quantize stage: a registry of methods (`QuantRecipe.method` -> `Quantizer`).

A quantizer turns the checkpoint into the weight source the graph reads (RTN: the checkpoint as
it is; AWQ: a calibrated, rescaled view) and packs each int4 weight for MatMulNBits. It reports
what it actually ran, which the package stage writes into the manifest's `recipe`.

    rtn.py         round-to-nearest int4, packed by ORT's own kernel (every method's packer)
    awq.py         activation-aware scales + per-block clip/refit + GPTQ rounding (PyTorch; the `[awq]` extra)
    awq_moe.py     the same for Phi-3.5-MoE: LayerNorm + biases, the router's shared scale, per-expert statistics
    awq_small.py   the same for Phi-3-small: LayerNorm + biases, block-sparse attention, gegelu (down_proj unscaled)
    awq_search.py  the searches AWQ runs
    torch_phi3.py  a Phi-3 decoder layer in PyTorch, for calibration
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.graph import Int4Packer, WeightSource
from phi3_onnx.quantize.rtn import quantize_int4
from phi3_onnx.registry import registry
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import QuantRecipe

DEFAULT_CALIBRATION_SAMPLES = 8
CALIBRATION_SEQ_LEN = 256


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration data for methods that need it (AWQ): a text file (None: the built-in one), sequences."""

    file: str | None = None
    samples: int | None = None

    @property
    def sample_count(self) -> int:
        return DEFAULT_CALIBRATION_SAMPLES if self.samples is None else self.samples


@dataclass(frozen=True)
class QuantizeInput:
    """What a quantizer reads: the checkpoint folder and reader, its spec, and the recipe to run."""

    folder: Path
    checkpoint: SafetensorsCheckpoint
    spec: ModelSpec
    recipe: QuantRecipe
    calibration: CalibrationOptions
    progress: bool = False
    tiktoken: str | None = None  # Phi-3-small: the --tiktoken ranks file (None: the checkpoint's, else tiktoken's cache)


@dataclass(frozen=True)
class Quantized:
    """A quantizer's result: the weights to pack and the record of what ran (the manifest's recipe)."""

    weights: WeightSource
    record: dict[str, Any]


class Quantizer(Protocol):
    method: str
    needs: str | None  # the extra it needs beyond the base install, or None

    def prepare(self, job: QuantizeInput) -> Quantized: ...

    def packer(self) -> Int4Packer: ...


def _base_record(recipe: QuantRecipe) -> dict[str, Any]:
    return {"method": recipe.method, "bits": recipe.bits, "block_size": recipe.block_size,
            "accuracy_level": recipe.accuracy_level, "symmetric": recipe.symmetric,
            "quantize_lm_head": recipe.quantize_lm_head, "quantize_embedding": recipe.quantize_embedding,
            **({"tied_table_block_size": recipe.tied_table_block_size} if recipe.tied_table_block_size else {})}


@dataclass(frozen=True)
class RtnQuantizer:
    """Round-to-nearest: each block's absmax scale, no calibration; the checkpoint is read as it is."""

    method: str = "rtn"
    needs: str | None = None

    def prepare(self, job: QuantizeInput) -> Quantized:
        return Quantized(job.checkpoint, _base_record(job.recipe))

    def packer(self) -> Int4Packer:
        return quantize_int4


def calibration_record(options: CalibrationOptions) -> dict[str, Any]:
    """Which calibration text ran (file name or 'built-in', its sha256) and how much of it."""
    if options.file is None:
        data = resources.files("phi3_onnx.data").joinpath("calibration.txt").read_bytes()
        name = "built-in"
    else:
        path = Path(options.file)
        if not path.is_file():
            raise Phi3OnnxError(f"calibration file not found: {options.file}")
        data, name = path.read_bytes(), path.name
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "samples": options.sample_count,
            "tokens_per_sample": CALIBRATION_SEQ_LEN}


@dataclass(frozen=True)
class AwqQuantizer:
    """Activation-aware scales and per-block clip + refit (phi3_onnx.quantize.awq), packed like RTN."""

    method: str = "awq"
    needs: str | None = "awq"

    def prepare(self, job: QuantizeInput) -> Quantized:
        try:
            from phi3_onnx.quantize import awq
        except ModuleNotFoundError as exc:
            if exc.name not in ("torch", "tokenizers"):
                raise
            raise Phi3OnnxError("AWQ calibration needs PyTorch: pip install 'phi3-onnx[awq]'") from None
        record = _base_record(job.recipe) | {"calibration": calibration_record(job.calibration),
                                             "rounding": "gptq" if awq.AwqSettings().grid.gptq else "nearest"}
        weights, note = _awq_for_architecture(job)
        return Quantized(weights, record | note)

    def packer(self) -> Int4Packer:
        return quantize_int4


MOE_NOTE = ("one input scale shared by the router (float32, exact) and every expert's w1/w3; per-expert w2 scales folded "
            "into w3's rows; per-expert statistics from the tokens sparsemixer routes to each expert; clip/refit and "
            "rounding per expert matrix")
SMALL_NOTE = ("input scales folded into both LayerNorms' weight and bias (qkv_proj, gate_up_proj) and into the v rows and "
              "v bias (o_proj, tied across the query heads of a KV head); down_proj unscaled (gegelu's clamp and +1 make "
              "the fold inexact); the tied embedding table rounded to nearest (at the recipe's tied_table_block_size); statistics through the block-sparse "
              "attention; clip/refit and rounding per matrix")


def _awq_for_architecture(job: QuantizeInput) -> tuple[WeightSource, dict[str, Any]]:
    """The AWQ implementation of the job's architecture, run: its weight source and what the record adds."""
    cal, spec = job.calibration, job.spec
    if spec.moe is not None:  # Phi-3.5-MoE: its own layer, router and experts
        from phi3_onnx.quantize.awq_moe import awq_moe_weights

        return awq_moe_weights(job.folder, spec, job.recipe, cal.file, cal.sample_count, progress=job.progress), {"moe": MOE_NOTE}
    if spec.small is not None:  # Phi-3-small: LayerNorm + biases, block-sparse attention, gegelu, tiktoken
        from phi3_onnx.quantize.awq_small import awq_small_weights

        return awq_small_weights(job.folder, spec, job.recipe, cal.file, cal.sample_count, tiktoken=job.tiktoken,
                                 progress=job.progress), {"small": SMALL_NOTE}
    from phi3_onnx.quantize.awq import awq_weights

    return awq_weights(job.folder, spec, job.recipe, cal.file, cal.sample_count, progress=job.progress), {}


QUANTIZERS: dict[str, Quantizer] = registry((RtnQuantizer(), AwqQuantizer()), key=lambda q: q.method, what="quantizer")


def get_quantizer(method: str) -> Quantizer:
    try:
        return QUANTIZERS[method]
    except KeyError:
        raise Phi3OnnxError(f"unknown quantization method {method!r}; known: {', '.join(QUANTIZERS)}") from None


__all__ = ["CalibrationOptions", "DEFAULT_CALIBRATION_SAMPLES", "QUANTIZERS", "QuantizeInput", "Quantized", "Quantizer",
           "get_quantizer"]
