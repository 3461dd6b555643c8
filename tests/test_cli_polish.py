"""Issue 11's new-user fixes: help, --version, completion, --json -, dry-run, progress, stop reasons,
chat commands, the tokenizer's leading-space artifact, one source of truth for runtime versions."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from phi3_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What does os.path.join do?"
VERBS = ("export", "targets", "generate", "chat", "info", "eval", "serve")


def run(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- the app: no command, --version, completion, help ----------------------------------------

def test_no_command_prints_help_and_exits_0(capsys):
    rc, out, err = run(capsys, [])
    assert rc == 0 and out.startswith("Usage: phi3-onnx [OPTIONS] COMMAND") and err == ""
    assert all(verb in out for verb in VERBS)


def test_version(capsys):
    from phi3_onnx import __version__

    assert run(capsys, ["--version"]) == (0, f"phi3-onnx {__version__}\n", "")


def test_shell_completion_is_offered(capsys):
    rc, out, _ = run(capsys, ["--help"])
    assert rc == 0 and "--install-completion" in out and "--show-completion" in out
    script = Path(sys.executable).parent / "phi3-onnx"  # the installed console script
    # typer detects the shell from the process tree (shellingham) unless told not to: under nohup or a CI
    # runner without a shell parent it finds none ("Shell  not supported."); this env var makes it take the name
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = subprocess.run([str(script), "--show-completion", "bash"], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0 and "complete" in shown.stdout and "phi3" in shown.stdout.lower()


@pytest.mark.parametrize("verb", VERBS)
def test_help_reads_like_a_normal_cli(capsys, verb):
    rc, out, _ = run(capsys, [verb, "--help"])
    assert rc == 0
    assert not re.search(r"<(bool|str|int|float|path|list\[str\])>", out), out
    assert "{" not in out.splitlines()[0], out.splitlines()[0]  # Usage: ... PKG, not {pkg}
    assert re.search(rf"Example:\n\s+phi3-onnx {verb}\b", out), out
    for flag in re.findall(r"^\s+(--[a-z-]+)(.*)$", out, re.M):
        if flag[0] in ("--force", "--raw", "--verify", "--dry-run", "--quiet", "--require-all", "--help"):
            assert not re.match(r" \S", flag[1]), f"{flag[0]} is a flag but shows a metavar"  # help is 2+ spaces on


def test_help_metavars(capsys):
    out = run(capsys, ["generate", "--help"])[1]
    assert out.startswith("Usage: phi3-onnx generate [OPTIONS] PKG\n")
    assert "-p, --prompt TEXT" in out and "--max-new-tokens INTEGER" in out and "--temperature FLOAT" in out
    assert re.search(r"--raw\s+Complete", out)
    out = run(capsys, ["export", "--help"])[1]
    assert "-o, --output PATH" in out and re.search(r"--force\s+Replace", out)
    assert "--positions [start|long]" in run(capsys, ["eval", "--help"])[1]
    assert "[serve]" in run(capsys, ["serve", "--help"])[1]  # not eaten as rich markup


# --- export: progress, dry run ---------------------------------------------------------------

def test_export_progress_reaches_its_total(tiny_ckpt, tmp_path, monkeypatch):
    """The bar counts the tensors written to model.onnx.data (it stopped at 46/48 when it counted initializers)."""
    from phi3_onnx.package import pipeline

    seen = {}

    @contextmanager
    def recorder(description, total, enabled=True):
        seen.update(total=total, done=0)

        def advance(n=1, total=None):
            seen["done"] += n
            if total is not None:
                seen["total"] = total
        yield advance

    monkeypatch.setattr(pipeline, "task", recorder)
    pipeline.export(tiny_ckpt, "int4-cpu", tmp_path / "p", progress=True)
    assert seen["done"] == seen["total"] > 0


def test_progress_total_update_on_a_tty(monkeypatch, capsys):
    from phi3_onnx import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress.task("Writing", 48) as advance:
        for _ in range(46):
            advance(1, total=46)
    assert "46/46" in capsys.readouterr().err


def dry_run(capsys, ckpt, target, out, *extra):
    return run(capsys, ["export", "-m", ckpt, "-t", target, "-o", out, "--dry-run", *extra])


def test_dry_run_units_awq_cost_and_files(capsys, tiny_ckpt, tmp_path, exported):
    rc, out, _ = dry_run(capsys, tiny_ckpt, "int4-cpu", tmp_path / "o")
    assert rc == 0 and not (tmp_path / "o").exists()
    assert "(3.4M parameters)" in out
    assert re.search(r"weights:\s+4\.\d MiB in model.onnx.data", out), out
    real = exported("int4-cpu")
    listed = re.search(r"files:\s+(.*)", out).group(1).split(", ")
    assert sorted(listed) == sorted(p.name for p in real.iterdir()), "dry run lists exactly what the export writes"
    assert {"LICENSE", "README.md"} <= set(listed)
    rtn = re.search(r"peak RAM:\s+~(.*)", out).group(1)
    awq = re.search(r"peak RAM:\s+~(.*)", dry_run(capsys, tiny_ckpt, "int4-awq-cpu", tmp_path / "o")[1]).group(1)
    assert awq != rtn and "of which AWQ calibration" in awq and "AWQ" not in rtn


def test_dry_run_refuses_an_existing_output_like_the_real_run(capsys, tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    rc, _, err = dry_run(capsys, tiny_ckpt, "int4-cpu", out)
    assert rc == 2 and err.startswith("error: ") and "--force" in err
    assert dry_run(capsys, tiny_ckpt, "int4-cpu", out, "--force")[0] == 0
    rc, _, err = dry_run(capsys, tiny_ckpt, "int4-cpu", out, "-t", "fp32-cpu")  # a bundle too
    assert rc == 2 and "--force" in err


# --- --json - ---------------------------------------------------------------------------------

def test_targets_json(capsys, tmp_path):
    from phi3_onnx.targets import TARGETS

    rc, out, _ = run(capsys, ["targets", "--json", "-"])
    assert rc == 0 and [t["name"] for t in json.loads(out)["targets"]] == list(TARGETS)
    rc, out, _ = run(capsys, ["targets", "--json", tmp_path / "t.json"])
    assert rc == 0 and "int4-cpu" in out and json.loads((tmp_path / "t.json").read_text())["targets"]


def test_info_json(capsys, pkg):
    rc, out, _ = run(capsys, ["info", pkg, "--json", "-"])
    doc = json.loads(out)
    assert rc == 0 and doc["target"]["name"] == "int4-cpu" and doc["provider"] == "cpu"
    assert doc["parameters"] > 3e6 and doc["requires"]["onnxruntime"]


def test_generate_json_to_stdout(capsys, pkg, model):
    rc, out, err = run(capsys, ["generate", pkg, "-p", QUESTION, "--max-new-tokens", "30", "--json", "-"])
    doc = json.loads(out)  # stdout is the JSON document only
    assert rc == 0 and doc["text"] == model.generate([{"role": "user", "content": QUESTION}], max_new_tokens=30)
    assert doc["finish_reason"] in ("stop", "length") and doc["completion_tokens"] > 0 and doc["prompt_tokens"] > 0
    assert doc["seconds"] > 0 and "stopped: " in err


def test_generate_json_to_a_file_keeps_streaming(capsys, pkg, tmp_path):
    rc, out, _ = run(capsys, ["generate", pkg, "-p", QUESTION, "--json", tmp_path / "g.json"])
    assert rc == 0 and out == json.loads((tmp_path / "g.json").read_text())["text"] + "\n"


# --- why generation stopped -------------------------------------------------------------------

def test_generate_says_why_it_stopped(capsys, pkg):
    rc, out, err = run(capsys, ["generate", pkg, "-p", QUESTION])
    assert rc == 0 and err == "stopped: <|end|>\n" and "stopped" not in out
    rc, _, err = run(capsys, ["generate", pkg, "-p", QUESTION, "--max-new-tokens", "3"])
    assert err == "stopped: length (max_new_tokens 3)\n"
    rc, _, err = run(capsys, ["generate", pkg, "-p", QUESTION, "--max-length", "20", "--max-new-tokens", "100"])
    assert err == "stopped: length (max_length 20)\n"
    rc, out, err = run(capsys, ["generate", pkg, "-p", QUESTION, "--stop", "list"])
    assert err == "stopped: stop string 'list'\n" and "list" not in out


# --- chat ---------------------------------------------------------------------------------------

def test_chat_commands_and_banner(capsys, monkeypatch, pkg, model):
    session = model.chat()
    first = session.send(QUESTION, max_new_tokens=20)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/help\n{QUESTION}\n/reset\n/nope\n{QUESTION}\n"))
    rc, out, err = run(capsys, ["chat", pkg, "--max-new-tokens", "20"])
    assert rc == 0 and out == f"{first}\n{first}\n", "commands never reach the model; /reset forgets"
    banner, *rest = err.splitlines()
    assert "int4-cpu" in banner and "/help" in banner  # piped input gets the banner too (on stderr)
    assert any("/reset" in line for line in rest) and any("/exit" in line for line in rest)
    assert "conversation reset" in err and "unknown command /nope" in err


def test_desktop_chat_usage_and_quit(pkg):
    script = ROOT / "examples" / "desktop_chat.py"
    bare = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: ") and "cannot load" not in bare.stderr
    out = subprocess.run([sys.executable, str(script), str(pkg)], input="quit\nnot sent\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2, "only the banner and the one-shot answer: quit ends the chat"


# --- the tokenizer's leading-space artifact ---------------------------------------------------

def _hf_decode(pkg: Path, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(pkg / "tokenizer.json")).decode(ids)


def test_answer_has_no_leading_marker_space(model):
    text = model.generate([{"role": "user", "content": QUESTION}], max_new_tokens=20)
    assert text and not text.startswith(" "), repr(text)
    assert "".join(model.stream([{"role": "user", "content": QUESTION}], max_new_tokens=20)) == text


@pytest.mark.parametrize("completion", ["Return a list", " Return a list", "  two spaces", "\tTab"])
def test_only_the_marker_space_is_dropped(model, pkg, completion):
    """A completion after <|assistant|> decodes as transformers decodes it: a word's ▁ marker is no space,
    a space the model really generated (the ▁ token before ▁Return) is kept."""
    from phi3_onnx.runtime.options import GenerationOptions

    prompt = model.prompt_ids([{"role": "user", "content": QUESTION}])
    ids = model.encode(completion)  # what the tokenizer makes of this answer
    streamed = "".join(model.stream_text(iter(ids), GenerationOptions(), [], prompt))
    assert streamed == _hf_decode(pkg, ids) == completion
    assert model.completion_text(prompt, ids) == completion


def test_raw_completion_keeps_its_space(model):
    """After plain text the ▁ is a real space: `... and` + `▁the` is ` the`."""
    from phi3_onnx.runtime.options import GenerationOptions

    prompt = model.prompt_ids("The committee reviewed the proposal and")
    ids = model.encode("the end")[:]  # ▁the ▁end
    assert "".join(model.stream_text(iter(ids), GenerationOptions(), [], prompt)) == " the end"
    assert model.generate("The committee reviewed the proposal and", max_new_tokens=5).startswith(" ")


# --- one source of truth for the runtime versions ---------------------------------------------

def test_min_versions_agree_with_pyproject(capsys, pkg):
    import tomllib

    from phi3_onnx.manifest import MIN_VERSIONS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = {}
    for extra in ("cpu", "cuda", "directml"):
        for req in extras[extra]:
            name, version = re.fullmatch(r"([a-z-]+)>=([\d.]+)", req).groups()
            dist = "onnxruntime-genai" if "genai" in name else "onnxruntime"
            floors.setdefault(dist, set()).add(version)
    assert {k: {v.removesuffix(".0")} for k, v in MIN_VERSIONS.items()} == {
        k: {x.removesuffix(".0") for x in v} for k, v in floors.items()}
    out = run(capsys, ["info", pkg])[1]
    assert f"requires:   onnxruntime-genai>={MIN_VERSIONS['onnxruntime-genai']}, onnxruntime>={MIN_VERSIONS['onnxruntime']}" in out \
        or f"onnxruntime>={MIN_VERSIONS['onnxruntime']}" in out


# --- eval progress --------------------------------------------------------------------------------

HELDOUT = ROOT / "tests" / "assets" / "corpus" / "heldout.txt"


def test_eval_progress_on_stderr_and_quiet(capsys, monkeypatch, pkg, exported):
    from phi3_onnx.evaluate import runner

    ref = exported("fp32-cpu")
    argv = ["eval", pkg, "--reference", ref, "--data", HELDOUT, "--max-tokens", "256"]
    rc, out, err = run(capsys, argv)
    assert rc == 0 and err == "" and "PASS" in out  # on a pipe: no progress, stderr stays the one-line error
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, out, err = run(capsys, argv)
    assert rc == 0 and "Evaluating 1 variant(s)" in err and "4/4" in err and "Evaluating" not in out
    rc, out, err = run(capsys, [*argv, "--quiet"])
    assert rc == 0 and err == "" and "PASS" in out
    seen = {}

    @contextmanager
    def recorder(description, total, enabled=True, pipe_lines=True):
        seen.update(total=total, done=0, enabled=enabled)

        def advance(n=1, total=None):
            seen["done"] += n
        yield advance

    monkeypatch.setattr(runner, "task", recorder)
    assert run(capsys, argv)[0] == 0
    assert seen == {"total": 4, "done": 4, "enabled": True}  # 2 windows of 128: reference, then the variant


# --- README -------------------------------------------------------------------------------------

def test_readme_installs_from_a_clone_and_quick_start_needs_no_torch():
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"pip install ['\"]phi3-onnx\[[a-z,]+\]['\"]", readme), "not on a registry"
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    first_install = next(line for line in lines if line.startswith("pip install"))
    assert first_install == 'pip install -e ".[cpu]"'
    assert lines.index('pip install -e ".[cpu,test]"') > max(i for i, l in enumerate(lines) if l.startswith("phi3-onnx"))
    for extra in ("cpu", "cuda", "directml"):  # the extras table is kept
        assert f'`pip install -e ".[{extra}]"`' in readme


def test_readme_eval_numbers_are_what_its_command_prints(capsys, tmp_path, pkg, exported):
    """The README's numbers come from its own command over the Quick start's packages (exports are deterministic)."""
    section = (ROOT / "README.md").read_text().split("## Checking accuracy drift", 1)[1]
    assert "phi3-onnx eval out/tiny-int4 --reference out/tiny-fp32-cpu --data tests/assets/corpus/heldout.txt" in section
    report = tmp_path / "e.json"
    assert run(capsys, ["eval", pkg, "--reference", exported("fp32-cpu"), "--data", HELDOUT, "--json", report])[0] == 0
    m = json.loads(report.read_text())["variants"][0]["metrics"]
    stated = (f"perplexity {m['ppl']:.2f} vs {m['ref_ppl']:.2f} (+{m['ppl_increase_pct']:.2f} %), "
              f"mean KL {m['kl_mean']:.5f} (p99 {m['kl_p99']:.4f}), top-1 {m['top1']:.3f}")
    assert stated in " ".join(section.split()), stated
