"""Output safety, in process: what --output may be, what --force may replace, and the atomic swap
(a failure injected at every step leaves the whole old output or the whole new one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from phi3_onnx.cli import main
from phi3_onnx.errors import Interrupted, OutputExists, OutputNotWritable, UnsafeOutput
from phi3_onnx.manifest import FORMAT
from phi3_onnx.package import staging
from phi3_onnx.package.staging import check_destination, staged_folder
from phi3_onnx.safety import signals_deferred, signals_raise, write_text_atomic


def _package(folder: Path, tag: str) -> Path:
    """A stand-in package: a phi3-onnx manifest plus a file saying which one it is."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    (folder / "which.txt").write_text(tag)
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(tag.encode() * 1000)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_new(dest) -> None:
    with staged_folder(dest) as tmp:
        _package(tmp / "x", "new")
        for p in (tmp / "x").iterdir():
            p.rename(tmp / p.name)
        (tmp / "x").rmdir()


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = _package(tmp_path / "out", "old")
    return out, _snapshot(out)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- what --output may be -------------------------------------------------------------------

def _ckpt(tmp_path: Path, tiny_ckpt: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "models" / "ck"))


@pytest.mark.parametrize("where, needle", [
    ("ck", "is the checkpoint folder"),
    ("ck/sub", "is inside the checkpoint folder"),
    (".", "holds the checkpoint"),
    ("..", "holds the checkpoint"),
    ("link", "is the checkpoint folder"),
    ("link/deeper/x", "is inside the checkpoint folder"),
])
def test_output_may_not_touch_the_checkpoint(tmp_path, tiny_ckpt, capsys, monkeypatch, where, needle):
    ck = _ckpt(tmp_path, tiny_ckpt)
    (ck.parent / "notes.txt").write_text("unrelated user file")
    (ck.parent / "link").symlink_to(ck)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(ck.parent)
    for force in ([], ["--force"]):
        code = main(["export", "-m", str(ck), "-t", "int4-cpu", "-o", where, "-q", *force])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert _snapshot(tmp_path) == before


def test_output_may_not_hold_what_the_checkpoint_links_to(tmp_path, tiny_ckpt):
    """A hub cache: snapshots/<rev>/ links to blobs/; --output blobs would delete the weights."""
    blobs = Path(shutil.copytree(tiny_ckpt, tmp_path / "blobs"))
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    with pytest.raises(UnsafeOutput, match="holds the checkpoint"):
        check_destination(blobs, snap, force=True)


def test_force_replaces_only_what_phi3_onnx_wrote(tmp_path, old):
    out, _ = old
    check_destination(out, None, force=True)  # a package
    empty = tmp_path / "empty"
    empty.mkdir()
    check_destination(empty, None, force=True)  # an empty folder
    with pytest.raises(OutputExists, match="pass --force"):
        check_destination(out, None, force=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "manifest.json").write_text('{"name": "my web app"}')  # someone else's manifest.json
    afile = tmp_path / "afile"
    afile.write_text("x")
    for victim in (home, afile):
        with pytest.raises(UnsafeOutput, match="replaces only a phi3-onnx package or bundle or an empty folder"):
            check_destination(victim, None, force=True)
    assert (home / "thesis.tex").read_text() == "years of work" and afile.read_text() == "x"


def _sysfs_refuses_mkdir() -> bool:
    try:
        os.mkdir("/sys/phi3-onnx-probe")
    except OSError:
        return True
    os.rmdir("/sys/phi3-onnx-probe")
    return False


@pytest.mark.skipif(not _sysfs_refuses_mkdir(), reason="needs a /sys that refuses mkdir")
@pytest.mark.parametrize("output", ["/sys/phi3-onnx-test", "/sys/phi3-onnx-test/deeper/out"])
def test_unwritable_parent_sysfs(tiny_ckpt, capsys, output):
    """Even root cannot mkdir in sysfs (EPERM): checked before the checkpoint is read."""
    assert main(["export", "-m", str(tiny_ckpt), "-t", "int4-cpu", "-o", output, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the output's folder /sys") and err.count("\n") == 1


def test_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputNotWritable):
        check_destination(tmp_path / "f" / "out", None, False)


# --- the swap, with a failure at each step ----------------------------------------------------

def test_force_swaps_in_the_new_output(tmp_path, old):
    out, _ = old
    _write_new(check_destination(out, None, True))
    assert (out / "which.txt").read_text() == "new" and _names(tmp_path) == ["out"]


class Boom(OSError):
    pass


def _fail(*args, **kwargs):
    raise Boom("injected")


@pytest.mark.parametrize("step", ["body", "_move_aside", "_move_in"])
def test_failure_before_the_new_output_is_in_leaves_the_old(tmp_path, old, monkeypatch, step):
    out, before = old
    dest = check_destination(out, None, True)
    if step == "body":
        with pytest.raises(Boom), staged_folder(dest) as tmp:
            (tmp / "model.onnx.data").write_bytes(b"half")
            raise Boom("disk went away")
    else:
        monkeypatch.setattr(staging, step, _fail)
        with pytest.raises(Boom):
            _write_new(dest)
    assert _snapshot(out) == before and _names(tmp_path) == ["out"]


def test_failed_move_in_and_failed_restore_recovered_by_the_next_run(tmp_path, old, monkeypatch):
    out, before = old
    monkeypatch.setattr(staging, "_move_in", _fail)
    monkeypatch.setattr(staging, "_restore", _fail)
    with pytest.raises(Boom):
        _write_new(check_destination(out, None, True))
    assert not out.exists() and _names(tmp_path) == [f".out.old-{os.getpid()}"]  # the old output, whole, aside
    monkeypatch.undo()
    with pytest.raises(OutputExists):  # the next run puts it back first
        check_destination(out, None, False)
    assert _snapshot(out) == before and _names(tmp_path) == ["out"]


def test_failure_deleting_the_old_output_keeps_the_new(tmp_path, old, monkeypatch):
    out, _ = old
    monkeypatch.setattr(staging, "remove_path", lambda path: None)  # rmtree "fails" silently
    _write_new(check_destination(out, None, True))
    assert (out / "which.txt").read_text() == "new"
    leftovers = [n for n in _names(tmp_path) if n != "out"]
    assert len(leftovers) == 1 and ".partial-" in leftovers[0]  # renamed to a never-restored name first
    monkeypatch.undo()
    check_destination(out, None, True)  # the next run removes it
    assert _names(tmp_path) == ["out"] and (out / "which.txt").read_text() == "new"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_process(tmp_path, old):
    """Killed between the renames: `.out.old-PID` and no `out` -> restored; stale partials removed;
    a live process's partial is left alone."""
    out, before = old
    dead = _dead_pid()
    out.rename(tmp_path / f".out.old-{dead}")
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".other.partial-{dead}").mkdir()
    live = tmp_path / f".other.partial-{os.getppid()}"
    live.mkdir()
    check_destination(out, None, True)
    assert _snapshot(out) == before and _names(tmp_path) == [live.name, "out"]


def test_stale_aside_beside_a_complete_output_is_deleted(tmp_path, old):
    out, before = old
    dead = _dead_pid()
    _package(tmp_path / f".out.old-{dead}", "older")
    check_destination(out, None, True)
    assert _snapshot(out) == before and _names(tmp_path) == ["out"]


# --- interrupts inside the library ------------------------------------------------------------

def test_keyboard_interrupt_in_the_api_propagates_and_leaves_the_old(tmp_path, old):
    out, before = old
    with pytest.raises(KeyboardInterrupt), staged_folder(check_destination(out, None, True)) as tmp:
        (tmp / "model.onnx.data").write_bytes(b"half")
        raise KeyboardInterrupt
    assert _snapshot(out) == before and _names(tmp_path) == ["out"]


def test_interrupt_during_the_swap_is_held_until_the_new_output_is_in(tmp_path, old, monkeypatch):
    out, _ = old
    real = staging._move_in

    def move_in_with_a_signal(tmp, dest):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives between the two renames
        real(tmp, dest)

    monkeypatch.setattr(staging, "_move_in", move_in_with_a_signal)
    with signals_raise(), pytest.raises(Interrupted) as info:
        _write_new(check_destination(out, None, True))
    assert info.value.signum == signal.SIGTERM and info.value.detail == staging.AFTER_SWAP
    assert (out / "which.txt").read_text() == "new" and _names(tmp_path) == ["out"]


def test_deferred_signal_reaches_the_default_handler_after_the_block():
    # Python's own SIGINT handler, set here: a process started as a background job of a non-interactive
    # shell (nohup ... &) inherits SIGINT ignored, and then the deferred signal rightly goes nowhere
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                reached = True
        assert reached
    finally:
        signal.signal(signal.SIGINT, previous)


def test_disk_full_is_exit_2_and_leaves_the_old(tmp_path, old):
    import errno

    out, before = old
    with pytest.raises(OutputNotWritable, match="No space left on device"), \
            staged_folder(check_destination(out, None, True)) as tmp:
        (tmp / "model.onnx.data").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert _snapshot(out) == before and _names(tmp_path) == ["out"]


def test_atomic_text_write(tmp_path, monkeypatch):
    report = tmp_path / "drift.json"
    report.write_text("old report")
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(Boom):
        write_text_atomic(report, "new report")
    assert report.read_text() == "old report" and _names(tmp_path) == ["drift.json"]
    monkeypatch.undo()
    write_text_atomic(report, "new report")
    assert report.read_text() == "new report" and _names(tmp_path) == ["drift.json"]


# --- the Python API: KeyboardInterrupt propagates, nothing half-written -----------------------

def test_api_export_keyboard_interrupt_while_writing_weights(tmp_path, tiny_ckpt, monkeypatch, exported):
    """Raised from onnx_ir's save worker thread (the per-tensor callback), mid model.onnx.data."""
    from phi3_onnx import export
    from phi3_onnx.package import pipeline

    out = Path(shutil.copytree(exported("int4-cpu"), tmp_path / "out"))
    before = _snapshot(out)
    calls = []

    def interrupted(advance, total):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_saved", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_ckpt, "int4-cpu", out, force=True)
    assert _snapshot(out) == before and _names(tmp_path) == ["out"]


def test_api_eval_keyboard_interrupt_removes_its_temp_folder(tmp_path, monkeypatch, exported):
    import tempfile

    from phi3_onnx.evaluate import EvalOptions, evaluate, runner

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(*args, **kwargs):
        assert any(p.name.startswith("phi3-onnx-eval-") for p in tmp_path.iterdir())  # logits on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate_variant", interrupted)
    data = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
    with pytest.raises(KeyboardInterrupt):
        evaluate(exported("int4-cpu"), exported("fp32-cpu"), EvalOptions(data, window=64, max_tokens=128))
    assert list(tmp_path.iterdir()) == []
