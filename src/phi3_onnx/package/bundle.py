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
from phi3_onnx.manifest import BUNDLE, bundle_document, read_manifest
from phi3_onnx.package import pipeline
from phi3_onnx.package.options import ExportOptions
from phi3_onnx.checkpoint import resolve_model
from phi3_onnx.package.staging import check_destination, refuse_existing, staged_folder


def _check_targets(targets: Sequence[str]) -> list[str]:
    names = list(targets)
    if not names:
        raise Phi3OnnxError("give at least one --target")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Phi3OnnxError(f"target given twice: {', '.join(dupes)}")
    return names


def export_bundle(
    model: str | os.PathLike,
    targets: Sequence[str],
    output: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    *,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Export `model` once per target into `output/<target>/` and write `output/bundle.json`.

    Options apply to every variant they fit (`ExportOptions.for_target`): int4 block size /
    accuracy level to the quantized ones, AWQ calibration to the AWQ ones.
    """
    names = _check_targets(targets)
    refuse_existing(output, force)
    # validates every name first
    plans = {n: options.for_target(pipeline.resolve_target(n, ExportOptions())) for n in names}
    source = resolve_model(str(model))
    dest = check_destination(output, source, force)
    with staged_folder(dest) as tmp:
        for name, variant_options in plans.items():
            pipeline.export(str(source), name, tmp / name, variant_options, progress=progress)
        manifests = [(name, read_manifest(tmp / name)) for name in names]
        doc = bundle_document(manifests[0][1].source, manifests)
        (tmp / BUNDLE).write_text(json.dumps(doc, indent=2) + "\n")
    return Path(output)
