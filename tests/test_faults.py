"""Fault injection through real `phi3-onnx` processes: SIGINT / SIGTERM / SIGKILL at named stages
of export, eval and generate, a full disk (RLIMIT_FSIZE) and an unwritable parent.

The child stops at a stage through the test hook in `phi3_onnx.safety.pause_point`
(PHI3_ONNX_TEST_PAUSE_AT): it writes a ready file and waits there until a signal arrives. Each case
asserts the exit code, a one-line stderr, and what is on disk: nothing new, the previous output
byte for byte, and no partial folder after the next run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from phi3_onnx.cli import main
from phi3_onnx.safety import PAUSE_ENV, PAUSE_FILE_ENV

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
_SCRIPT = Path(sys.executable).parent / "phi3-onnx"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "phi3_onnx.cli"]


@dataclass(frozen=True)
class Ended:
    code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Box:
    """A test's folders: `work` holds the outputs, `tmp` is the child's TMPDIR, `ready` the hook's file."""

    work: Path
    tmp: Path
    ready: Path

    def env(self, stage: str | None) -> dict[str, str]:
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        env.pop("PHI3_ONNX_DEBUG", None)
        if stage:
            env |= {PAUSE_ENV: stage, PAUSE_FILE_ENV: str(self.ready)}
        return env

    def names(self) -> list[str]:
        return sorted(p.name for p in self.work.iterdir())

    def eval_temps(self) -> list[str]:
        return sorted(p.name for p in self.tmp.iterdir() if p.name.startswith("phi3-onnx-eval-"))


@pytest.fixture
def box(tmp_path: Path) -> Box:
    b = Box(tmp_path / "work", tmp_path / "tmp", tmp_path / "ready")
    b.work.mkdir()
    b.tmp.mkdir()
    return b


def run(box: Box, args: list[str], **kw) -> Ended:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=box.env(None), cwd=box.work,
                          timeout=120, **kw)
    return Ended(proc.returncode, proc.stdout, proc.stderr)


def interrupt_at(box: Box, stage: str, sig: signal.Signals, args: list[str]) -> Ended:
    """Start the CLI, wait until it reaches `stage`, send `sig`, wait for it to end."""
    box.ready.unlink(missing_ok=True)
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=box.env(stage), cwd=box.work)
    deadline = time.monotonic() + 90
    while not box.ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"ended ({proc.returncode}) before reaching {stage}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never reached {stage}")
        time.sleep(0.02)
    proc.send_signal(sig)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=90)
    # promptly: well before the hook's own 30 s would have let it go on
    assert time.monotonic() - sent < 15, f"took {time.monotonic() - sent:.1f}s to stop after {sig.name}"
    return Ended(proc.returncode, out, err)


def one_line(err: str, start: str) -> str:
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith(start), err
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def int4(exported) -> Path:
    return exported("int4-cpu")


@pytest.fixture
def old(box: Box, int4: Path) -> dict[str, bytes]:
    """A previous export at work/out (marked, so the old one and a new one differ)."""
    shutil.copytree(int4, box.work / "out")
    (box.work / "out" / "OLD").write_text("the previous export")
    return snapshot(box.work / "out")


def export_args(tiny_ckpt: Path, *extra: str) -> list[str]:
    return ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", "out", "-q", *extra]


# --- export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, sig", [
    ("export:planned", signal.SIGINT),    # checkpoint read and planned, nothing staged yet
    ("export:weights", signal.SIGTERM),   # model.onnx.data half written in the staging folder
    ("export:staged", signal.SIGINT),     # the new package complete in staging, not swapped in
])
def test_export_interrupted_keeps_the_old_output(box, old, tiny_ckpt, stage, sig):
    ended = interrupt_at(box, stage, sig, export_args(tiny_ckpt, "--force"))
    assert ended.code == 128 + sig
    line = one_line(ended.stderr, f"interrupted: export by {sig.name}")
    assert line.endswith("(nothing written; any previous output intact)")
    assert box.names() == ["out"] and snapshot(box.work / "out") == old


def test_export_interrupted_fresh_leaves_nothing(box, tiny_ckpt):
    ended = interrupt_at(box, "export:weights", signal.SIGINT, export_args(tiny_ckpt))
    assert ended.code == 130 and box.names() == []
    one_line(ended.stderr, "interrupted: export by SIGINT")


def test_export_sigterm_during_the_swap_finishes_the_swap(box, old, tiny_ckpt):
    """SIGTERM between the two renames is held until the new output is in: never half of each."""
    ended = interrupt_at(box, "export:swap", signal.SIGTERM, export_args(tiny_ckpt, "--force"))
    assert ended.code == 143
    assert one_line(ended.stderr, "interrupted: export by SIGTERM").endswith("(the new output was already complete and in place)")
    assert box.names() == ["out"] and not (box.work / "out" / "OLD").exists()
    assert snapshot(box.work / "out") == {k: v for k, v in old.items() if k != "OLD"}  # deterministic export


@pytest.mark.parametrize("stage, left", [
    ("export:weights", [".out.partial-{pid}", "out"]),
    ("export:swap", [".out.old-{pid}", ".out.partial-{pid}"]),  # old set aside, new not yet in
])
def test_export_sigkill_then_the_next_run_recovers(box, old, tiny_ckpt, stage, left, capsys, monkeypatch):
    monkeypatch.chdir(box.work)
    ended = interrupt_at(box, stage, signal.SIGKILL, export_args(tiny_ckpt, "--force"))
    assert ended.code == -signal.SIGKILL and ended.stderr == ""
    assert [n.split("-")[0] for n in box.names()] == [n.split("-")[0] for n in left]
    # the next run (here in this test's process: another PID, and no 2 s of imports) recovers first,
    # then refuses to replace the restored output without --force
    assert main(export_args(tiny_ckpt)) == 2
    assert "exists; pass --force" in one_line(capsys.readouterr().err, "error: ")
    assert box.names() == ["out"] and snapshot(box.work / "out") == old


def test_bundle_interrupted_keeps_the_old_output(box, old, tiny_ckpt):
    args = ["export", "-m", str(tiny_ckpt), "-t", "fp32-cpu", "-t", "int4-cpu", "-o", "out", "-q", "--force"]
    ended = interrupt_at(box, "export:weights", signal.SIGTERM, args)
    assert ended.code == 143
    assert one_line(ended.stderr, "interrupted: export by SIGTERM").endswith("(nothing written; any previous output intact)")
    assert box.names() == ["out"] and snapshot(box.work / "out") == old


def _fsize_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_export_full_disk_is_exit_2_and_keeps_the_old_output(box, old, tiny_ckpt):
    ended = run(box, export_args(tiny_ckpt, "--force"), preexec_fn=_fsize_limit)
    assert ended.code == 2
    line = one_line(ended.stderr, "error: cannot write ")
    assert "File too large" in line and line.endswith("(nothing written; any previous output intact)")
    assert box.names() == ["out"] and snapshot(box.work / "out") == old


def _unwritable_parent(box: Box) -> Path:
    if os.geteuid() != 0:
        ro = box.work / "ro"
        ro.mkdir(mode=0o555)
        return ro
    try:  # root writes through any chmod; sysfs refuses mkdir even to root
        os.mkdir("/sys/phi3-onnx-probe")
    except OSError:
        return Path("/sys")
    os.rmdir("/sys/phi3-onnx-probe")
    pytest.skip("no folder this user cannot write to")


def test_export_unwritable_parent_is_exit_2(box, tiny_ckpt):
    parent = _unwritable_parent(box)
    ended = run(box, ["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", str(parent / "out"), "-q"])
    assert ended.code == 2
    assert f"cannot write the output's folder {parent}" in one_line(ended.stderr, "error: ")
    assert not (parent / "out").exists()


# --- eval -----------------------------------------------------------------------------------

def eval_args(int4: Path, fp32: Path) -> list[str]:
    return ["eval", str(int4), "--reference", str(fp32), "--data", str(HELDOUT), "--max-tokens", "128",
            "--window", "64", "--json", "drift.json"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_eval_interrupted_is_never_a_pass(box, int4, exported, sig):
    """Interrupted with the reference logits on disk: 130/143, no report, the temp folder removed."""
    ended = interrupt_at(box, "eval:reference", sig, eval_args(int4, exported("fp32-cpu")))
    assert ended.code == 128 + sig
    one_line(ended.stderr, f"interrupted: eval by {sig.name} (no verdict")
    assert box.names() == [] and box.eval_temps() == []


def test_eval_sigkill_leftover_removed_by_the_next_eval(box, int4, exported):
    args = eval_args(int4, exported("fp32-cpu"))
    ended = interrupt_at(box, "eval:reference", signal.SIGKILL, args)
    assert ended.code == -signal.SIGKILL and len(box.eval_temps()) == 1
    again = run(box, args)
    assert again.code == 0, again.stderr
    assert box.names() == ["drift.json"] and box.eval_temps() == []


# --- generate -------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_generate_interrupted(box, int4, sig):
    args = ["generate", str(int4), "--prompt", "The committee reviewed", "--max-new-tokens", "40"]
    ended = interrupt_at(box, "generate:stream", sig, args)
    assert box.names() == [] and box.eval_temps() == []
    if sig == signal.SIGKILL:
        assert ended.code == -signal.SIGKILL
        return
    assert ended.code == 128 + sig and ended.stdout  # the first piece was streamed, then it stopped
    one_line(ended.stderr, f"interrupted: generate by {sig.name} (generation stopped; nothing written)")
