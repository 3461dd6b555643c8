"""Accuracy-drift check of exported packages against a reference (`phi3-onnx eval`).

Reads packages only through their manifest.json and runs them with plain onnxruntime; it imports
nothing from the checkpoint, graph, quantize or package stages, so CI can check a bundle with just the runtime installed.
"""

from __future__ import annotations

from phi3_onnx.evaluate.limits import Failure, LimitOverrides
from phi3_onnx.evaluate.metrics import DriftMetrics
from phi3_onnx.evaluate.report import SCHEMA_VERSION, Report, VariantResult
from phi3_onnx.evaluate.runner import EvalOptions, bundle_reference, evaluate

__all__ = ["DriftMetrics", "EvalOptions", "Failure", "LimitOverrides", "Report", "SCHEMA_VERSION", "VariantResult", "bundle_reference", "evaluate"]
