"""Drift metrics between a reference's and a variant's next-token logits, accumulated window by window.

Every metric is computed over the positions that have a next token inside the window (positions
0..T-2 of a T-token window predict tokens 1..T-1), so "tokens" means predicted tokens. Math is
done in float64 so that a KL of ~1e-7 between two fp32 runs is not rounding noise of the metric.
Only per-token scalars are kept between windows (for the p99 of KL); logits are never accumulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64, stable for large logits."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row: logprobs [n, vocab], targets [n]."""
    return -np.take_along_axis(logprobs, targets[:, None].astype(np.int64), axis=-1)[:, 0]


def kl_divergence(ref_logprobs: np.ndarray, var_logprobs: np.ndarray) -> np.ndarray:
    """KL(ref || variant) per row, in nats: sum_v p_ref (log p_ref - log p_var)."""
    return (np.exp(ref_logprobs) * (ref_logprobs - var_logprobs)).sum(axis=-1)


def top1_agreement(ref_logits: np.ndarray, var_logits: np.ndarray) -> np.ndarray:
    """Whether the most likely next token is the same, per row."""
    return np.argmax(ref_logits, axis=-1) == np.argmax(var_logits, axis=-1)


@dataclass(frozen=True)
class WindowStats:
    """Per-predicted-token scalars of one window (small: a few floats per token)."""

    ref_nll: np.ndarray
    var_nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray
    max_abs_dlogit: float


def window_stats(ref_logits: np.ndarray, var_logits: np.ndarray, input_ids: np.ndarray) -> WindowStats:
    """Compare logits [T, vocab] of one window of ids [T] over its T-1 predicting positions."""
    if ref_logits.shape != var_logits.shape:
        raise ValueError(f"logits shapes differ: reference {ref_logits.shape}, variant {var_logits.shape}")
    ref, var = ref_logits[:-1].astype(np.float64), var_logits[:-1].astype(np.float64)
    targets = np.asarray(input_ids)[1:]
    ref_lp, var_lp = log_softmax(ref), log_softmax(var)
    return WindowStats(
        ref_nll=token_nll(ref_lp, targets),
        var_nll=token_nll(var_lp, targets),
        kl=kl_divergence(ref_lp, var_lp),
        agree=top1_agreement(ref, var),
        max_abs_dlogit=float(np.abs(ref - var).max()),
    )


@dataclass(frozen=True)
class DriftMetrics:
    """The numbers one report row shows for a variant."""

    ppl: float
    ref_ppl: float
    ppl_increase: float
    ppl_increase_pct: float
    kl_mean: float
    kl_p99: float
    top1: float
    max_abs_dlogit: float
    tokens: int


@dataclass
class DriftAccumulator:
    """Running sums over windows; `result()` turns them into DriftMetrics."""

    ref_nll_sum: float = 0.0
    var_nll_sum: float = 0.0
    agree: int = 0
    max_abs_dlogit: float = 0.0
    kl: list[np.ndarray] = field(default_factory=list)

    def add(self, stats: WindowStats) -> None:
        self.ref_nll_sum += float(stats.ref_nll.sum())
        self.var_nll_sum += float(stats.var_nll.sum())
        self.agree += int(stats.agree.sum())
        self.max_abs_dlogit = max(self.max_abs_dlogit, stats.max_abs_dlogit)
        self.kl.append(stats.kl)

    def result(self) -> DriftMetrics:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        n = int(kl.size)
        if n == 0:
            raise ValueError("no tokens were evaluated")
        ppl, ref_ppl = _exp(self.var_nll_sum / n), _exp(self.ref_nll_sum / n)
        return DriftMetrics(
            ppl=ppl,
            ref_ppl=ref_ppl,
            ppl_increase=ppl - ref_ppl,
            ppl_increase_pct=100.0 * (ppl - ref_ppl) / ref_ppl,
            kl_mean=float(kl.mean()),
            kl_p99=float(np.percentile(kl, 99)),
            top1=self.agree / n,
            max_abs_dlogit=self.max_abs_dlogit,
            tokens=n,
        )


def _exp(x: float) -> float:
    """exp that saturates to inf (a hopeless variant) instead of raising OverflowError."""
    return math.exp(x) if x < 709.0 else math.inf
