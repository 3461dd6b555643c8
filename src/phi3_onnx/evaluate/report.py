"""The drift report: one row per variant, as JSON (schema in docs/eval-json.md), Markdown or text.

The JSON form is an interface CI tools read: add keys only with a schema_version bump, never
rename. Non-finite floats (a variant producing NaN) are written as null, keeping the JSON valid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from phi3_onnx.version import __version__
from phi3_onnx.evaluate.limits import Failure, ResolvedLimits
from phi3_onnx.evaluate.metrics import DriftMetrics

SCHEMA_VERSION = 1
Status = Literal["pass", "fail", "skipped", "error"]


@dataclass(frozen=True)
class ReferenceInfo:
    kind: str  # "package" | "checkpoint"
    path: str
    ep: str
    seconds: float


@dataclass(frozen=True)
class DataInfo:
    path: str
    sha256: str
    file_tokens: int
    positions: str
    window: int
    windows: int
    max_tokens: int


@dataclass(frozen=True)
class VariantResult:
    """One row. `metrics` is None for skipped/error rows, which carry a `reason` instead."""

    name: str
    path: str
    target: str
    status: Status
    reason: str | None
    ep: str | None
    ep_requested: str
    ep_note: str | None
    limits: ResolvedLimits
    metrics: DriftMetrics | None = None
    failures: tuple[Failure, ...] = ()
    seconds: float = 0.0
    load_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "target": self.target, "status": self.status,
            "reason": self.reason, "ep": self.ep, "ep_requested": self.ep_requested, "ep_note": self.ep_note,
            "limits": {**_floats(dataclasses.asdict(self.limits.limits)), "source": self.limits.source},
            "metrics": _floats(dataclasses.asdict(self.metrics)) if self.metrics else None,
            "failures": [_floats(dataclasses.asdict(f)) for f in self.failures],
            "seconds": round(self.seconds, 3), "load_seconds": round(self.load_seconds, 3),
        }


@dataclass(frozen=True)
class Report:
    package: str
    bundle: bool
    reference: ReferenceInfo
    data: DataInfo
    variants: tuple[VariantResult, ...]
    require_all: bool = False
    warnings: tuple[str, ...] = ()  # for the person running it (stderr), not part of the JSON schema

    @property
    def failed(self) -> tuple[VariantResult, ...]:
        """Rows that fail the run: over a limit, not runnable on their own EP, or skipped under --require-all."""
        bad = {"fail", "error", "skipped"} if self.require_all else {"fail", "error"}
        return tuple(v for v in self.variants if v.status in bad)

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "phi3-onnx", "version": __version__},
            "package": self.package,
            "bundle": self.bundle,
            "passed": self.passed,
            "require_all": self.require_all,
            "reference": {**dataclasses.asdict(self.reference), "seconds": round(self.reference.seconds, 3)},
            "data": dataclasses.asdict(self.data),
            "variants": [v.to_json() for v in self.variants],
        }

    def summary(self) -> str:
        """One line naming each failing variant and metric, and by how much (the CLI's error message)."""
        parts = [f"{v.name}: " + ("; ".join(f.describe() for f in v.failures) or f"{v.status} ({v.reason})")
                 for v in self.failed]
        return f"accuracy drift check failed for {len(parts)} of {len(self.variants)} variant(s): " + " | ".join(parts)


def _floats(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: NaN/inf become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
