"""The checkpoint layer: locate a checkpoint, read its config into a ModelSpec, stream its tensors.

    hub.py      a local folder or a Hugging Face hub id
    config.py   config.json (both forms) -> ModelSpec
    presets.py  the published configs (configs/*.json)
    tensors.py  the tensor-name table every later stage uses
    phi3_small.py  Phi-3-small's config keys and tensors (served under Phi-3 names)
    tiktoken.py    Phi-3-small's tiktoken ranks -> tokenizer.json
    reader.py   safetensors, one tensor at a time
"""

from __future__ import annotations

from phi3_onnx.checkpoint.config import load_config, spec_from_config, spec_from_folder
from phi3_onnx.checkpoint.hub import resolve_model
from phi3_onnx.checkpoint.presets import PRESET_NAMES, preset, preset_config
from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint, checkpoint_bytes
from phi3_onnx.checkpoint.tensors import check_tensors, expected_tensors, tensor_name
from phi3_onnx.spec import ModelSpec


def open_checkpoint(folder, spec: ModelSpec) -> SafetensorsCheckpoint:
    """The checkpoint's tensors under the Phi-3 names every later stage reads (Phi-3-small: a renaming view)."""
    if spec.small is not None:
        from phi3_onnx.checkpoint.phi3_small import open_small

        return open_small(folder, spec)  # type: ignore[return-value]  (the same reader interface)
    return SafetensorsCheckpoint(folder)

__all__ = [
    "PRESET_NAMES", "SafetensorsCheckpoint", "check_tensors", "checkpoint_bytes", "expected_tensors",
    "load_config", "open_checkpoint", "preset", "preset_config", "resolve_model", "spec_from_config", "spec_from_folder", "tensor_name",
]
