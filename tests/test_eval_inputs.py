"""`phi3-onnx eval` bad limits (exit 2), a package given as its own reference (warning), `--json -` (stdout)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi3_onnx.cli import main
from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.evaluate import LimitOverrides

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
FAST = ["--data", str(HELDOUT), "--max-tokens", "128", "--window", "128"]


@pytest.fixture(scope="module")
def fp32(exported) -> Path:
    return exported("fp32-cpu")


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from phi3_onnx.cli import run; run()", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag,value,message", [
    ("--max-kl", "-1", "--max-kl must be a finite number >= 0, got -1.0"),
    ("--max-kl", "inf", "--max-kl must be a finite number >= 0, got inf"),
    ("--max-ppl-increase", "nan", "--max-ppl-increase must be a finite number >= 0, got nan"),
    ("--max-ppl-increase", "-0.5", "--max-ppl-increase must be a finite number >= 0, got -0.5"),
    ("--min-top1", "2", "--min-top1 is a fraction in 0..1, got 2.0"),
    ("--min-top1", "nan", "--min-top1 must be a finite number >= 0, got nan"),
])
def test_bad_limits_exit_2_before_any_work(capsys, fp32, tmp_path, flag, value, message):
    out = tmp_path / "r.json"
    assert main(["eval", str(fp32), "--reference", str(fp32), *FAST, flag, value, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" and not out.exists()


def test_limits_checked_in_the_library_too():
    with pytest.raises(Phi3OnnxError, match="--max-kl"):
        LimitOverrides(max_kl=float("nan"))
    assert LimitOverrides(0.0, 0.0, 1.0).min_top1 == 1.0


def test_json_to_stdout_and_self_reference_warning_subprocess(fp32, tmp_path):
    """`--json -`: stdout is the JSON alone (it used to write a file named '-'); same package warns."""
    proc = subprocess.run([sys.executable, "-c", "from phi3_onnx.cli import run; run()", "eval", str(fp32),
                           "--reference", str(fp32), *FAST, "--json", "-"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["schema_version"] == 1 and "warnings" not in report
    assert not (tmp_path / "-").exists()
    assert "warning: variant" in proc.stderr and "is the reference package itself (same folder)" in proc.stderr
    assert "Accuracy drift: PASS" in proc.stderr  # the text report moved to stderr


def test_markdown_to_stdout_and_copy_with_same_sha256s_warns(capsys, fp32, tmp_path):
    copy = Path(shutil.copytree(fp32, tmp_path / "copy"))
    assert main(["eval", str(copy), "--reference", str(fp32), *FAST, "--markdown", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("### Accuracy drift: PASS") and "| variant |" in captured.out
    assert "Accuracy drift: PASS" in captured.err and "same files by sha256" in captured.err


def test_both_reports_to_stdout_is_bad_input(capsys, fp32):
    assert main(["eval", str(fp32), "--reference", str(fp32), *FAST, "--json", "-", "--markdown", "-"]) == 2
    assert "cannot both write to stdout" in capsys.readouterr().err


def test_different_reference_does_not_warn(capsys, fp32, exported):
    assert main(["eval", str(exported("int4-cpu")), "--reference", str(fp32), *FAST, "--max-kl", "1"]) in (0, 1)
    assert "reference package itself" not in capsys.readouterr().err
