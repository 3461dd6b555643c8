"""phi3-onnx: deploy Microsoft's Phi-3 family with ONNX Runtime on any device."""

from __future__ import annotations

from phi3_onnx.version import __version__


def export(model, target, output, options=None, *, force=False, progress=False, weights=None, **overrides):
    """Export a Phi-3 checkpoint (folder or hub id) to a package folder for `target`; returns its path.

    `options` is a `phi3_onnx.package.ExportOptions`; or pass its fields as keywords (max_length,
    context_length, block_size, accuracy_level, calibration="file.txt", calibration_samples=N).
    """
    from phi3_onnx.package import ExportOptions, pipeline

    if options is not None and overrides:
        raise TypeError("pass either options= or keyword overrides, not both")
    opts = options if options is not None else ExportOptions.of(**overrides)
    return pipeline.export(model, target, output, opts, force=force, progress=progress, weights=weights)


def export_bundle(model, targets, output, options=None, *, force=False, progress=False, **overrides):
    """Export one checkpoint for several targets: one package folder each plus bundle.json."""
    from phi3_onnx.package import ExportOptions, bundle

    if options is not None and overrides:
        raise TypeError("pass either options= or keyword overrides, not both")
    opts = options if options is not None else ExportOptions.of(**overrides)
    return bundle.export_bundle(model, targets, output, opts, force=force, progress=progress)


__all__ = ["__version__", "export", "export_bundle"]
