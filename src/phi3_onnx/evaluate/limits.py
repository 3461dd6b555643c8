"""Pass/fail limits: the target registry's defaults, CLI overrides, and the verdict per variant."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.evaluate.metrics import DriftMetrics
from phi3_onnx.targets import TARGETS, DriftLimits, Target


@dataclass(frozen=True)
class LimitOverrides:
    """Limits given on the command line; None keeps the target's default."""

    max_ppl_increase_pct: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        """Limits are finite and non-negative, top-1 a fraction: a NaN or negative limit would make
        every variant fail (or, compared the other way, pass) for a reason that is not drift."""
        for flag, value in (("--max-ppl-increase", self.max_ppl_increase_pct), ("--max-kl", self.max_kl),
                            ("--min-top1", self.min_top1)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise Phi3OnnxError(f"{flag} must be a finite number >= 0, got {value!r:.80}")
        if self.min_top1 is not None and self.min_top1 > 1:
            raise Phi3OnnxError(f"--min-top1 is a fraction in 0..1, got {self.min_top1}")


@dataclass(frozen=True)
class ResolvedLimits:
    limits: DriftLimits
    source: str  # "registry" | "manifest" | "cli" (any override given)


def resolve_limits(target: Target, overrides: LimitOverrides) -> ResolvedLimits:
    """The registry's current limits for the target's name (the manifest's copy for unknown names).

    Why the registry first: limits get re-tuned with the tool, and CI re-checks old exports
    against the tool's current judgement; a package of a target this version does not know
    still carries the limits it was exported with.
    """
    known = TARGETS.get(target.name)
    limits, source = (known.limits, "registry") if known else (target.limits, "manifest")
    given = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    if given:
        limits, source = dataclasses.replace(limits, **given), "cli"
    return ResolvedLimits(limits, source)


@dataclass(frozen=True)
class Failure:
    """One metric over its limit; `excess` is how far past the limit (always positive)."""

    metric: str
    value: float
    limit: float
    excess: float

    def describe(self) -> str:
        op = "<" if self.metric == "top1" else ">"
        return f"{self.metric} {self.value:.6g} {op} {self.limit:.6g} (by {self.excess:.3g})"


def check(metrics: DriftMetrics, limits: DriftLimits) -> list[Failure]:
    """Every limit the metrics break; empty when the variant passes.

    Comparisons are written `not (value <= limit)` so that a NaN metric (a variant emitting
    NaN logits) fails instead of slipping through.
    """
    failures = []
    if not metrics.ppl_increase_pct <= limits.max_ppl_increase_pct:
        failures.append(_over("ppl_increase_pct", metrics.ppl_increase_pct, limits.max_ppl_increase_pct))
    if not metrics.kl_mean <= limits.max_kl:
        failures.append(_over("kl_mean", metrics.kl_mean, limits.max_kl))
    if not metrics.top1 >= limits.min_top1:
        failures.append(Failure("top1", metrics.top1, limits.min_top1, limits.min_top1 - metrics.top1))
    return failures


def _over(metric: str, value: float, limit: float) -> Failure:
    return Failure(metric, value, limit, value - limit)
