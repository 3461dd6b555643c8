"""Reading a checkpoint's tensors one at a time straight from its safetensors files.

The header is parsed by hand and bf16 widened with ml_dtypes, so exporting needs neither PyTorch
nor the whole checkpoint in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from phi3_onnx.errors import Phi3OnnxError

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


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
