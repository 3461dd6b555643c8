"""`phi3-onnx bench` on the tiny checkpoint: the JSON fields, numbers that add up, bundles, exit codes."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest

from phi3_onnx.bench import SCHEMA_VERSION, BenchOptions, bench, parse_lengths
from phi3_onnx.bench.report import to_markdown
from phi3_onnx.bench.worker import prompt_ids
from phi3_onnx.cli import main
from phi3_onnx.errors import Phi3OnnxError

ROW_FIELDS = {"variant", "target", "status", "ep", "threads", "prompt_tokens", "new_tokens", "decode_tokens", "repeats",
              "decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms", "decode_ms_per_token",
              "decode_s", "total_s", "peak_rss_bytes", "load_s", "model_bytes", "runs"}
OPTIONS = BenchOptions(prompt_tokens=(8, 40), new_tokens=12, repeats=2)


@pytest.fixture(scope="module")
def doc(exported):
    return bench(exported("int4-cpu"), OPTIONS)


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-bundle") / "tiny-bundle"
    assert main(["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-t", "fp32-cpu", "-o", str(out), "-q"]) == 0
    return out


def test_document_fields(doc, exported):
    assert doc["schema_version"] == SCHEMA_VERSION and doc["bundle"] is False
    assert {"cpu", "physical_cores", "logical_cpus", "ram_bytes", "platform"} <= set(doc["machine"])
    assert {"onnxruntime", "onnxruntime-genai", "phi3-onnx", "python"} <= set(doc["versions"])
    assert doc["settings"]["prompt_tokens"] == [8, 40] and doc["settings"]["repeats"] == 2
    assert [r["prompt_tokens"] for r in doc["rows"]] == [8, 40]
    pkg = exported("int4-cpu")
    for row in doc["rows"]:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert "peak_gpu_bytes" not in row  # CUDA rows only
        assert row["status"] == "ok" and row["ep"] == "cpu" and row["target"] == "int4-cpu"
        assert row["repeats"] == len(row["runs"]) == 2 and row["decode_tokens"] == 11
        assert row["threads"] >= 1 and row["load_s"] > 0 and row["peak_rss_bytes"] > 50 * 2**20
        assert row["model_bytes"] == sum((pkg / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
        assert min(row["decode_tokens_per_s"], row["prefill_tokens_per_s"]) > 0


def test_numbers_add_up(doc):
    """Per run: TTFT + decode time = total, decode rate x decode time = decode tokens; prefill is inside TTFT."""
    for row in doc["rows"]:
        for run in [*row["runs"], row]:  # a row is the median of 2 runs, i.e. their mean: the same identities hold
            ttft_s = run["time_to_first_token_ms"] / 1000
            assert ttft_s + run["decode_s"] == pytest.approx(run["total_s"], rel=1e-6)
            assert run["decode_ms_per_token"] * row["decode_tokens"] / 1000 == pytest.approx(run["decode_s"], rel=1e-6)
        for run in row["runs"]:
            assert run["decode_tokens_per_s"] * run["decode_s"] == pytest.approx(row["decode_tokens"], rel=1e-6)
            assert row["prompt_tokens"] / run["prefill_tokens_per_s"] <= run["time_to_first_token_ms"] / 1000


def test_runs_are_not_cut_short_by_end_tokens(exported):
    """min_length = max_length: every run generates exactly new_tokens, even when the model would stop."""
    from phi3_onnx.bench.worker import time_run
    from phi3_onnx.runtime import load

    model = load(exported("int4-cpu"), max_length=64)
    end = model.encode("<|end|>")
    run = time_run(model, model.prompt_ids([{"role": "user", "content": "Say hi."}]) + end, 20)
    assert run.new_tokens == 20 and run.decode_s > 0


def test_prompt_ids_avoid_special_tokens():
    ids = prompt_ids(2064, 500, 0)
    assert len(ids) == 500 and min(ids) >= 100 and max(ids) < 2048 - 100
    assert prompt_ids(32064, 50, 1) == prompt_ids(32064, 50, 1) and max(prompt_ids(32064, 500, 0)) < 30000


def test_bundle_gives_one_row_per_variant_and_length(bundle, capsys, tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", str(bundle), "--prompt-tokens", "8,24", "--new-tokens", "6", "--repeats", "1", "--json", str(out), "-q"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["bundle"] is True
    assert [(r["variant"], r["prompt_tokens"]) for r in doc["rows"]] == [
        ("int4-cpu", 8), ("int4-cpu", 24), ("fp32-cpu", 8), ("fp32-cpu", 24)]
    assert doc["rows"][2]["model_bytes"] > 3 * doc["rows"][0]["model_bytes"]  # fp32 vs int4 weights
    assert "int4-cpu" in table and "fp32-cpu" in table and "decode tok/s" in table
    md = to_markdown(doc)
    assert md.count("\n") == 2 + 4 and "| fp32-cpu | cpu |" in md

    assert main(["bench", str(bundle), "--variant", "fp32-cpu", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--json", "-", "-q"]) == 0
    captured = capsys.readouterr()
    only = json.loads(captured.out)  # stdout is the JSON alone; the table goes to stderr
    assert [r["variant"] for r in only["rows"]] == ["fp32-cpu"] and "fp32-cpu" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--prompt-tokens", "abc"], "comma-separated whole numbers"),
    (["--prompt-tokens", "0,16"], "prompt tokens must be positive"),
    (["--prompt-tokens", "16,16"], "repeated"),
    (["--prompt-tokens", "5000"], "over int4-cpu's context 4096"),
    (["--new-tokens", "1"], "new tokens must be >= 2"),
    (["--repeats", "0"], "repeats must be >= 1"),
    (["--threads", "-1"], "threads must be"),
    (["--device", "tpu"], "unknown device"),
    (["--variant", "fp32-cpu"], "not a bundle"),
])
def test_bad_input_exits_2(exported, capsys, args, message):
    assert main(["bench", str(exported("int4-cpu")), *args, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_package_and_unknown_variant_exit_2(bundle, tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(bundle), "--variant", "int8-npu", "-q"]) == 2
    assert "no variant 'int8-npu'" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error_before_any_timing(exported, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["bench", str(exported("int4-cpu")), "--plot", str(tmp_path / "p.png"), "-q"]) == 2
    assert "pip install 'phi3-onnx[bench]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot(exported, tmp_path, doc):
    pytest.importorskip("matplotlib")
    from phi3_onnx.bench.report import plot

    plot(doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_variant_that_fails_to_load_is_an_error_row_exit_1(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exported("int4-cpu"), broken)
    size = (broken / "model.onnx").stat().st_size
    (broken / "model.onnx").write_bytes(b"\0" * size)  # same size: only a load can tell
    out = tmp_path / "b.json"
    argv = ["bench", str(broken), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "2", "--json", str(out), "-q"]
    assert main(argv) == 1
    assert "variant int4-cpu failed" in capsys.readouterr().err
    row = json.loads(out.read_text())["rows"][0]
    assert row["status"] == "error" and "could not load" in row["error"] and row["runs"] == []


def test_parse_lengths():
    assert parse_lengths("16, 512") == (16, 512)
    with pytest.raises(Phi3OnnxError):
        parse_lengths(",")
