"""The house's one-way flow, read from the code's own imports (ast): a back-arrow fails here.

checkpoint -> graph -> quantize -> package; runtime and evaluate read packages only; serve and bench
read them through the runtime; the CLI's verb
modules import the app, never each other. The ground floor (errors, spec, targets, manifest,
progress, version, safety) imports nothing above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "phi3_onnx"
GROUND = {"errors", "spec", "targets", "manifest", "progress", "version", "registry", "safety"}
# stage -> the stages (besides the ground floor and itself) it may import
ALLOWED = {
    "checkpoint": set(),
    "graph": {"checkpoint"},
    "quantize": {"checkpoint", "graph"},
    "package": {"checkpoint", "graph", "quantize"},
    "runtime": set(),
    "evaluate": set(),
    "serve": {"runtime"},
    "bench": {"runtime"},  # a reader like runtime/evaluate: packages only through phi3_onnx.runtime
    "cli": {"checkpoint", "graph", "quantize", "package", "runtime", "evaluate", "serve", "bench", "__init__"},
    "__init__": {"package"},
    "__main__": {"cli"},
}


def _stage(module: str) -> str:
    """phi3_onnx.graph.builder -> graph; phi3_onnx -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phi3_onnx"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if (SRC.parent / node.module.replace(".", "/") / a.name).exists()
                       or (SRC.parent / f"{node.module.replace('.', '/')}/{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("phi3_onnx"))
    return out


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    module = _module_of(path)
    stage = _stage(module)
    bad = []
    for imported in _imports(path):
        target = _stage(imported)
        if target in GROUND or target == stage:
            continue
        if stage in GROUND:
            bad.append(imported)
        elif target not in ALLOWED.get(stage, set()):
            bad.append(imported)
    assert not bad, f"{module} ({stage}) imports {bad} against the flow"


def test_ground_floor_imports_only_ground_floor():
    for name in GROUND:
        path = SRC / f"{name}.py" if (SRC / f"{name}.py").exists() else SRC / name / "__init__.py"
        above = {i for i in _imports(path) if _stage(i) not in GROUND}
        assert not above, f"{name} imports {above}"


def test_cli_verb_modules_import_no_other_verb_module():
    from phi3_onnx.cli import VERB_MODULES

    for verb in VERB_MODULES:
        imported = {i for i in _imports(SRC / "cli" / f"{verb}.py") if i.startswith("phi3_onnx.cli")}
        assert imported <= {"phi3_onnx.cli.app"}, f"cli/{verb}.py imports {imported}"


def test_every_stage_folder_is_known():
    """A new top-level folder must be placed in the flow above (and so in this test) on purpose."""
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(ALLOWED) | GROUND | {"data"}, folders - set(ALLOWED) - GROUND
