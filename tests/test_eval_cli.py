"""`phi3-onnx eval` end to end on the tiny trained checkpoint: pass, fail (exit 1), skip, bad input (exit 2).

Reference numbers are computed here directly (onnxruntime / transformers + torch), never taken
from the eval's own output. Windows are few and short (2 x 128 tokens) to keep this file fast.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from phi3_onnx.cli import main
from phi3_onnx.manifest import bundle_document, read_manifest

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
FAST = ["--data", str(HELDOUT), "--max-tokens", "256", "--window", "128"]


@pytest.fixture(scope="module")
def fp32(exported) -> Path:
    return exported("fp32-cpu")


@pytest.fixture(scope="module")
def int4(exported) -> Path:
    return exported("int4-cpu")


def run_eval(tmp_path: Path, pkg: Path, ref: Path | str, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = main(["eval", str(pkg), "--reference", str(ref), *FAST, "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def copy_package(src: Path, dst: Path, **target_changes) -> Path:
    """A copy of a package, its manifest's target edited (e.g. provider='cuda')."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    doc["target"].update(target_changes)
    (dst / "manifest.json").write_text(json.dumps(doc))
    return dst


def perturb_scales(pkg: Path, layers: str, seed: int = 0, noise: float | None = None) -> None:
    """Edit int4 block scales of the named layers in model.onnx.data in place.

    noise=None flips the sign of random scales (a broken variant); a float multiplies every
    scale by N(1, noise) (a variant that drifted, e.g. from a bad quantizer change).
    """
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    data = np.memmap(pkg / "model.onnx.data", dtype=np.uint8, mode="r+")
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        if t.name.endswith("_scales") and layers in t.name:
            ext = {e.key: e.value for e in t.external_data}
            scales = data[int(ext["offset"]) : int(ext["offset"]) + int(ext["length"])].view(np.float32)
            if noise is None:
                scales *= rng.choice(np.array([-1.0, 1.0], np.float32), scales.shape)
            else:
                scales *= rng.normal(1.0, noise, scales.shape).astype(np.float32)
    data.flush()


def direct_perplexity(pkg: Path, ids: np.ndarray) -> float:
    """Perplexity of one window straight from onnxruntime + torch cross_entropy."""
    manifest = json.loads((pkg / "manifest.json").read_text())["model"]
    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    head_dim = manifest["hidden_size"] // manifest["num_heads"]
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, ids.size), np.int64)}
    for i in range(manifest["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, manifest["num_kv_heads"], 0, head_dim), np.float32)
    logits = torch.tensor(sess.run(["logits"], feeds)[0][0, :-1], dtype=torch.float64)
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


def test_int4_against_fp32_package_passes_with_independent_ppl(tmp_path, int4, fp32, capsys):
    rc, report = run_eval(tmp_path, int4, fp32, "--max-tokens", "128")
    assert rc == 0, capsys.readouterr().err
    (row,) = report["variants"]
    assert report["passed"] and row["status"] == "pass" and row["ep"] == "CPUExecutionProvider"
    from tokenizers import Tokenizer

    ids = np.array(Tokenizer.from_file(str(fp32 / "tokenizer.json")).encode(HELDOUT.read_text()).ids[:128])
    m = row["metrics"]
    assert m["tokens"] == 127
    assert m["ref_ppl"] == pytest.approx(direct_perplexity(fp32, ids), rel=1e-5)
    assert m["ppl"] == pytest.approx(direct_perplexity(int4, ids), rel=1e-4)
    assert 0 < m["kl_mean"] < 0.05 and m["top1"] > 0.9


def test_fp32_package_matches_the_pytorch_checkpoint(tmp_path, fp32, tiny_ckpt, capsys):
    rc, report = run_eval(tmp_path, fp32, tiny_ckpt)
    assert rc == 0, capsys.readouterr().err
    (row,) = report["variants"]
    assert report["reference"] == {**report["reference"], "kind": "checkpoint", "ep": "torch-cpu"}
    m = row["metrics"]
    assert m["kl_mean"] < 1e-6 and m["kl_p99"] < 1e-5 and m["top1"] >= 0.995
    assert abs(m["ppl_increase_pct"]) < 0.01 and m["max_abs_dlogit"] < 1e-2 and m["tokens"] == 254


def test_perturbed_weights_fail_with_exit_1_naming_the_metric(tmp_path, int4, fp32, capsys):
    broken = copy_package(int4, tmp_path / "broken")
    perturb_scales(broken, "mlp.down_proj")
    rc, report = run_eval(tmp_path, broken, fp32)
    err = capsys.readouterr().err
    assert rc == 1
    (row,) = report["variants"]
    assert row["status"] == "fail" and not report["passed"]
    failed = {f["metric"] for f in row["failures"]}
    assert failed and failed <= {"ppl_increase_pct", "kl_mean", "top1"}
    assert err.startswith("error: accuracy drift check failed") and err.count("\n") == 1
    for f in row["failures"]:
        assert f["metric"] in err and f["excess"] > 0


def test_drifted_variant_fails_on_kl_and_top1(tmp_path, int4, fp32, capsys):
    """35% noise on every layer's scales: perplexity moves little, the next-token distributions do not."""
    drifted = copy_package(int4, tmp_path / "drifted")
    perturb_scales(drifted, "model.layers.", noise=0.35)
    rc, report = run_eval(tmp_path, drifted, fp32)
    assert rc == 1
    failed = {f["metric"] for f in report["variants"][0]["failures"]}
    assert {"kl_mean", "top1"} <= failed
    assert "kl_mean" in capsys.readouterr().err


def test_cli_override_can_fail_an_otherwise_passing_variant(tmp_path, int4, fp32, capsys):
    rc, report = run_eval(tmp_path, int4, fp32, "--min-top1", "1.0", "--max-tokens", "128")
    assert rc == 1
    (row,) = report["variants"]
    assert row["limits"]["source"] == "cli" and row["limits"]["min_top1"] == 1.0
    assert [f["metric"] for f in row["failures"]] == ["top1"]
    assert "top1" in capsys.readouterr().err


def test_bundle_report_has_one_row_per_variant(tmp_path, int4, fp32, capsys):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(int4, bundle / "int4-cpu")
    shutil.copytree(fp32, bundle / "fp32-cpu")
    names = ["fp32-cpu", "int4-cpu"]  # bundle.json is the truth about a bundle's variants, as for `load`
    doc = bundle_document("tiny", [(n, read_manifest(bundle / n)) for n in names])
    (bundle / "bundle.json").write_text(json.dumps(doc))
    md = tmp_path / "report.md"
    rc, report = run_eval(tmp_path, bundle, fp32, "--markdown", str(md), "--max-tokens", "128")
    assert rc == 0, capsys.readouterr().err
    assert report["bundle"] and [v["name"] for v in report["variants"]] == ["fp32-cpu", "int4-cpu"]
    assert [v["target"] for v in report["variants"]] == ["fp32-cpu", "int4-cpu"]
    fp32_row, int4_row = report["variants"]
    assert fp32_row["metrics"]["kl_mean"] == 0.0 and fp32_row["metrics"]["top1"] == 1.0  # same model as the reference
    assert int4_row["metrics"]["kl_mean"] > 0
    table_rows = [l for l in md.read_text().splitlines() if l.startswith("| ") and "PASS" in l]
    assert len(table_rows) == 2


def _bundle(folder: Path, **variants: Path) -> Path:
    folder.mkdir()
    for name, pkg in variants.items():
        shutil.copytree(pkg, folder / name)
    doc = bundle_document("tiny", [(n, read_manifest(folder / n)) for n in variants])
    (folder / "bundle.json").write_text(json.dumps(doc))
    return folder


def test_a_bundle_without_reference_uses_its_fp32_cpu_variant(tmp_path, int4, fp32, capsys):
    bundle = _bundle(tmp_path / "bundle", **{"int4-cpu": int4, "fp32-cpu": fp32})
    out = tmp_path / "default.json"
    assert main(["eval", str(bundle), *FAST, "--max-tokens", "128", "--json", str(out)]) == 0, capsys.readouterr().err
    default = json.loads(out.read_text())
    assert default["reference"]["path"] == str(bundle / "fp32-cpu")
    assert "the bundle's fp32-cpu variant" in capsys.readouterr().err
    rc, explicit = run_eval(tmp_path, bundle / "int4-cpu", fp32, "--max-tokens", "128")
    assert rc == 0
    by_name = {v["name"]: v for v in default["variants"]}
    assert by_name["int4-cpu"]["metrics"] == explicit["variants"][0]["metrics"] and by_name["int4-cpu"]["metrics"]["kl_mean"] > 0


@pytest.mark.parametrize("case", ["single package", "bundle without fp32-cpu"])
def test_without_reference_and_no_fp32_variant_is_exit_2(tmp_path, int4, case, capsys):
    pkg = int4 if case == "single package" else _bundle(tmp_path / "b", **{"int4-cpu": int4, "int4-again": int4})
    rc = main(["eval", str(pkg), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --reference is needed") and err.count("\n") == 1, err
    assert ("single package" if case == "single package" else "no fp32-cpu variant") in err


def test_absent_ep_runs_on_cpu_and_the_report_says_so(tmp_path, int4, fp32, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to observe")
    variant = copy_package(int4, tmp_path / "as-cuda", provider="cuda")
    rc, report = run_eval(tmp_path, variant, fp32, "--max-tokens", "128")
    assert rc == 0, capsys.readouterr().err
    (row,) = report["variants"]
    assert row["ep_requested"] == "CUDAExecutionProvider" and row["ep"] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider is not available" in row["ep_note"] and row["status"] == "pass"


def _unrunnable(int4: Path, dst: Path) -> Path:
    """A 'CUDA' variant whose graph has an op no CPU kernel implements."""
    variant = copy_package(int4, dst, provider="cuda")
    model = onnx.load(str(variant / "model.onnx"), load_external_data=False)
    next(n for n in model.graph.node if n.op_type == "GroupQueryAttention").op_type = "NoSuchCudaOnlyOp"
    onnx.save(model, str(variant / "model.onnx"))
    return variant


def test_variant_that_cannot_run_is_skipped_with_reason_never_passed(tmp_path, int4, fp32, capsys):
    variant = _unrunnable(int4, tmp_path / "cuda-only")
    rc, report = run_eval(tmp_path, variant, fp32, "--max-tokens", "128")
    assert rc == 0, capsys.readouterr().err
    (row,) = report["variants"]
    assert row["status"] == "skipped" and row["metrics"] is None
    assert "NoSuchCudaOnlyOp" in row["reason"] and "CPUExecutionProvider" in row["reason"]
    rc, report = run_eval(tmp_path, variant, fp32, "--max-tokens", "128", "--require-all")
    assert rc == 1 and not report["passed"]
    assert "skipped" in capsys.readouterr().err


def test_cpu_variant_that_cannot_run_is_an_error(tmp_path, int4, fp32, capsys):
    variant = _unrunnable(int4, tmp_path / "cpu-broken")
    doc = json.loads((variant / "manifest.json").read_text())
    doc["target"]["provider"] = "cpu"
    (variant / "manifest.json").write_text(json.dumps(doc))
    rc, report = run_eval(tmp_path, variant, fp32, "--max-tokens", "128")
    assert rc == 1 and report["variants"][0]["status"] == "error"


def test_checkpoint_reference_without_torch_is_a_one_line_error(tmp_path, fp32, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rc = main(["eval", str(fp32), "--reference", str(tiny_ckpt), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "pip install 'phi3-onnx[torch]'" in err


@pytest.mark.parametrize("args, msg", [
    (["--data", "no-such-file.txt"], "cannot read --data"),
    (["--max-tokens", "64"], "smaller than one window"),
    (["--positions", "long"], "LongRoPE"),
    (["--min-top1", "99"], "--min-top1"),
])
def test_bad_input_exits_2(int4, fp32, capsys, args, msg):
    rc = main(["eval", str(int4), "--reference", str(fp32), *FAST, *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_missing_package_or_reference_exits_2(tmp_path, int4, fp32, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--reference", str(fp32), *FAST]) == 2
    assert main(["eval", str(int4), "--reference", str(tmp_path), *FAST]) == 2
    assert "neither a package" in capsys.readouterr().err


def test_package_reference_needs_no_torch_and_no_exporter(int4, fp32):
    """CI checks packages with only the runtime installed: the eval imports no torch, transformers or exporter."""
    code = (
        "import sys; from pathlib import Path\n"
        "from phi3_onnx.evaluate import EvalOptions, evaluate\n"
        f"r = evaluate(Path({str(int4)!r}), {str(fp32)!r}, EvalOptions(Path({str(HELDOUT)!r}), max_tokens=128))\n"
        "assert r.passed, r.summary()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
        "             or m.startswith(('phi3_onnx.checkpoint', 'phi3_onnx.graph', 'phi3_onnx.quantize', 'phi3_onnx.package')))\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
