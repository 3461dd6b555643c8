"""Opening a package or a bundle of packages: manifest, file integrity, variant choice.

Reads only manifest.json / bundle.json and file metadata; the exporter writes these files
(`phi3_onnx.package.bundle` imports the bundle format from here, never the reverse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import BUNDLE, BUNDLE_FORMAT, MANIFEST, Manifest, read_manifest, sha256_file
from phi3_onnx.runtime.providers import PROVIDER_ORDER, Choice, Environment, choose_provider

# Among variants for one EP: AWQ int4 (most accurate int4), then RTN int4, then unquantized.
QUANT_RANK = {"awq": 0, "rtn": 1, None: 2}


@dataclass(frozen=True)
class Package:
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class Variant:
    """One package folder inside a bundle, named by its target."""

    name: str
    path: Path
    manifest: Manifest


def is_bundle(path: Path) -> bool:
    return (path / BUNDLE).is_file()


def open_package(path: str | Path, verify: bool = False) -> Package:
    """Read the manifest and check every file's size (and sha256 with verify) before loading."""
    folder = Path(path)
    if not folder.is_dir():
        raise Phi3OnnxError(f"package {folder} does not exist")
    manifest = read_manifest(folder)
    check_files(folder, manifest, verify)
    return Package(folder, manifest)


def check_files(folder: Path, manifest: Manifest, verify: bool) -> None:
    """Sizes are cheap and catch truncated copies; sha256s (verify) catch any corruption."""
    if not manifest.files:
        raise Phi3OnnxError(f"{folder / MANIFEST} lists no files")
    for name, entry in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            raise Phi3OnnxError(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry.size:
            raise Phi3OnnxError(f"{path} is {size} bytes but {MANIFEST} says {entry.size}: copy the package again")
        if verify and sha256_file(path) != entry.sha256:
            raise Phi3OnnxError(f"{path} does not match its sha256 in {MANIFEST}: the package is corrupt")


def read_bundle(path: Path) -> list[Variant]:
    """The bundle's variants; each one's own manifest is the truth about its target."""
    doc_path = path / BUNDLE
    try:
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r} is not {BUNDLE_FORMAT!r}")
        entries = [(str(v["name"]), path / str(v["path"])) for v in doc["variants"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise Phi3OnnxError(f"{doc_path} is corrupt ({type(exc).__name__}: {exc})") from None
    if not entries:
        raise Phi3OnnxError(f"{doc_path} lists no variants")
    return [Variant(name, folder, read_manifest(folder)) for name, folder in entries]


def choose_variant(env: Environment, variants: list[Variant], requested: str = "auto",
                   variant: str | None = None) -> tuple[Variant, Choice]:
    """Best variant for this machine: fastest EP first, native before fallback, then by quantization."""
    if variant is not None:
        return _named_variant(env, variants, requested, variant)
    ranked: list[tuple[tuple[int, int, int], Variant, Choice]] = []
    errors: list[str] = []
    for v in variants:
        try:
            choice = choose_provider(env, v.manifest.target.provider, requested, v.name)
        except Phi3OnnxError as exc:
            errors.append(str(exc))
            continue
        quant = v.manifest.target.quant.method if v.manifest.target.quant else None
        key = (PROVIDER_ORDER.index(choice.provider), int(choice.warning is not None), QUANT_RANK.get(quant, 1))
        ranked.append((key, v, choice))
    if not ranked:
        raise Phi3OnnxError(f"no variant of this bundle can run here: {errors[0]}")
    _, best, choice = min(ranked, key=lambda r: r[0])
    return best, choice


def _named_variant(env: Environment, variants: list[Variant], requested: str, name: str) -> tuple[Variant, Choice]:
    by_name = {v.name: v for v in variants}
    if name not in by_name:
        raise Phi3OnnxError(f"bundle has no variant {name!r}; it has: {', '.join(by_name)}")
    v = by_name[name]
    return v, choose_provider(env, v.manifest.target.provider, requested, v.name)
