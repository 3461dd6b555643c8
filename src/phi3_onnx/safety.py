"""What keeps a run from leaving half-written state behind (ground floor: imports only errors).

* `signals_raise()`: the CLI's SIGINT/SIGTERM handlers raise `Interrupted`, so every `finally` and
  context manager cleans up on the way out; a second signal while cleaning up is ignored.
* `signals_deferred()`: a critical section (the output swap) that SIGINT/SIGTERM cannot split; a
  signal that arrives inside it is delivered as soon as it ends (to whatever handler was there).
* Leftovers of killed processes are named with their PID (`.NAME.partial-PID`,
  `phi3-onnx-eval-PID-...`); `stale_owner` tells whether that process is gone.
* `write_text_atomic`: a small file written beside its place and renamed in.
* `pause_point(stage)`: a test hook. When the environment variable PHI3_ONNX_TEST_PAUSE_AT names
  `stage`, the process writes the stage's name to the file PHI3_ONNX_TEST_PAUSE_FILE and waits
  there (up to 30 s, until a signal arrives), so tests can interrupt or kill it at that point.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from phi3_onnx.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
PARTIAL = ".partial-"
PAUSE_ENV = "PHI3_ONNX_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "PHI3_ONNX_TEST_PAUSE_FILE"
PAUSE_SECONDS = 30.0

_signalled = threading.Event()  # set by our handlers; releases a test pause
_paused: set[str] = set()

Handler = Callable[[int, FrameType | None], Any]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _handlers(handler: Handler) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM inside the block (main thread only), the previous ones after."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class _RaiseOnce:
    """The first SIGINT/SIGTERM raises Interrupted; later ones are ignored so clean-up can finish."""

    def __init__(self) -> None:
        self.first: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        _signalled.set()
        if self.first is None:
            self.first = signum
            raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """The CLI's handlers: SIGINT and SIGTERM raise `Interrupted` (exit 130 / 143)."""
    _signalled.clear()
    with _handlers(_RaiseOnce()):
        yield


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them to the handlers from before."""
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        _signalled.set()
        pending.append(signum)

    try:
        with _handlers(hold):
            yield
    finally:
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


_claimed: set[Path] = set()


@contextmanager
def claimed(*paths: Path) -> Iterator[None]:
    """Paths this process is writing right now: never stale, though their PID is ours."""
    mine = [p for p in paths if p not in _claimed]
    _claimed.update(mine)
    try:
        yield
    finally:
        _claimed.difference_update(mine)


def _pid_alive_windows(pid: int) -> bool:
    """OpenProcess + GetExitCodeProcess; any doubt counts as alive (its leftovers are kept)."""
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def stale_owner(path: Path, pattern: re.Pattern[str], own: bool = False) -> bool:
    """Whether `path`'s name matches `pattern` (with a `pid` group) and that process is gone.

    With `own`, our own PID's entries count as stale too unless `claimed` (a failed or
    interrupted earlier call in this process left them); without, they are never touched.
    """
    match = pattern.fullmatch(path.name)
    if match is None:
        return False
    pid = int(match.group("pid"))
    if pid == os.getpid():
        return own and path not in _claimed
    return not pid_alive(pid)


def remove_path(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree; best effort."""
    import shutil

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale(parent: Path, pattern: re.Pattern[str], own: bool = False) -> list[Path]:
    """Remove the entries of `parent` left by dead processes (names matching `pattern`)."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if stale_owner(entry, pattern, own):
            remove_path(entry)
            removed.append(entry)
    return removed


def partial_name(name: str) -> str:
    return f".{name}{PARTIAL}{os.getpid()}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    tmp = path.parent / partial_name(path.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def pause_requested(stage: str) -> bool:
    """Whether a test asked to pause at `stage` (PHI3_ONNX_TEST_PAUSE_AT)."""
    return os.environ.get(PAUSE_ENV) == stage


def pause_point(stage: str) -> None:
    """Tests only (see the module docstring): wait here once when PHI3_ONNX_TEST_PAUSE_AT == stage."""
    if os.environ.get(PAUSE_ENV) != stage or stage in _paused:
        return
    _paused.add(stage)
    if not _in_main_thread() and hasattr(signal, "pthread_sigmask"):
        # the kernel may hand a process's signal to any thread that does not block it; Python runs
        # handlers in the main thread only, and only once that thread wakes: send it there
        signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    ready = os.environ.get(PAUSE_FILE_ENV)
    if ready:
        Path(ready).write_text(stage)
    # short waits: a signal handler (main thread) releases a pause held in a worker thread too
    waited = 0.0
    while waited < PAUSE_SECONDS and not _signalled.is_set():
        _signalled.wait(0.05)
        waited += 0.05
