"""Which packages to evaluate: one package folder, or every variant folder of a bundle.

A bundle is detected only as "a folder whose subfolders hold manifest.json" (bundle.json is
not read), so the eval does not depend on the bundle writer's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.manifest import MANIFEST, Manifest, read_manifest


@dataclass(frozen=True)
class Variant:
    name: str  # the bundle's subfolder name, or the package folder's name
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class Variants:
    items: tuple[Variant, ...]
    bundle: bool


def discover_variants(path: Path) -> Variants:
    """The package itself, or the bundle's variant folders in name order."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return Variants((Variant(path.name, path, read_manifest(path)),), bundle=False)
    if not path.is_dir():
        raise Phi3OnnxError(f"package {path} not found")
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    if not subs:
        raise Phi3OnnxError(f"{path} is neither a package ({MANIFEST}) nor a bundle (subfolders with {MANIFEST})")
    items = tuple(Variant(p.name, p, read_manifest(p)) for p in subs)
    _check_same_model(items)
    return Variants(items, bundle=True)


def _check_same_model(items: tuple[Variant, ...]) -> None:
    """Variants are compared token by token on one tokenization: they must share the model."""
    first = items[0]
    for v in items[1:]:
        if v.manifest.model != first.manifest.model:
            raise Phi3OnnxError(f"bundle variants {first.name} and {v.name} are exports of different models")
