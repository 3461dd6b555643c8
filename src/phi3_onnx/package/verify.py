"""The staged package, checked the way a user would load it, before it is renamed into place.

An export must never end with exit 0 and an unloadable package: model.onnx and its external-data
references are checked, then a child process (so the exporter's own peak memory stays what it is,
and a crash inside genai cannot take the exporter with it) has onnxruntime-genai parse
genai_config.json, load the tokenizer and load the whole model on the CPU EP — the model load
skipped only when the machine could not hold it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError

# onnxruntime-genai runs in a child process: a package it cannot parse may crash it (a malformed
# tokenizer.json has segfaulted it), which must end the check, not the exporter.
_CHILD = (
    "import sys, onnxruntime_genai as og\n"
    "c = og.Config(sys.argv[1]); og.Tokenizer(c).encode('Hello')\n"
    "if sys.argv[2] == '1':\n"
    "    c.clear_providers(); og.Model(c)\n"
)


def available_memory() -> int:
    """Bytes the machine can still hand out (MemAvailable), or total RAM where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_graph(folder: Path, name: str = "model.onnx") -> None:
    """`name` (model.onnx) parses, and every external-data reference stays inside the package and inside its file.

    (onnx.checker cannot judge these graphs: it has no schema for ORT's contrib ops, e.g.
    SimplifiedLayerNormalization in the default domain; loading the model in ORT, below, does.)
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(folder / name), load_external_data=False)
    except Exception as exc:
        raise Phi3OnnxError(f"exported {name} does not parse: {_first_line(exc)}") from None
    sizes: dict[str, int] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        if info.location not in sizes:
            path = folder / info.location
            if Path(info.location).is_absolute() or ".." in Path(info.location).parts or not path.is_file():
                raise Phi3OnnxError(f"exported {name}: tensor {tensor.name} points at {info.location!r}, not a package file")
            sizes[info.location] = path.stat().st_size
        if (info.offset or 0) + (info.length or 0) > sizes[info.location]:
            raise Phi3OnnxError(f"exported {name}: tensor {tensor.name} lies past the end of {info.location}")


def check_genai(folder: Path, full_load: bool) -> None:
    """In a child process, genai parses the config and loads the tokenizer (and, with full_load, the model on the CPU EP)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), "1" if full_load else "0"], capture_output=True, text=True)
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1][:300] if lines else f"the check process died (exit {out.returncode})"
        raise Phi3OnnxError(f"the exported package does not load in onnxruntime-genai: {why}")


def check_loadable(folder: Path) -> str:
    """Check the staged package; returns how far it went ('full load' or 'config + tokenizer')."""
    for graph in sorted(p.name for p in folder.glob("*.onnx")):  # model.onnx, and a window-free copy if any
        check_graph(folder, graph)
    if importlib.util.find_spec("onnxruntime_genai") is None:  # the child imports it, not the exporter
        return "graph only (onnxruntime-genai not installed)"
    weights = sum(p.stat().st_size for p in folder.glob("*.onnx*"))
    full = weights * 1.5 < available_memory()
    check_genai(folder, full_load=full)
    return "full load" if full else "config + tokenizer (too large to load on this machine)"
