"""The runtime's only third-party dependencies: onnxruntime and onnxruntime-genai, imported lazily.

A missing runtime gets a message naming the extra to install; an older one than the package's
manifest `requires` gets a message naming the version needed.
"""

from __future__ import annotations

import re
from types import ModuleType

from phi3_onnx.errors import Phi3OnnxError

INSTALL_HINT = "install one runtime: pip install 'phi3-onnx[cpu]' (or [cuda] for NVIDIA GPUs, [directml] for Windows GPUs)"


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError:
        raise Phi3OnnxError(f"onnxruntime is not installed; {INSTALL_HINT}") from None
    return onnxruntime


def import_genai() -> ModuleType:
    try:
        import onnxruntime_genai
    except ImportError:
        raise Phi3OnnxError(f"onnxruntime-genai is not installed; {INSTALL_HINT}") from None
    return onnxruntime_genai


def installed_versions() -> dict[str, str]:
    """Versions of the runtimes as imported (module versions: the -gpu/-directml wheels share names)."""
    return {"onnxruntime": import_onnxruntime().__version__, "onnxruntime-genai": import_genai().__version__}


def version_tuple(text: str) -> tuple[int, ...]:
    """'1.22.0rc1' -> (1, 22, 0); enough to compare release versions without `packaging`."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def check_requires(requires: dict[str, str], installed: dict[str, str]) -> None:
    """Refuse to load under a runtime older than the package needs."""
    for dist, minimum in sorted(requires.items()):
        have = installed.get(dist)
        if have is None:
            raise Phi3OnnxError(f"package needs {dist}>={minimum}, which is not installed; {INSTALL_HINT}")
        if version_tuple(have) < version_tuple(minimum):
            raise Phi3OnnxError(f"package needs {dist}>={minimum} but {have} is installed; "
                                f"upgrade: pip install -U '{dist}>={minimum}'")
