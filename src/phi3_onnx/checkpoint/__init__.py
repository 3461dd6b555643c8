"""The checkpoint layer: locate a checkpoint, read its config into a ModelSpec, stream its tensors.

    hub.py      a local folder or a Hugging Face hub id
    config.py   config.json (both forms) -> ModelSpec
    presets.py  the published configs (configs/*.json)
    tensors.py  the tensor-name table every later stage uses
    reader.py   safetensors, one tensor at a time
"""

from __future__ import annotations

from phi3_onnx.checkpoint.config import load_config, spec_from_config, spec_from_folder
from phi3_onnx.checkpoint.hub import resolve_model
from phi3_onnx.checkpoint.presets import PRESET_NAMES, preset, preset_config
from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint, checkpoint_bytes
from phi3_onnx.checkpoint.tensors import check_tensors, expected_tensors, tensor_name

__all__ = [
    "PRESET_NAMES", "SafetensorsCheckpoint", "check_tensors", "checkpoint_bytes", "expected_tensors",
    "load_config", "preset", "preset_config", "resolve_model", "spec_from_config", "spec_from_folder", "tensor_name",
]
