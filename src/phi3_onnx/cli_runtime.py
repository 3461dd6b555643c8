"""CLI verbs for the runtime stage (registered on phi3_onnx.cli.app)."""

from __future__ import annotations

from phi3_onnx.cli import app  # noqa: F401
