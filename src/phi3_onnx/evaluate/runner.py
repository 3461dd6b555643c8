"""The drift check: reference logits once, then each variant window by window against them.

Memory stays at one model plus one window: the reference's logits are written per window to a
temporary folder and the reference is released before the first variant loads; variants load
one at a time. Disk use is windows x window x vocab x 4 bytes (131 MB for 1024 Phi-3 tokens).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.evaluate.data import Positions, WindowPlan, plan_windows, tokenize_file
from phi3_onnx.evaluate.limits import LimitOverrides, check, resolve_limits
from phi3_onnx.evaluate.metrics import DriftAccumulator, window_stats
from phi3_onnx.evaluate.report import DataInfo, ReferenceInfo, Report, VariantResult
from phi3_onnx.evaluate.sources import LogitsSource, PackageSource, choose_ep, first_line, open_reference
from phi3_onnx.manifest import MANIFEST, Variant, discover, read_manifest, real_folder
from phi3_onnx.safety import pause_point, remove_stale

TEMP_PREFIX = "phi3-onnx-eval-"
TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"(?P<pid>\d+)-[^/]+")
from phi3_onnx.progress import task

Advance = Callable[..., None]


def _no_progress(n: int = 1, total: int | None = None) -> None:
    pass


@dataclass(frozen=True)
class EvalOptions:
    data: Path
    window: int = 128
    max_tokens: int = 1024
    positions: Positions = "start"
    limits: LimitOverrides = field(default_factory=LimitOverrides)
    require_all: bool = False
    progress: bool = False  # a rich bar on stderr when it is a TTY; nothing on a pipe (stderr stays the one-line error)


@dataclass(frozen=True)
class ReferenceLogits:
    """Per-window reference logits on disk (float32 .npy), read back one window at a time."""

    folder: Path
    count: int

    @classmethod
    def build(cls, source: LogitsSource, windows: list[np.ndarray], folder: Path,
              advance: Advance = _no_progress) -> ReferenceLogits:
        for k, ids in enumerate(windows):
            np.save(folder / f"window-{k:05d}.npy", source.logits(ids))
            advance(1)
        return cls(folder, len(windows))

    def get(self, k: int) -> np.ndarray:
        return np.load(self.folder / f"window-{k:05d}.npy")


def evaluate(package: str | os.PathLike, reference: str | os.PathLike, options: EvalOptions) -> Report:
    """Evaluate every variant of `package` (a package or a bundle) against `reference`.

    `reference`: a package folder, a checkpoint folder or a hub id of the original checkpoint.
    """
    reference = os.fspath(reference)
    variants = discover(Path(package))  # every file name checked to stay inside its package
    first = variants.items[0]
    tokens = tokenize_file(first.path, options.data)
    plan = plan_windows(int(tokens.size), first.manifest.model, options.window, options.max_tokens, options.positions)
    windows = list(plan.windows(tokens))
    remove_stale(Path(tempfile.gettempdir()), TEMP_RE)  # left by a killed eval
    steps = len(windows) * (1 + len(variants.items))  # one per window: the reference's, then each variant's
    # removed on any exception, KeyboardInterrupt and the CLI's SIGTERM included
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp, \
            task(f"Evaluating {len(variants.items)} variant(s)", steps, options.progress, pipe_lines=False) as advance:
        ref_info, ref = _reference_logits(reference, windows, Path(tmp), advance)
        pause_point("eval:reference")
        _check_vocab(ref, first)
        rows = tuple(evaluate_variant(v, windows, ref, options.limits, advance) for v in variants.items)
    return Report(str(package), variants.bundle, ref_info, _data_info(options, tokens, plan), rows, options.require_all,
                  tuple(same_package_warnings(variants.items, reference)))


REFERENCE_TARGET = "fp32-cpu"


def bundle_reference(package: str | os.PathLike) -> Path:
    """The reference `eval` uses when none is given: the bundle's one fp32-cpu variant."""
    variants = discover(Path(package))
    refs = [v for v in variants.items if v.manifest.target.name == REFERENCE_TARGET]
    if variants.bundle and len(refs) == 1:
        return refs[0].path
    what = f"has {len(refs)} {REFERENCE_TARGET} variants" if refs else f"holds no {REFERENCE_TARGET} variant"
    raise Phi3OnnxError(f"--reference is needed: {package} {what if variants.bundle else 'is a single package, not a bundle'}"
                        f" (give the fp32-cpu export, or the original checkpoint)")


def same_package_warnings(variants: tuple[Variant, ...], reference: str) -> list[str]:
    """A variant that is the reference itself (same folder, or the same files by sha256) passes trivially."""
    ref = Path(reference)
    if not (ref / MANIFEST).is_file():
        return []
    ref_real, ref_files = real_folder(ref), read_manifest(ref).files
    return [f"variant {v.name} ({v.path}) is the reference package itself"
            f" ({'same folder' if real_folder(v.path) == ref_real else 'same files by sha256'}): it passes trivially"
            for v in variants if real_folder(v.path) == ref_real or v.manifest.files == ref_files]


def _reference_logits(reference: str, windows: list[np.ndarray], folder: Path,
                      advance: Advance = _no_progress) -> tuple[ReferenceInfo, ReferenceLogits]:
    start = time.perf_counter()
    source = open_reference(reference)
    try:
        cache = ReferenceLogits.build(source, windows, folder, advance)
    except Exception as exc:  # the reference must run: anything else is bad input, not drift
        raise Phi3OnnxError(f"reference {reference} failed to run: {first_line(exc)}") from None
    info = ReferenceInfo(source.kind, source.path, source.ep, time.perf_counter() - start)
    del source
    gc.collect()  # release the reference model before the first variant loads
    return info, cache


def _check_vocab(ref: ReferenceLogits, variant: Variant) -> None:
    vocab = ref.get(0).shape[-1]
    if vocab != variant.manifest.model.vocab_size:
        raise Phi3OnnxError(f"reference has {vocab} logits per token, {variant.name} has {variant.manifest.model.vocab_size}: not the same model")


def _data_info(options: EvalOptions, tokens: np.ndarray, plan: WindowPlan) -> DataInfo:
    digest = hashlib.sha256(Path(options.data).read_bytes()).hexdigest()
    return DataInfo(str(options.data), digest, int(tokens.size), plan.positions, plan.length, plan.count, options.max_tokens)


def evaluate_variant(variant: Variant, windows: list[np.ndarray], ref: ReferenceLogits, overrides: LimitOverrides,
                     advance: Advance = _no_progress) -> VariantResult:
    """One report row. A variant that cannot run is skipped when it ran on a fallback EP, an error otherwise.
    `advance(1)` per window; a variant that stops early advances by the windows it did not run."""
    import onnxruntime as ort

    ep = choose_ep(variant.manifest, ort.get_available_providers())
    row = VariantResult(variant.name, str(variant.path), variant.manifest.target.name, "pass", None, None,
                        ep.requested, ep.note, resolve_limits(variant.manifest.target, overrides))
    t0 = time.perf_counter()
    done = 0
    try:
        source = PackageSource.open(variant.path, ep.used)
        t1 = time.perf_counter()
        acc = DriftAccumulator()
        for k, ids in enumerate(windows):
            acc.add(window_stats(ref.get(k), source.logits(ids), ids))
            done += 1
            advance(1)
    except Exception as exc:  # onnxruntime raises its own exception types for missing kernels
        advance(len(windows) - done)
        return _not_run(row, exc, fallback=ep.note is not None)
    metrics = acc.result()
    failures = tuple(check(metrics, row.limits.limits))
    return dataclasses.replace(row, status="fail" if failures else "pass", ep=ep.used, metrics=metrics,
                    failures=failures, seconds=time.perf_counter() - t1, load_seconds=t1 - t0)


def _not_run(row: VariantResult, exc: Exception, fallback: bool) -> VariantResult:
    """Skipped (its EP is absent and the CPU EP cannot run it) or error (it fails on its own EP)."""
    reason = f"cannot run on CPUExecutionProvider: {first_line(exc)}" if fallback else f"failed: {first_line(exc)}"
    return dataclasses.replace(row, status="skipped" if fallback else "error", reason=reason)
