"""ExportOptions: the recipe knobs of one export, built once (CLI or Python) and passed down whole."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from phi3_onnx.quantize import CalibrationOptions
from phi3_onnx.targets import Target


@dataclass(frozen=True)
class ExportOptions:
    """What an export may change from the target's and the model's defaults.

    max_length      genai search.max_length (KV cache size); None: min(context, 4096)
    context_length  cap the package's context (see `ModelSpec.with_context`); None: the model's
    block_size      int4 block size override (quantized targets only)
    accuracy_level  MatMulNBits accuracy_level override (quantized targets only)
    quantize_embedding  int4 embedding table (GatherBlockQuantized) in quantized targets; tied models always share one
    calibration     AWQ calibration text and sample count (AWQ targets only)
    tiktoken        Phi-3-small: the .tiktoken BPE ranks file (None: one in the checkpoint, else tiktoken's cache)
    """

    max_length: int | None = None
    context_length: int | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    quantize_embedding: bool | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    tiktoken: str | None = None

    @classmethod
    def of(cls, calibration: str | None = None, calibration_samples: int | None = None, **fields: Any) -> ExportOptions:
        """From flat keywords (the Python API's `export(..., block_size=64, calibration="my.txt")`)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"calibration"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown export option(s): {', '.join(unknown)}; known: {', '.join(sorted(known | {'calibration', 'calibration_samples'}))}")
        return cls(calibration=CalibrationOptions(calibration, calibration_samples), **fields)

    def for_target(self, target: Target) -> ExportOptions:
        """These options as they apply to `target`: int4 overrides only reach quantized targets (bundles)."""
        if target.quant is not None:
            return self
        return dataclasses.replace(self, block_size=None, accuracy_level=None, quantize_embedding=None)


__all__ = ["CalibrationOptions", "ExportOptions"]
