"""Unit tests of the drift metrics and limits, against independent computations on known logits.

The expected values are computed here with PyTorch's cross_entropy / kl_div and plain numpy
(never with phi3_onnx.evaluate), so a wrong formula in the eval code fails these tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phi3_onnx.evaluate.data import plan_windows
from phi3_onnx.evaluate.limits import LimitOverrides, check, resolve_limits
from phi3_onnx.evaluate.metrics import DriftAccumulator, DriftMetrics, window_stats
from phi3_onnx.spec import LongRope, ModelSpec
from phi3_onnx.targets import TARGETS, DriftLimits

VOCAB, T = 50, 17


def _known_windows(seed: int = 0, n: int = 3) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, reference logits, variant logits) per window; the variant is the reference plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ref = rng.normal(0, 3, (T, VOCAB)).astype(np.float32)
        var = (ref + rng.normal(0, 0.8, ref.shape)).astype(np.float32)
        out.append((rng.integers(0, VOCAB, T), ref, var))
    return out


def _expected(windows) -> dict[str, float]:
    """The metrics from torch ops over all windows' predicting positions at once."""
    ids = torch.tensor(np.concatenate([w[0][1:] for w in windows]))
    ref = torch.tensor(np.concatenate([w[1][:-1] for w in windows]), dtype=torch.float64)
    var = torch.tensor(np.concatenate([w[2][:-1] for w in windows]), dtype=torch.float64)
    ref_lp, var_lp = torch.log_softmax(ref, -1), torch.log_softmax(var, -1)
    kl = torch.nn.functional.kl_div(var_lp, ref_lp, log_target=True, reduction="none").sum(-1).numpy()
    ppl = math.exp(torch.nn.functional.cross_entropy(var, ids).item())
    ref_ppl = math.exp(torch.nn.functional.cross_entropy(ref, ids).item())
    return {
        "ppl": ppl, "ref_ppl": ref_ppl, "ppl_increase_pct": 100 * (ppl / ref_ppl - 1),
        "kl_mean": float(kl.mean()), "kl_p99": _p99_by_hand(kl),
        "top1": float((ref.argmax(-1) == var.argmax(-1)).double().mean()),
        "max_abs_dlogit": float((ref - var).abs().max()), "tokens": int(ids.numel()),
    }


def _p99_by_hand(x: np.ndarray) -> float:
    """Linear interpolation between the two order statistics around rank 0.99 (n - 1)."""
    xs, pos = np.sort(x), 0.99 * (x.size - 1)
    lo = int(math.floor(pos))
    return float(xs[lo] + (pos - lo) * (xs[min(lo + 1, x.size - 1)] - xs[lo]))


def test_metrics_match_torch_on_known_logits():
    windows = _known_windows()
    acc = DriftAccumulator()
    for ids, ref, var in windows:
        acc.add(window_stats(ref, var, ids))
    got, want = acc.result(), _expected(windows)
    assert got.tokens == want["tokens"] == 3 * (T - 1)
    for key in ("ppl", "ref_ppl", "ppl_increase_pct", "kl_mean", "kl_p99", "top1", "max_abs_dlogit"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got.ppl_increase == pytest.approx(want["ppl"] - want["ref_ppl"], rel=1e-9)
    assert 0.0 < got.top1 < 1.0 and got.kl_mean > 0  # the noise is big enough to be seen


def test_kl_of_one_token_by_hand():
    """Two-token vocabulary: KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))."""
    ref = np.array([[0.0, 0.0], [0.0, 0.0]], np.float32)  # p = 0.5
    var = np.array([[math.log(3.0), 0.0], [0.0, 0.0]], np.float32)  # q = 0.75; last row predicts nothing
    s = window_stats(ref, var, np.array([0, 1]))
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert s.kl[0] == pytest.approx(want, rel=1e-6)
    assert s.ref_nll[0] == pytest.approx(math.log(2.0), rel=1e-6)  # target 1 under p = 0.5
    assert s.var_nll[0] == pytest.approx(-math.log(0.25), rel=1e-6)
    assert s.max_abs_dlogit == pytest.approx(math.log(3.0), rel=1e-6)
    assert s.kl.shape == (1,)


def test_top1_disagreement_is_counted():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0, 0, 0]], np.float32)
    var = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [9, 9, 9]], np.float32)
    s = window_stats(ref, var, np.array([0, 1, 2, 0]))
    assert s.agree.tolist() == [True, False, True]


def test_identical_logits_give_zero_drift():
    ids, ref, _ = _known_windows(n=1)[0]
    acc = DriftAccumulator()
    acc.add(window_stats(ref, ref.copy(), ids))
    m = acc.result()
    assert m.kl_mean == pytest.approx(0.0, abs=1e-12) and m.kl_p99 == pytest.approx(0.0, abs=1e-12)
    assert m.top1 == 1.0 and m.max_abs_dlogit == 0.0 and m.ppl == m.ref_ppl and m.ppl_increase_pct == 0.0


def test_large_logits_stay_finite():
    """fp16-range logits (|x| ~ 1e3) must not overflow the softmax."""
    ids, ref, var = _known_windows(n=1)[0]
    acc = DriftAccumulator()
    acc.add(window_stats(ref * 300, var * 300, ids))
    m = acc.result()
    assert all(math.isfinite(v) for v in (m.kl_mean, m.kl_p99, m.max_abs_dlogit))
    assert m.ppl > 1e100  # wrong, confident predictions: huge perplexity, but no OverflowError


def test_hopeless_variant_has_infinite_perplexity_and_fails():
    ids, ref, var = _known_windows(n=1)[0]
    acc = DriftAccumulator()
    acc.add(window_stats(ref, -var * 1e4, ids))
    m = acc.result()
    assert m.ppl == math.inf and math.isfinite(m.ref_ppl)
    assert "ppl_increase_pct" in {f.metric for f in check(m, TARGETS["int4-cpu"].limits)}


def _metrics(**kw) -> DriftMetrics:
    base = dict(ppl=10.0, ref_ppl=10.0, ppl_increase=0.0, ppl_increase_pct=0.0, kl_mean=0.0, kl_p99=0.0,
                top1=1.0, max_abs_dlogit=0.0, tokens=100)
    return DriftMetrics(**{**base, **kw})


def test_check_names_each_broken_limit_and_by_how_much():
    limits = DriftLimits(max_ppl_increase_pct=2.0, max_kl=0.01, min_top1=0.9)
    assert check(_metrics(ppl_increase_pct=1.9, kl_mean=0.009, top1=0.91), limits) == []
    fails = {f.metric: f for f in check(_metrics(ppl_increase_pct=5.0, kl_mean=0.03, top1=0.8), limits)}
    assert set(fails) == {"ppl_increase_pct", "kl_mean", "top1"}
    assert fails["ppl_increase_pct"].excess == pytest.approx(3.0)
    assert fails["kl_mean"].excess == pytest.approx(0.02)
    assert fails["top1"].excess == pytest.approx(0.1)
    assert "kl_mean" in fails["kl_mean"].describe() and "0.03" in fails["kl_mean"].describe()


def test_nan_metrics_fail():
    limits = DriftLimits(max_ppl_increase_pct=2.0, max_kl=0.01, min_top1=0.9)
    nan = float("nan")
    assert {f.metric for f in check(_metrics(ppl_increase_pct=nan, kl_mean=nan, top1=nan), limits)} == {
        "ppl_increase_pct", "kl_mean", "top1"}


def test_limits_come_from_the_registry_and_cli_overrides_win():
    target = TARGETS["int4-cpu"]
    assert resolve_limits(target, LimitOverrides()).limits == target.limits
    assert resolve_limits(target, LimitOverrides()).source == "registry"
    got = resolve_limits(target, LimitOverrides(max_kl=0.5))
    assert got.source == "cli" and got.limits.max_kl == 0.5
    assert got.limits.min_top1 == target.limits.min_top1


def _spec(**kw) -> ModelSpec:
    base = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2, vocab_size=100,
                max_position_embeddings=4096, original_max_position_embeddings=4096)
    return ModelSpec(**{**base, **kw})


def test_windows_are_whole_and_capped():
    plan = plan_windows(1000, _spec(), window=128, max_tokens=600, positions="start")
    assert (plan.length, plan.count) == (128, 4)
    tokens = np.arange(1000)
    ws = list(plan.windows(tokens))
    assert [w[0] for w in ws] == [0, 128, 256, 384] and all(len(w) == 128 for w in ws)
    assert plan_windows(300, _spec(), 128, 10_000, "start").count == 2


def test_long_windows_cross_the_original_context():
    rope = LongRope(short_factor=(1.0,) * 8, long_factor=(2.0,) * 8, attention_factor=1.1)
    spec = _spec(max_position_embeddings=512, original_max_position_embeddings=64, longrope=rope)
    plan = plan_windows(1000, spec, window=32, max_tokens=300, positions="long")
    assert (plan.length, plan.count) == (128, 2)


@pytest.mark.parametrize("kw, msg", [
    (dict(n=1000, spec=_spec(), window=128, max_tokens=64, positions="start"), "max-tokens"),
    (dict(n=100, spec=_spec(), window=128, max_tokens=1024, positions="start"), "fewer than one window"),
    (dict(n=1000, spec=_spec(), window=64, max_tokens=1024, positions="long"), "LongRoPE"),
    (dict(n=10_000, spec=_spec(), window=8192, max_tokens=10_000, positions="start"), "context"),
])
def test_bad_window_requests_are_bad_input(kw, msg):
    from phi3_onnx.errors import Phi3OnnxError

    with pytest.raises(Phi3OnnxError, match=msg) as info:
        plan_windows(kw["n"], kw["spec"], kw["window"], kw["max_tokens"], kw["positions"])
    assert info.value.exit_code == 2
