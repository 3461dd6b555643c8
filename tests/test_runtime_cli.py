"""generate / chat / info verbs through phi3_onnx.cli.main: output, one-line errors, exit codes."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys

import pytest

from phi3_onnx.cli import main
from phi3_onnx.runtime import load

PROSE = "The committee reviewed the proposal and"


@pytest.fixture
def copy_pkg(pkg, tmp_path):
    def make(edit_manifest=None):
        dst = tmp_path / "pkg"
        shutil.copytree(pkg, dst)
        if edit_manifest:
            path = dst / "manifest.json"
            doc = json.loads(path.read_text())
            edit_manifest(doc)
            path.write_text(json.dumps(doc))
        return dst
    return make


def one_line_error(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_generate_streams_the_completion(capsys, pkg, model):
    assert main(["generate", str(pkg), "--prompt", PROSE, "--raw", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == model.generate(PROSE, max_new_tokens=20) + "\n"
    question = "What does a compiler do?"
    assert main(["generate", str(pkg), "-p", question, "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == model.generate([{"role": "user", "content": question}], max_new_tokens=30) + "\n"


def test_chat_is_multi_turn_and_exits_on_eof_or_exit(capsys, monkeypatch, pkg, model):
    session = model.chat()
    replies = [session.send("What does a compiler do?", max_new_tokens=30), session.send("Why?", max_new_tokens=30)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What does a compiler do?\n\nWhy?\n/exit\nnot read\n"))
    assert main(["chat", str(pkg), "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == "".join(r + "\n" for r in replies)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What does a compiler do?\n"))  # EOF ends it
    assert main(["chat", str(pkg), "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == replies[0] + "\n"


def test_info_prints_manifest_and_provider(capsys, pkg):
    assert main(["info", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert "target:     int4-cpu" in out and "provider:   cpu — " in out and "CPUExecutionProvider" in out
    assert main(["info", str(pkg), "--verify"]) == 0
    assert "sha256 checked" in capsys.readouterr().out


def test_gpu_target_package_on_this_cpu_machine(capsys, copy_pkg, caplog):
    """A package whose manifest says CUDA: `info` explains the CPU fallback, load warns in one line."""
    fake = copy_pkg(lambda doc: doc["target"].update(name="fp16-cuda", provider="cuda"))
    assert main(["info", str(fake)]) == 0
    out = capsys.readouterr().out
    assert "provider:   cpu" in out and "warning:    fp16-cuda is built for CUDA but running on the CPU EP" in out
    with caplog.at_level(logging.WARNING, logger="phi3_onnx"):
        model = load(fake)
    capsys.readouterr()
    assert model.provider == "cpu" and len(caplog.records) == 1 and "CPU" in caplog.records[0].getMessage()
    err = one_line_error(capsys, ["info", fake, "--device", "dml"])
    assert "phi3-onnx[directml]" in err


def test_missing_package(capsys, tmp_path):
    assert "does not exist" in one_line_error(capsys, ["generate", tmp_path / "nope", "-p", "hi"])
    assert "not a phi3-onnx package" in one_line_error(capsys, ["info", tmp_path])


def test_corrupted_manifest(capsys, copy_pkg):
    dst = copy_pkg()
    (dst / "manifest.json").write_text("{ not json")
    assert "corrupt" in one_line_error(capsys, ["generate", dst, "-p", "hi"])


def test_checksum_mismatch(capsys, copy_pkg):
    dst = copy_pkg()
    data = bytearray((dst / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only --verify can tell
    (dst / "model.onnx.data").write_bytes(bytes(data))
    assert main(["info", str(dst)]) == 0
    capsys.readouterr()
    assert "sha256" in one_line_error(capsys, ["generate", dst, "-p", "hi", "--verify"])
    (dst / "model.onnx.data").write_bytes(bytes(data[:-10]))  # truncated: every load notices
    assert "bytes but manifest.json says" in one_line_error(capsys, ["generate", dst, "-p", "hi"])


def test_runtime_too_old(capsys, copy_pkg):
    dst = copy_pkg(lambda doc: doc["requires"].update({"onnxruntime-genai": "99.0.0"}))
    err = one_line_error(capsys, ["generate", dst, "-p", "hi"])
    assert "needs onnxruntime-genai>=99.0.0 but" in err


def test_bad_arguments(capsys, pkg, model):
    assert "unknown device 'tpu'" in one_line_error(capsys, ["generate", pkg, "-p", "hi", "--device", "tpu"])
    assert "temperature must be >= 0" in one_line_error(capsys, ["generate", pkg, "-p", "hi", "--temperature", "-1"])
    assert "device cuda requested" in one_line_error(capsys, ["generate", pkg, "-p", "hi", "--device", "cuda"])
    long = "word " * (model.context_length + 10)
    assert "context is" in one_line_error(capsys, ["generate", pkg, "--raw", "-p", long])
    assert "max_length" in one_line_error(capsys, ["generate", pkg, "-p", PROSE * 3, "--max-length", "8"])
    assert "not a bundle" in one_line_error(capsys, ["info", pkg, "--variant", "fp32-cpu"])


def test_runtime_imports_no_exporter_or_quantizer(pkg):
    """The runtime must work with just onnxruntime + onnxruntime-genai (+ numpy) installed: block the
    rest of phi3-onnx's dependencies, load and generate, then check what got imported."""
    code = (
        "import sys, importlib.abc\n"
        "BLOCK = ('onnx', 'onnx_ir', 'ml_dtypes', 'torch', 'transformers', 'safetensors', 'tokenizers',"
        " 'typer', 'rich', 'huggingface_hub')\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCK: raise ModuleNotFoundError(f'blocked {name}', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "from phi3_onnx.runtime import load\n"
        "m = load(sys.argv[1], verify=True); assert m.generate('Hi', max_new_tokens=3) is not None\n"
        "print(sorted(k for k in sys.modules if k.startswith(('phi3_onnx.checkpoint', 'phi3_onnx.graph', 'phi3_onnx.quantize', 'phi3_onnx.package'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_missing_runtime_names_the_extra(capsys, monkeypatch, pkg):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if not installed
    err = one_line_error(capsys, ["generate", pkg, "-p", "hi"])
    assert "onnxruntime-genai is not installed" in err and "phi3-onnx[cpu]" in err and "[cuda]" in err


def test_example_app_runs(pkg):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "desktop_chat.py"
    out = subprocess.run([sys.executable, str(script), str(pkg)], input="What does a compiler do?\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("loaded int4-cpu on cpu")
    bad = subprocess.run([sys.executable, str(script), str(pkg) + "-missing"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_chat_over_max_length_keeps_session(capsys, monkeypatch, pkg):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n" + "word " * 80 + "\n/reset\nhi\n"))
    assert main(["chat", str(pkg), "--max-new-tokens", "4", "--max-length", "48"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("loaded with max_length=48") == 1 and "/reset" in captured.err
    assert captured.out.count("\n") == 2  # the two "hi" turns were answered


def test_unloadable_graph_is_a_one_line_error(capsys, copy_pkg):
    dst = copy_pkg()
    size = (dst / "model.onnx").stat().st_size
    (dst / "model.onnx").write_bytes(b"\xff" * size)  # same size: passes the cheap check, fails in genai
    assert "onnxruntime-genai could not load" in one_line_error(capsys, ["generate", dst, "-p", "hi"])
