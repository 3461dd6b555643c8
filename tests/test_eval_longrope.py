"""`eval --positions long` on the LongRoPE tiny checkpoint (original context 64): windows of 128
tokens cross the original context, which is where a wrong long factor shows and short windows miss it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import make_variant
from phi3_onnx.cli import main

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"


def run_eval(tmp_path: Path, pkg: Path, ref: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = main(["eval", str(pkg), "--reference", str(ref), "--data", str(HELDOUT), "--max-tokens", "256",
               "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def good(exported, tiny_longrope_ckpt) -> Path:
    return exported("fp32-cpu", tiny_longrope_ckpt)


@pytest.fixture(scope="module")
def wrong_long_factor(exported, tiny_longrope_ckpt, tmp_path_factory) -> Path:
    """The same weights exported with every long factor doubled (a broken rope config)."""
    cfg = json.loads((tiny_longrope_ckpt / "config.json").read_text())
    rope = dict(cfg["rope_scaling"], long_factor=[2.0 * f for f in cfg["rope_scaling"]["long_factor"]])
    ckpt = make_variant(tiny_longrope_ckpt, tmp_path_factory.mktemp("ckpt") / "tiny-longrope-wrong", rope_scaling=rope)
    return exported("fp32-cpu", ckpt)


def test_long_windows_of_a_correct_export_match_the_checkpoint(tmp_path, good, tiny_longrope_ckpt, capsys):
    rc, report = run_eval(tmp_path, good, tiny_longrope_ckpt, "--positions", "long")
    assert rc == 0, capsys.readouterr().err
    assert report["data"]["positions"] == "long" and report["data"]["window"] == 128 and report["data"]["windows"] == 2
    m = report["variants"][0]["metrics"]
    assert m["kl_mean"] < 1e-6 and m["top1"] >= 0.995 and m["tokens"] == 254


def test_wrong_long_factor_fails_long_windows_but_not_short_ones(tmp_path, good, wrong_long_factor, capsys):
    rc, report = run_eval(tmp_path, wrong_long_factor, good, "--positions", "long")
    err = capsys.readouterr().err
    assert rc == 1, err
    failed = {f["metric"] for f in report["variants"][0]["failures"]}
    assert "kl_mean" in failed and "kl_mean" in err
    # Windows inside the original context (64) use only the short factors: the bug is invisible there.
    rc, report = run_eval(tmp_path, wrong_long_factor, good, "--window", "64")
    assert rc == 0, capsys.readouterr().err
    assert report["variants"][0]["metrics"]["kl_mean"] < 1e-9


def test_int4_export_passes_its_limits_on_long_windows(tmp_path, exported, tiny_longrope_ckpt, good, capsys):
    rc, report = run_eval(tmp_path, exported("int4-cpu", tiny_longrope_ckpt), good, "--positions", "long")
    assert rc == 0, capsys.readouterr().err
    assert report["variants"][0]["metrics"]["kl_mean"] > 0  # really a different (quantized) model


def test_bundle_of_different_models_is_bad_input(tmp_path, exported, good, capsys):
    bundle = tmp_path / "mixed"
    shutil.copytree(good, bundle / "longrope")
    shutil.copytree(exported("fp32-cpu"), bundle / "plain")
    rc = main(["eval", str(bundle), "--reference", str(good), "--data", str(HELDOUT), "--max-tokens", "128"])
    err = capsys.readouterr().err
    assert rc == 2 and "different models" in err
