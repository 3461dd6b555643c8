"""The package stage: the export pipeline and what it writes beside the graph.

    options.py       ExportOptions (built once by the CLI or the Python API)
    pipeline.py      plan -> quantize -> graph -> package folder (`export`)
    genai_config.py  onnxruntime-genai's config for the graph
    bundle.py        one folder per target + bundle.json (`export_bundle`)
    staging.py       temp folder beside the output, renamed into place when complete
"""

from __future__ import annotations

from phi3_onnx.package.bundle import export_bundle
from phi3_onnx.package.options import CalibrationOptions, ExportOptions
from phi3_onnx.package.pipeline import ExportPlan, export, plan_export

__all__ = ["CalibrationOptions", "ExportOptions", "ExportPlan", "export", "export_bundle", "plan_export"]
