"""Execution-provider choice: a pure function over what is installed, what is present and the package.

`onnxruntime.get_available_providers()` lists the EPs compiled into the installed wheel, not the
devices present (onnxruntime-gpu lists CUDA on a laptop without an NVIDIA GPU), so the choice also
takes device probes. `probe_environment()` gathers the facts; `choose_provider()` decides and
explains; only the former touches the machine, so the latter is unit-tested over simulated lists.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.targets import TARGETS
from phi3_onnx.targets.providers import ORT_NAMES, PROVIDER_ORDER, PROVIDERS

# The EPs as data (targets.providers): ORT names, labels, extras, preference for device="auto", probes.
DEVICES = ("auto", *PROVIDER_ORDER)
LABELS = {n: p.label for n, p in PROVIDERS.items()}
EXTRAS = {n: p.extra for n, p in PROVIDERS.items()}


@dataclass(frozen=True)
class Environment:
    """What this machine offers: EPs compiled into onnxruntime(-genai) and devices found by probing."""

    providers: tuple[str, ...]  # onnxruntime names, e.g. ("CUDAExecutionProvider", "CPUExecutionProvider")
    cuda_devices: int = 0
    dml_adapters: int = 0

    def usable(self, provider: str) -> bool:
        """The EP is compiled in and (for GPUs) a device is present."""
        probe = PROVIDERS[provider].probe
        present = probe is None or getattr(self, probe) > 0
        return ORT_NAMES[provider] in self.providers and present

    def why_not(self, provider: str) -> str:
        if ORT_NAMES[provider] not in self.providers:
            return f"onnxruntime has no {ORT_NAMES[provider]} (install {EXTRAS[provider]})"
        return f"{ORT_NAMES[provider]} is installed but no {LABELS[provider]} device was found"


@dataclass(frozen=True)
class Choice:
    """The EP a package will run on, why, and a one-line warning when it is not the package's own."""

    provider: str
    reason: str
    warning: str | None = None


def runs_on(package_provider: str, provider: str) -> bool:
    """Can a package built for `package_provider` run on EP `provider`?

    Its own EP always; the CPU EP too, since it implements every contrib op these graphs use
    (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNorm, RotaryEmbedding) in fp32 and fp16.
    A CPU package (fp32 activations) does not run on GPU EPs: their GQA kernels are fp16-only.
    """
    return provider == package_provider or provider == "cpu"


def targets_for(provider: str) -> str:
    """Registry targets built for `provider`, to name in a refusal."""
    names = [t.name for t in TARGETS.values() if t.provider == provider]
    return f"a {LABELS[provider]} target" + (f" ({', '.join(names)})" if names else "")


def choose_provider(env: Environment, package_provider: str, requested: str = "auto", target_name: str = "") -> Choice:
    """Pick the EP for a package: explicit device if it can work, else CUDA > DirectML > CPU."""
    if requested not in DEVICES:
        raise Phi3OnnxError(f"unknown device {requested!r}; choose from: {', '.join(DEVICES)}")
    built = f"{target_name or 'package'} is built for {LABELS[package_provider]}"
    if requested != "auto":
        return _explicit(env, package_provider, requested, built)
    for provider in PROVIDER_ORDER:
        if env.usable(provider) and runs_on(package_provider, provider):
            return _explain(env, package_provider, provider, built)
    raise Phi3OnnxError(f"{built} and no execution provider here can run it")


def _explicit(env: Environment, package_provider: str, provider: str, built: str) -> Choice:
    if not env.usable(provider):
        raise Phi3OnnxError(f"device {provider} requested but {env.why_not(provider)}")
    if not runs_on(package_provider, provider):
        raise Phi3OnnxError(
            f"{built}; it cannot run on the {LABELS[provider]} EP: export {targets_for(provider)} instead")
    return _explain(env, package_provider, provider, built, requested=True)


def _explain(env: Environment, package_provider: str, provider: str, built: str, requested: bool = False) -> Choice:
    if provider == package_provider:
        how = "requested" if requested else "the package's own EP"
        return Choice(provider, f"{built}; {ORT_NAMES[provider]} is {how} and usable here")
    cause = "requested" if requested else env.why_not(package_provider)
    warning = (f"{built} but running on the {LABELS[provider]} EP ({cause}); expect it to be slower — "
               f"export {targets_for(provider)} for this machine")
    return Choice(provider, f"{built}; falling back to {ORT_NAMES[provider]}: {cause}", warning)


def probe_environment(providers: tuple[str, ...] | None = None) -> Environment:
    """The facts about this machine: installed EPs plus device probes (cheap, no session created)."""
    if providers is None:
        from phi3_onnx.runtime.deps import import_onnxruntime

        providers = tuple(import_onnxruntime().get_available_providers())
    cuda = cuda_device_count() if ORT_NAMES["cuda"] in providers else 0
    dml = dml_adapter_count() if ORT_NAMES["dml"] in providers else 0
    return Environment(providers=providers, cuda_devices=cuda, dml_adapters=dml)


def cuda_device_count() -> int:
    """NVIDIA GPUs visible through the driver API (libcuda / nvcuda.dll); 0 when there is no driver."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


def dml_adapter_count() -> int:
    """DirectML needs Windows 10+ with Direct3D 12; every such machine has at least one adapter."""
    if sys.platform != "win32":
        return 0
    try:
        ctypes.WinDLL("d3d12.dll")  # type: ignore[attr-defined]
        return 1
    except (OSError, AttributeError):
        return 0
