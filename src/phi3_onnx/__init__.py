"""phi3-onnx: deploy Microsoft's Phi-3 family with ONNX Runtime on any device."""

from __future__ import annotations

__version__ = "0.1.0"


def export(model, target, output, **overrides):
    """Export a Phi-3 checkpoint (folder or hub id) to a package folder for `target`; returns its path.

    Overrides: force, max_length, block_size, accuracy_level, progress. See `phi3_onnx.exporters.package.export`.
    """
    from phi3_onnx.exporters.package import export as _export

    return _export(model, target, output, **overrides)


__all__ = ["__version__", "export"]
