"""Reading a Phi-3 checkpoint: locate it, parse its config into a ModelSpec, stream its tensors.

Tensors are read one at a time straight from the safetensors files (header parsed by hand, bf16
widened with numpy), so exporting needs neither PyTorch nor the whole checkpoint in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import LongRope, ModelSpec

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM",)
_UNSUPPORTED_HINTS = {
    "Phi3SmallForCausalLM": "Phi-3-small (blocksparse attention) is not supported yet",
    "Phi3VForCausalLM": "Phi-3-vision is not supported yet",
    "PhiMoEForCausalLM": "Phi-3.5-MoE is not supported yet",
}
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "LICENSE*", "README*", "*.md"]


# ----------------------------------------------------------------------------- locating


def resolve_model(model: str, cache_dir: str | None = None) -> Path:
    """A local checkpoint folder when `model` exists on disk, else a hub id fetched with huggingface_hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Phi3OnnxError(f"--model {model} is a file; pass the checkpoint folder")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise Phi3OnnxError(f"model folder not found: {model}")
    return _download(model, cache_dir)


def _download(repo_id: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, cache_dir=cache_dir))
    except Exception as exc:  # offline, unknown repo, gated, ...: one line naming the model
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise Phi3OnnxError(
            f"{repo_id} is not a local folder and could not be fetched from the Hugging Face hub ({reason})"
        ) from None


# ----------------------------------------------------------------------------- config → spec


def load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise Phi3OnnxError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Phi3OnnxError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(cfg, dict):
        raise Phi3OnnxError(f"{path} is not a JSON object")
    return cfg


def _generation_eos(folder: Path) -> list[int] | None:
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [eos] if isinstance(eos, int) else eos


CHAT_STOP_TOKENS = ("<|end|>", "<|endoftext|>")


def _chat_stop_ids(folder: Path) -> list[int]:
    """Ids of Phi-3's end-of-turn tokens, so generation stops at <|end|> even if the config omits it."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    try:
        added = json.loads(path.read_text()).get("added_tokens", [])
    except (json.JSONDecodeError, AttributeError):
        return []
    return [t["id"] for t in added if t.get("content") in CHAT_STOP_TOKENS]


def spec_from_folder(folder: Path) -> ModelSpec:
    cfg = load_config(folder)
    eos = _generation_eos(folder) or _config_eos(cfg)
    eos = list(dict.fromkeys([*eos, *_chat_stop_ids(folder)]))
    return spec_from_config(cfg, name=folder.name, generation_eos=eos or None)


def _config_eos(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def _check_architecture(cfg: dict[str, Any]) -> None:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _UNSUPPORTED_HINTS:
            raise Phi3OnnxError(f"{arch}: {_UNSUPPORTED_HINTS[arch]}")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and cfg.get("model_type") != "phi3":
        found = ", ".join(archs) or cfg.get("model_type") or "unknown"
        raise Phi3OnnxError(f"unsupported architecture {found}: phi3-onnx exports Phi3ForCausalLM checkpoints")


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge the transformers-4 (`rope_scaling` + top-level keys) and -5 (`rope_parameters`) forms."""
    merged: dict[str, Any] = {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_type": "default"}
    for key in ("rope_scaling", "rope_parameters"):
        block = cfg.get(key)
        if isinstance(block, dict):
            merged.update(block)
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if merged.get("type") and merged.get("rope_type") == "default":
        kind = merged["type"]
    merged["rope_type"] = "longrope" if kind == "su" else kind
    return merged


def _longrope(rope: dict[str, Any], cfg: dict[str, Any], head_dim: int, orig: int) -> LongRope:
    short, long = rope.get("short_factor"), rope.get("long_factor")
    if not isinstance(short, list) or not isinstance(long, list):
        raise Phi3OnnxError("longrope config needs short_factor and long_factor lists")
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise Phi3OnnxError(f"longrope factors must have head_dim/2 = {head_dim // 2} entries")
    factor = rope.get("factor") or cfg["max_position_embeddings"] / orig
    attn = rope.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return LongRope(tuple(map(float, short)), tuple(map(float, long)), float(attn))


def spec_from_config(cfg: dict[str, Any], name: str = "phi3", generation_eos: list[int] | None = None) -> ModelSpec:
    """One typed spec from either config.json form found in the wild."""
    _check_architecture(cfg)
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = hidden // heads
        if cfg.get("head_dim") not in (None, head_dim):
            raise Phi3OnnxError(f"head_dim {cfg['head_dim']} != hidden_size/num_attention_heads is not supported")
        rope = _rope_params(cfg)
        if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise Phi3OnnxError("partial rotary embeddings are not supported (this is not a Phi-3 config)")
        max_pos = int(cfg["max_position_embeddings"])
        orig = int(rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or max_pos)
        if rope["rope_type"] not in ("default", "longrope"):
            raise Phi3OnnxError(f"rope type {rope['rope_type']!r} is not supported (Phi-3 uses default or longrope)")
        longrope = _longrope(rope, cfg, head_dim, orig) if rope["rope_type"] == "longrope" else None
        eos = generation_eos or cfg.get("eos_token_id") or []
        eos = [eos] if isinstance(eos, int) else list(eos)
        return ModelSpec(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=max_pos,
            original_max_position_embeddings=orig,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
            longrope=longrope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=int(cfg.get("bos_token_id") or 1),
            eos_token_ids=tuple(int(e) for e in eos),
            pad_token_id=int(cfg["pad_token_id"] if cfg.get("pad_token_id") is not None else eos[0] if eos else 0),
            name=name,
        )
    except KeyError as exc:
        raise Phi3OnnxError(f"config.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise Phi3OnnxError(f"config.json has a malformed value ({exc})") from None


# ----------------------------------------------------------------------------- presets

PRESET_NAMES: tuple[str, ...] = ("phi3-mini-4k", "phi3-mini-128k", "phi3-medium-4k", "phi3-medium-128k", "phi3.5-mini")


def preset_config(name: str) -> dict[str, Any]:
    """The published config.json of a preset (package data, verbatim hub file)."""
    if name not in PRESET_NAMES:
        raise Phi3OnnxError(f"unknown preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    return json.loads(resources.files("phi3_onnx.presets").joinpath(f"{name}.json").read_text())


def preset(name: str) -> ModelSpec:
    cfg = preset_config(name)
    return spec_from_config(cfg, name=name, generation_eos=cfg.get("_generation_eos_token_id"))


# ----------------------------------------------------------------------------- tensors

_DTYPES = {"BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4)}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors dtype code: BF16, F16, F32
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in `file`
    end: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Phi3OnnxError(f"{path.name} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise Phi3OnnxError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Phi3OnnxError(f"{path.name} has a corrupt safetensors header") from None
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise Phi3OnnxError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise Phi3OnnxError(f"{path.name} is truncated: tensor {name} ends past the end of the file")
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), base + begin, base + end)
    return entries


class SafetensorsCheckpoint:
    """Lazy, tensor-by-tensor access to a single-file or sharded safetensors checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, TensorEntry] = {}
        for shard in self._shard_files(folder):
            self.entries.update(_read_header(shard))

    @staticmethod
    def _shard_files(folder: Path) -> list[Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise Phi3OnnxError(f"{index.name} is corrupt (no weight_map)") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise Phi3OnnxError(f"checkpoint shard missing: {missing[0]} (listed in {index.name})")
            return [folder / n for n in names]
        single = folder / "model.safetensors"
        if single.is_file():
            return [single]
        raise Phi3OnnxError(f"{folder} has no model.safetensors or model.safetensors.index.json")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, dtype: str = "float32") -> np.ndarray:
        """One tensor, widened to float32 (or cast to `dtype`)."""
        e = self.entries[name]
        raw = bytearray(e.end - e.begin)
        with e.file.open("rb", buffering=0) as f:
            f.seek(e.begin)
            if f.readinto(raw) != len(raw):
                raise Phi3OnnxError(f"{e.file.name} is truncated at tensor {name}")
        stored = ml_dtypes.bfloat16 if e.dtype == "BF16" else _DTYPES[e.dtype][0]
        arr = np.frombuffer(raw, dtype=stored).reshape(e.shape)
        return arr if arr.dtype == np.dtype(dtype) else arr.astype(dtype)


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes a Phi-3 checkpoint of this spec must contain."""
    h, i = spec.hidden_size, spec.intermediate_size
    names = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        names["lm_head.weight"] = (spec.vocab_size, h)
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        names |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.qkv_proj.weight": (spec.qkv_dim, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_up_proj.weight": (2 * i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return names


def check_tensors(ckpt: SafetensorsCheckpoint, spec: ModelSpec) -> None:
    for name, shape in expected_tensors(spec).items():
        if name not in ckpt:
            raise Phi3OnnxError(f"checkpoint lacks tensor {name}")
        if ckpt.shape(name) != shape:
            raise Phi3OnnxError(f"tensor {name} has shape {ckpt.shape(name)}, config says {shape}")


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


__all__ = [
    "PRESET_NAMES",
    "SafetensorsCheckpoint",
    "check_tensors",
    "checkpoint_bytes",
    "expected_tensors",
    "load_config",
    "preset",
    "preset_config",
    "resolve_model",
    "spec_from_config",
    "spec_from_folder",
]
