"""The drift check on the tiny trained checkpoint for every registered target whose ops run on CPU.

A correct export must pass its target's default limits (from the registry) with margin; targets
built for an EP this machine lacks run on the CPU EP, and are skipped only with the eval's reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from phi3_onnx.cli import main
from phi3_onnx.evaluate.sources import EP_NAMES
from phi3_onnx.targets import TARGETS

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
MARGIN = 0.5  # a correct export uses at most half of each limit's headroom


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_correct_export_passes_its_default_limits(name, exported, tmp_path, capsys):
    variant, reference = exported(name), exported("fp32-cpu")
    out = tmp_path / "report.json"
    rc = main(["eval", str(variant), "--reference", str(reference), "--data", str(HELDOUT),
               "--max-tokens", "384", "--json", str(out)])
    err = capsys.readouterr().err
    (row,) = json.loads(out.read_text())["variants"]
    if row["status"] == "skipped":
        pytest.skip(f"{name}: {row['reason']}")
    assert rc == 0 and row["status"] == "pass", err
    fallback = EP_NAMES[TARGETS[name].provider] not in ort.get_available_providers()
    assert (row["ep_note"] is not None) == fallback
    m, lim = row["metrics"], TARGETS[name].limits
    assert m["ppl_increase_pct"] <= MARGIN * lim.max_ppl_increase_pct
    assert m["kl_mean"] <= MARGIN * lim.max_kl
    assert 1 - m["top1"] <= MARGIN * (1 - lim.min_top1)
