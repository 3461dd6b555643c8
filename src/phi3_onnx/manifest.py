"""manifest.json: the saved form of Target + ModelSpec, plus versions and file checksums.

The runtime reads only this file (and the genai files beside it); it imports nothing from the
exporter or quantizers, so a package can be loaded with just onnxruntime + onnxruntime-genai.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target

MANIFEST = "manifest.json"
FORMAT = "phi3-onnx/1"
BUNDLE = "bundle.json"
BUNDLE_FORMAT = "phi3-onnx-bundle/1"
# The oldest runtimes a package is loaded with (manifest.json `requires`, shown by `info`): the one
# source of truth; pyproject's [cpu]/[cuda]/[directml] extras repeat these lower bounds and
# tests/test_cli_polish.py fails when the two disagree.
MIN_VERSIONS = {"onnxruntime": "1.22.0", "onnxruntime-genai": "0.8.0"}


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    target: Target
    model: ModelSpec
    max_length: int
    files: dict[str, FileEntry]
    tool_versions: dict[str, str]
    requires: dict[str, str]
    source: str
    # what actually ran: the quantizer's record (method, block size, calibration file + sha256, ...)
    # and the context/KV sizes the package was built for
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "target": self.target.to_dict(),
            "model": self.model.to_dict(),
            "max_length": self.max_length,
            "requires": self.requires,
            "tool_versions": self.tool_versions,
            "recipe": self.recipe,
            "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise Phi3OnnxError(f"manifest format {data.get('format')!r} is not {FORMAT!r}")
        return cls(
            target=Target.from_dict(data["target"]),
            model=ModelSpec.from_dict(data["model"]),
            max_length=int(data["max_length"]),
            files={k: FileEntry(int(v["size"]), str(v["sha256"])) for k, v in data["files"].items()},
            tool_versions=dict(data.get("tool_versions", {})),
            requires=dict(data.get("requires", {})),
            source=str(data.get("source", "")),
            recipe=dict(data.get("recipe") or {}),
        )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file in the package folder (the manifest itself excluded)."""
    return {
        p.relative_to(folder).as_posix(): FileEntry(p.stat().st_size, sha256_file(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise Phi3OnnxError(f"{folder} is not a phi3-onnx package (no {MANIFEST})")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise Phi3OnnxError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None


def bundle_document(source: str, variants: list[tuple[str, Manifest]]) -> dict[str, Any]:
    """bundle.json: the variant folders (named by target) with enough to list them without opening each."""
    return {
        "format": BUNDLE_FORMAT,
        "source": source,
        "variants": [
            {"name": name, "path": name, "provider": m.target.provider, "io_dtype": m.target.io_dtype,
             "weights": m.target.weight_dtype, "quant": m.target.quant.method if m.target.quant else None}
            for name, m in variants
        ],
    }
