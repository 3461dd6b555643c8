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
from phi3_onnx.checkpoint import phi3_small, phimoe_tensors, tensors
from phi3_onnx.checkpoint.tensors import TensorShapes, tensor_name
from phi3_onnx.spec import ModelSpec


def check_tensors(ckpt: TensorShapes, spec: ModelSpec) -> None:
    """Every tensor known, the layer count right, nothing missing, every shape the config's, by the table
    of the spec's architecture (Phi-3-small's are checked under its own names)."""
    if spec.moe is not None:
        return phimoe_tensors.check_phimoe_tensors(ckpt, spec)
    if spec.small is not None:
        return phi3_small.check_small_tensors(ckpt, spec)
    return tensors.check_tensors(ckpt, spec)


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes a checkpoint of this spec must contain (Phi-3, Phi-3.5-MoE)."""
    return phimoe_tensors.expected_phimoe_tensors(spec) if spec.moe is not None else tensors.expected_tensors(spec)


def open_checkpoint(folder, spec: ModelSpec) -> SafetensorsCheckpoint:
    """The checkpoint's tensors under the Phi-3 names every later stage reads (Phi-3-small: a renaming view)."""
    if spec.small is not None:
        return phi3_small.open_small(folder, spec)  # type: ignore[return-value]  (the same reader interface)
    return SafetensorsCheckpoint(folder)

__all__ = [
    "PRESET_NAMES", "SafetensorsCheckpoint", "check_tensors", "checkpoint_bytes", "expected_tensors",
    "load_config", "open_checkpoint", "preset", "preset_config", "resolve_model", "spec_from_config", "spec_from_folder", "tensor_name",
]
