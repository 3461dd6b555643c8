"""Presets: the published config.json of each supported model, kept verbatim as package data."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from phi3_onnx.checkpoint.config import spec_from_config
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import ModelSpec

PRESET_NAMES: tuple[str, ...] = ("phi3-mini-4k", "phi3-mini-128k", "phi3-medium-4k", "phi3-medium-128k", "phi3.5-mini",
                                 "phi4-mini-instruct", "phi4", "phi3-small-8k")


def preset_config(name: str) -> dict[str, Any]:
    """The published config.json of a preset (package data, verbatim hub file)."""
    if name not in PRESET_NAMES:
        raise Phi3OnnxError(f"unknown preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    return json.loads(resources.files("phi3_onnx.checkpoint.configs").joinpath(f"{name}.json").read_text())


def preset(name: str) -> ModelSpec:
    cfg = preset_config(name)
    return spec_from_config(cfg, name=name, generation_eos=cfg.get("_generation_eos_token_id"))
