"""CLI verbs for the eval stage (registered on phi3_onnx.cli.app)."""

from __future__ import annotations

from phi3_onnx.cli import app  # noqa: F401
