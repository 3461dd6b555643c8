"""Opening a package or a bundle of packages: manifest, file integrity, variant choice.

What a folder holds (`Variant`, `discover`) and the file checks are `phi3_onnx.manifest`'s, shared
with the eval; this module adds the runtime's choice of variant for the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import Manifest, Variant, check_package, read_manifest
from phi3_onnx.runtime.providers import PROVIDER_ORDER, Choice, Environment, choose_provider

# Among variants for one EP: AWQ int4 (most accurate int4), then RTN int4, then unquantized.
QUANT_RANK = {"awq": 0, "rtn": 1, None: 2}


@dataclass(frozen=True)
class Package:
    path: Path
    manifest: Manifest


def open_package(path: str | Path, verify: bool = False) -> Package:
    """Read the manifest and check every file (inside the folder, its size; sha256 with verify) before loading."""
    folder = Path(path)
    if not folder.is_dir():
        raise Phi3OnnxError(f"package {folder} does not exist")
    manifest = read_manifest(folder)
    check_package(folder, manifest, verify)
    return Package(folder, manifest)


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
