"""Bad input: one line on stderr, exit code 2, no traceback, nothing half-written left behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from phi3_onnx.cli import main


def _copy(tiny_ckpt: Path, dst: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, dst))


def _first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("model-*.safetensors"))[0]


def _missing_config(c: Path) -> None:
    (c / "config.json").unlink()


def _corrupt_config(c: Path) -> None:
    (c / "config.json").write_text('{"hidden_size": 256,')


def _missing_shard(c: Path) -> None:
    _first_shard(c).unlink()


def _truncated_shard(c: Path) -> None:
    shard = _first_shard(c)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _llama_config(c: Path) -> None:
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps(cfg | {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))


def _wrong_shape(c: Path) -> None:
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps(cfg | {"intermediate_size": cfg["intermediate_size"] * 2}))


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing config.json": (_missing_config, "no config.json"),
    "corrupt config.json": (_corrupt_config, "not valid JSON"),
    "missing shard": (_missing_shard, "shard missing"),
    "truncated safetensors": (_truncated_shard, "truncated"),
    "non-Phi-3 architecture": (_llama_config, "unsupported architecture LlamaForCausalLM"),
    "weights do not match config": (_wrong_shape, "has shape"),
}


def _run(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_broken_checkpoints(case: str, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    breakage, needle = BREAKAGES[case]
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    breakage(ckpt)
    out = tmp_path / "out"
    code, err = _run(capsys, ["export", "--model", str(ckpt), "--target", "int4-cpu", "--output", str(out)])
    _assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "nothing may be left behind"


def test_missing_model_folder(tmp_path: Path, capsys) -> None:
    code, err = _run(capsys, ["export", "-m", str(tmp_path / "nope"), "-t", "int4-cpu", "-o", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "model folder not found")


def test_unknown_target(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int3-cpu", "-o", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "unknown target 'int3-cpu'")
    assert not (tmp_path / "o").exists()


def test_comma_separated_targets_say_how_to_ask_for_a_bundle(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu,fp32-cpu", "-o", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "repeat -t, e.g. -t int4-cpu -t fp32-cpu")
    assert not (tmp_path / "o").exists()


def test_bad_block_size(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(tmp_path / "o"), "--block-size", "48"])
    _assert_one_line_error(code, err, "power of two")


@pytest.mark.parametrize("args, message", [
    (["--context-length", "5000"], "--context-length: context length must be in 1..4096"),
    (["--context-length", "64", "--max-length", "65"], "--max-length must be in 1..64"),
])
def test_bad_context_length(tiny_ckpt: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    code, err = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(tmp_path / "o"), *args])
    _assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(out)])
    _assert_one_line_error(code, err, "--force")
    assert (out / "keep.txt").read_text() == "user data"
    # --force replaces only a phi3-onnx package/bundle or an empty folder: a user's folder is kept
    code, err = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(out), "--force", "-q"])
    _assert_one_line_error(code, err, "--force replaces only a phi3-onnx package or bundle or an empty folder")
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    code, _ = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(out), "--force", "-q"])
    assert code == 0 and (out / "manifest.json").is_file()
    code, _ = _run(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(out), "--force", "-q"])
    assert code == 0 and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_hub_id_offline_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = _run(capsys, ["export", "-m", "microsoft/Phi-3-mini-4k-instruct", "-t", "int4-cpu", "-o", str(tmp_path / "o")])
    _assert_one_line_error(code, err, "microsoft/Phi-3-mini-4k-instruct")


def test_missing_option_is_usage_error(capsys) -> None:
    code, err = _run(capsys, ["export", "--model", "x"])
    assert code == 2 and "\n" not in err and "Missing option" in err
