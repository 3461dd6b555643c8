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


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def _bad(path: Path, why: str) -> Phi3OnnxError:
    return Phi3OnnxError(f"{path.name} is not a valid safetensors file: {why}")


def _header_json(path: Path) -> tuple[dict, int]:
    """The header object and the byte offset where the data buffer starts."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Phi3OnnxError(f"{path.name} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise Phi3OnnxError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Phi3OnnxError(f"{path.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    return header, 8 + n


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: Path, base: int, name: str, info: object) -> TensorEntry:
    """One header entry, checked as the safetensors library checks it."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _bad(path, f"tensor {name} needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise _bad(path, f"tensor {name} has dtype {dtype!r}")
    if dtype not in _DTYPES:
        raise Phi3OnnxError(f"{path.name}: tensor {name} has unsupported dtype {dtype} (phi3-onnx reads BF16, F16, F32)")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"tensor {name} has shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise _bad(path, f"tensor {name} has data_offsets {offsets!r}")
    nbytes = int(np.prod(shape, dtype=object)) * _DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {name} holds {offsets[1] - offsets[0]} bytes, but {dtype} x {shape} is {nbytes}")
    return TensorEntry(path, dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _check_layout(path: Path, entries: dict[str, TensorEntry], base: int, data_end: int) -> None:
    """Tensors tile the data buffer from its start: no overlap, no gap, nothing past the end (as the library requires)."""
    cursor = base
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != cursor:
            why = "overlaps the tensor before it" if e.begin < cursor else "leaves a gap before it"
            raise _bad(path, f"tensor {name} {why}")
        cursor = e.end
    if cursor > data_end:
        raise Phi3OnnxError(f"{path.name} is truncated: its tensors end past the end of the file")
    if cursor < data_end:
        raise _bad(path, f"{data_end - cursor} bytes after the last tensor")


def _read_header(path: Path) -> dict[str, TensorEntry]:
    header, base = _header_json(path)
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise _bad(path, "__metadata__ must map names to strings")
    entries = {name: _entry(path, base, name, info) for name, info in header.items()}
    _check_layout(path, entries, base, path.stat().st_size)
    return entries


def _inside(folder: Path, name: object, what: str) -> Path:
    """`folder/name` when it stays inside `folder`: a relative name, no '..', no symlink out.

    The one allowed symlink out is the Hugging Face cache's own layout: a snapshot folder
    (`.../snapshots/<revision>/`) whose files link to the repository's `blobs/`.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise Phi3OnnxError(f"{what}: shard path {name!r} is not a file name inside the checkpoint folder")
    path = folder / name
    real, root = path.resolve(), folder.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if root not in real.parents and (blobs is None or blobs not in real.parents):
        raise Phi3OnnxError(f"{what}: shard {name!r} resolves outside the checkpoint folder")
    return path


class SafetensorsCheckpoint:
    """Lazy, tensor-by-tensor access to a single-file or sharded safetensors checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, TensorEntry] = {}
        for shard, listed in self._shards(folder):
            entries = _read_header(shard)
            for name in entries:
                if name in self.entries:
                    raise Phi3OnnxError(f"tensor {name} is in two shards: {self.entries[name].file.name} and {shard.name}")
            self.entries.update(entries)
            if listed is not None:
                stray = sorted(listed - set(entries))
                if stray:
                    raise Phi3OnnxError(f"model.safetensors.index.json maps {stray[0]} to {shard.name}, which does not hold it")

    @staticmethod
    def _shards(folder: Path) -> list[tuple[Path, set[str] | None]]:
        """Each shard file with the tensor names the index maps to it (None for a single-file checkpoint)."""
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise Phi3OnnxError(f"{index.name} is corrupt (no weight_map)") from None
            if not isinstance(weight_map, dict):
                raise Phi3OnnxError(f"{index.name}: weight_map is not an object")
            by_shard: dict[str, set[str]] = {}
            for tensor, shard in weight_map.items():
                _inside(folder, shard, index.name)
                by_shard.setdefault(shard, set()).add(tensor)
            missing = [n for n in sorted(by_shard) if not (folder / n).is_file()]
            if missing:
                raise Phi3OnnxError(f"checkpoint shard missing: {missing[0]} (listed in {index.name})")
            return [(folder / n, by_shard[n]) for n in sorted(by_shard)]
        single = folder / "model.safetensors"
        if single.is_file():
            return [(single, None)]
        raise Phi3OnnxError(f"{folder} has no model.safetensors or model.safetensors.index.json")

    def names(self) -> list[str]:
        return list(self.entries)

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
