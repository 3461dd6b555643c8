"""Run phi3-onnx packages: `load(path)` → a model with generate / stream / chat.

Needs only onnxruntime (any build: CPU, -gpu, -directml) and onnxruntime-genai; reads the
package's manifest.json and genai files and never imports the exporter or quantizers.

    from phi3_onnx.runtime import load
    model = load("phi3-mini-int4")                       # or a bundle folder; device="auto"
    print(model.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=64))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime.deps import check_requires, installed_versions
from phi3_onnx.runtime.model import ChatSession, Phi3Model
from phi3_onnx.runtime.options import GenerationOptions
from phi3_onnx.manifest import Variant, discover
from phi3_onnx.runtime.package import Package, choose_variant, open_package
from phi3_onnx.runtime.providers import Choice, Environment, choose_provider, probe_environment
from phi3_onnx.runtime.threads import check_threads

log = logging.getLogger("phi3_onnx")


@dataclass(frozen=True)
class Plan:
    """What `load` would do: the package (or bundle variant) and the EP, with the reason."""

    package: Package
    choice: Choice
    environment: Environment
    variant: str | None = None
    variants: tuple[Variant, ...] = ()


def plan_load(path: str | Path, device: str = "auto", verify: bool = False, variant: str | None = None,
              environment: Environment | None = None) -> Plan:
    """Open the package or bundle, check its files, pick the variant and EP; loads no model."""
    folder = Path(path)
    if not folder.exists():
        raise Phi3OnnxError(f"package {folder} does not exist")
    env = environment or probe_environment()
    found = discover(folder)
    if not found.bundle:
        if variant is not None:
            raise Phi3OnnxError(f"{folder} is a single package, not a bundle: variant= does not apply")
        package = open_package(folder, verify)
        target = package.manifest.target
        return Plan(package, choose_provider(env, target.provider, device, target.name), env)
    chosen, choice = choose_variant(env, list(found.items), device, variant)
    return Plan(open_package(chosen.path, verify), choice, env, chosen.name, found.items)


def load(path: str | Path, device: str = "auto", verify: bool = False, max_length: int | None = None,
         variant: str | None = None, max_batch: int | None = None, speculative: str | None = None,
         threads: int | None = None) -> Phi3Model:
    """Load a package (or the best variant of a bundle) on device "auto" | "cpu" | "cuda" | "dml".

    Checks file sizes (and sha256s with verify=True) and the runtime versions the package needs.
    max_length sizes the KV cache (default: the package's, at most 4096); raise it for long prompts.
    speculative="ngram" turns on n-gram speculative decoding for every call (greedy output unchanged;
    a call's own speculative= overrides it).
    max_batch sizes genai's batching Engine (`runtime.batch.BatchEngine`; default: genai's own).
    threads: the CPU threads of the model's ONNX Runtime session (0 = all physical cores); default:
    the package's setting, else all physical cores on the CPU EP (see phi3_onnx.runtime.threads).
    """
    check_threads(threads)
    plan = plan_load(path, device, verify, variant)
    check_requires(plan.package.manifest.requires, installed_versions())
    if plan.choice.warning:
        log.warning(plan.choice.warning)
    return Phi3Model(plan.package, plan.choice, max_length, plan.variant, max_batch, speculative, threads)


__all__ = ["ChatSession", "Choice", "Environment", "GenerationOptions", "Phi3Model", "Plan", "choose_provider",
           "load", "plan_load", "probe_environment"]
