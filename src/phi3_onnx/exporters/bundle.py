"""Bundles: one checkpoint exported for several targets, one self-contained folder per target.

    bundle/
      bundle.json          # format, source, variants (name = folder = target, provider, dtypes)
      int4-cpu/ ...        # an ordinary package (manifest.json, model.onnx, genai_config.json, ...)
      fp32-cpu/ ...

`phi3_onnx.runtime.load(bundle)` picks the variant for the device. Like a single export, the
bundle is written into a temp folder and renamed into place: nothing half-written on failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.exporters import package
from phi3_onnx.manifest import BUNDLE, bundle_document, read_manifest


def _check_targets(targets: Sequence[str]) -> list[str]:
    names = list(targets)
    if not names:
        raise Phi3OnnxError("give at least one --target")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Phi3OnnxError(f"target given twice: {', '.join(dupes)}")
    return names


def _overrides_for(target: str, block_size: int | None, accuracy_level: int | None) -> dict[str, int | None]:
    """int4 overrides apply to the quantized variants only (an fp32 variant in the same bundle ignores them)."""
    quantized = package._resolve_target(target, None, None).quant is not None
    return {"block_size": block_size, "accuracy_level": accuracy_level} if quantized else {}


def export_bundle(
    model: str | os.PathLike,
    targets: Sequence[str],
    output: str | os.PathLike,
    *,
    force: bool = False,
    max_length: int | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    progress: bool = False,
    calibration: str | None = None,
    calibration_samples: int | None = None,
    context_length: int | None = None,
) -> Path:
    """Export `model` once per target into `output/<target>/` and write `output/bundle.json`.

    Overrides apply to every variant they fit: int4 block size / accuracy level to the quantized
    ones, AWQ calibration (text file, samples) to the AWQ ones (`package.export` ignores it elsewhere).
    """
    output = Path(output)
    names = _check_targets(targets)
    package.refuse_existing(output, force)
    plans = {n: _overrides_for(n, block_size, accuracy_level) for n in names}  # validates every name first
    with package.staged_folder(output, force) as tmp:
        for name, overrides in plans.items():
            package.export(str(model), name, tmp / name, max_length=max_length, progress=progress,
                           calibration=calibration, calibration_samples=calibration_samples,
                           context_length=context_length, **overrides)
        manifests = [(name, read_manifest(tmp / name)) for name in names]
        doc = bundle_document(manifests[0][1].source, manifests)
        (tmp / BUNDLE).write_text(json.dumps(doc, indent=2) + "\n")
    return output
