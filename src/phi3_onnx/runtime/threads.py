"""CPU threads for the decoder's ONNX Runtime session, set through og.Config (the package stays untouched).

onnxruntime-genai 0.18 creates the session with `intra_op_num_threads` 1 when genai_config.json
leaves the key out (measured: one intra-op thread, ~half the decode speed of two on a 2-core
machine); 0 is ONNX Runtime's own default, one thread per physical core. phi3-onnx packages say 0
for CPU targets. `load(threads=...)` resolves what the session gets:

    threads=None  the package's own `intra_op_num_threads` when it has one; else, on the CPU EP, 0
                  (all physical cores: packages from before the key, the model builder's packages)
                  and on GPU EPs genai's default (the GPU does the work; see README "Threads")
    threads=0     all physical cores (passed to ONNX Runtime as the count, see resolve_threads)
    threads=N     exactly N intra-op threads
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from phi3_onnx.errors import Phi3OnnxError

KEY = "intra_op_num_threads"
ALL_CORES = 0


def check_threads(threads: int | None) -> int | None:
    """None (the default), 0 (all physical cores) or a positive count."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise Phi3OnnxError(f"threads must be a whole number >= 0 (0 = all physical cores), got {threads!r}")
    return threads


def package_threads(path: Path) -> int | None:
    """The package's own intra_op_num_threads from genai_config.json, or None when it has none."""
    try:
        cfg = json.loads((path / "genai_config.json").read_text())
        value = cfg["model"]["decoder"]["session_options"].get(KEY)
    except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def resolve_threads(path: Path, provider: str, threads: int | None) -> int | None:
    """The intra_op_num_threads the session gets (None: leave genai's default alone).

    0 (all cores) is passed on as the physical core count: with 0 ONNX Runtime also affinitizes its
    threads (its threading docs), which cost decode speed on a shared machine (benchmarks/RESULTS.md: one run,
    2 cores, 8.59 vs 7.60 tok/s median for 2 vs 0).
    """
    threads = check_threads(threads)
    if threads is None:
        own = package_threads(path)
        threads = own if own is not None else (ALL_CORES if provider == "cpu" else None)
    return physical_cores() if threads == ALL_CORES else threads


def session_overlay(threads: int | None) -> dict[str, Any]:
    """og.Config.overlay document that sets the decoder's intra-op thread count ({} for None)."""
    if threads is None:
        return {}
    return {"model": {"decoder": {"session_options": {KEY: threads}}}}


def physical_cores() -> int:
    """Physical cores this process may use (what ONNX Runtime's 0 means), at least 1.

    Linux: distinct (physical id, core id) pairs in /proc/cpuinfo among the CPUs in our affinity
    mask; elsewhere the logical CPU count.
    """
    allowed = _affinity()
    cores = _linux_cores(allowed)
    if cores:
        return cores
    return max(1, len(allowed) if allowed else (os.cpu_count() or 1))


def effective_threads(threads: int | None) -> int:
    """A resolved setting as a count: 0 -> physical cores; None (genai's default) -> 1."""
    if threads is None:
        return 1
    return physical_cores() if threads == ALL_CORES else threads


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return set()


def _linux_cores(allowed: set[int]) -> int:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("processor")
        if cpu is None or (allowed and int(cpu) not in allowed):
            continue
        cores.add((fields.get("physical id", "0"), fields.get("core id", cpu)))
    return len(cores)
