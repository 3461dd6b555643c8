"""The machine and versions a benchmark ran on, and GPU memory per process (NVML, when present)."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any

from phi3_onnx.runtime.deps import installed_versions
from phi3_onnx.runtime.threads import physical_cores
from phi3_onnx.version import __version__


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "ram_bytes": _ram_bytes(),
        "gpus": gpu_names(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def versions() -> dict[str, str]:
    out = {"phi3-onnx": __version__, "python": platform.python_version()}
    out.update(installed_versions())
    import numpy

    out["numpy"] = numpy.__version__
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _ProcessInfo(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


def _nvml() -> Any:
    name = "nvml.dll" if sys.platform == "win32" else "libnvidia-ml.so.1"
    try:
        lib = ctypes.CDLL(name)
        return lib if lib.nvmlInit_v2() == 0 else None
    except (OSError, AttributeError):
        return None


def _handles(lib: Any) -> list[Any]:
    count = ctypes.c_uint(0)
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return []
    out = []
    for i in range(count.value):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) == 0:
            out.append(handle)
    return out


def gpu_names() -> list[str]:
    lib = _nvml()
    if lib is None:
        return []
    names = []
    for handle in _handles(lib):
        buf = ctypes.create_string_buffer(96)
        if lib.nvmlDeviceGetName(handle, buf, 96) == 0:
            names.append(buf.value.decode(errors="replace"))
    return names


def gpu_bytes_used(pid: int | None = None) -> int | None:
    """GPU memory held by process `pid` (default: this one) over all GPUs; None without NVML."""
    lib = _nvml()
    if lib is None:
        return None
    pid = os.getpid() if pid is None else pid
    total = 0
    for handle in _handles(lib):
        count = ctypes.c_uint(64)
        infos = (_ProcessInfo * 64)()
        if lib.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(count), infos) != 0:
            continue
        total += sum(int(p.usedGpuMemory) for p in infos[: count.value] if p.pid == pid)
    return total
