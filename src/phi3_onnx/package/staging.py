"""Writing an output folder safely (export and bundles).

The rules, checked by `check_destination` before any slow work (each refusal: exit 2):

* `--output` is resolved with its symlinks; it may not be the checkpoint, lie inside it, or hold
  it (nor any file the checkpoint's folder links to, e.g. a hub cache's blobs).
* Its nearest existing parent must be writable (probed by creating the staging folder's name).
* An existing output needs `force`, and `force` replaces only an empty folder or one that
  phi3-onnx wrote: a `manifest.json` of format phi3-onnx/1 or a `bundle.json` of format
  phi3-onnx-bundle/1 at its top. Anything else (a file, a non-empty folder of other things) is refused.

`staged_folder` writes the new output in `.NAME.partial-PID` beside it. Once complete, the swap
renames the old output to `.NAME.old-PID`, the new one to NAME, then deletes the old one; the two
renames run with SIGINT/SIGTERM held. A failure at any step leaves the whole old output or the
whole new one. What a killed process (SIGKILL, power loss) leaves is put right by the next run on
that parent: a `.NAME.old-PID` of a dead PID is restored when NAME is missing (killed between the
renames) and deleted otherwise; any `.*.partial-PID` of a dead PID is deleted.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from phi3_onnx.errors import Interrupted, OutputExists, OutputNotWritable, UnsafeOutput
from phi3_onnx.manifest import BUNDLE, BUNDLE_FORMAT, FORMAT, MANIFEST
from phi3_onnx.safety import (
    claimed, partial_name, pause_point, remove_path, remove_stale, signals_deferred, stale_owner,
)

OLD = ".old-"
PARTIAL_RE = re.compile(r"\..+\.partial-(?P<pid>\d+)")
# errors that mean "this output cannot be written here", not a bug: exit 2
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
AFTER_SWAP = "the new output was already complete and in place"


@dataclass(frozen=True)
class Destination:
    """A checked output folder: its real path (symlinks resolved) and whether it may be replaced."""

    path: Path
    force: bool

    @property
    def partial(self) -> Path:
        return self.path.parent / partial_name(self.path.name)

    @property
    def aside(self) -> Path:
        return self.path.parent / f".{self.path.name}{OLD}{os.getpid()}"

    @property
    def aside_pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(f".{self.path.name}{OLD}") + r"(?P<pid>\d+)")


def check_destination(output: str | os.PathLike, source: Path | None, force: bool) -> Destination:
    """Every output rule above, before any slow work; recovers what a killed run left first."""
    dest = Destination(Path(os.path.realpath(os.path.expanduser(output))), force)
    if source is not None:
        _refuse_source_overlap(dest.path, Path(output), source)
    recover(dest)
    _refuse_existing(dest)
    _check_writable(dest)
    return dest


def preview_destination(output: str | os.PathLike, source: Path, force: bool) -> None:
    """The output rules a --dry-run can check without writing: no overlap with the checkpoint, --force."""
    dest = Destination(Path(os.path.realpath(os.path.expanduser(output))), force)
    _refuse_source_overlap(dest.path, Path(output), source)
    _refuse_existing(dest)


def refuse_existing(output: str | os.PathLike, force: bool) -> None:
    """The quick part of the rules (no checkpoint needed): an existing output and `force`."""
    _refuse_existing(Destination(Path(os.path.realpath(os.path.expanduser(output))), force))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _source_paths(source: Path) -> list[Path]:
    """The checkpoint folder and the real place of every entry in it (hub caches link to blobs/)."""
    real = Path(os.path.realpath(source))
    paths = [real]
    try:
        paths += [Path(os.path.realpath(p)) for p in real.iterdir()]
    except OSError:
        pass
    return paths


def _refuse_source_overlap(out: Path, given: Path, source: Path) -> None:
    real_source = Path(os.path.realpath(source))
    if _inside(out, real_source):
        where = "is" if out == real_source else "is inside"
        raise UnsafeOutput(f"--output {given} {where} the checkpoint folder {source}; pick a folder outside it")
    for path in _source_paths(source):
        if _inside(path, out):
            raise UnsafeOutput(f"--output {given} holds the checkpoint ({path}); pick a folder outside it")


def _is_ours(folder: Path) -> bool:
    """An empty folder, or one phi3-onnx wrote (a package's manifest.json or a bundle's bundle.json)."""
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    for name, fmt in ((MANIFEST, FORMAT), (BUNDLE, BUNDLE_FORMAT)):
        try:
            if (folder / name).stat().st_size > 64 << 20:  # ours are a few KiB
                continue
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("format") == fmt:
            return True
    return False


def _refuse_existing(dest: Destination) -> None:
    out = dest.path
    if not os.path.lexists(out):
        return
    if not dest.force:
        raise OutputExists(f"output {out} exists; pass --force to replace it")
    if not _is_ours(out):
        kind = "a file" if not out.is_dir() else "a folder phi3-onnx did not write (no manifest.json or bundle.json)"
        raise UnsafeOutput(f"--force replaces only a phi3-onnx package or bundle or an empty folder; {out} is {kind}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(dest: Destination) -> None:
    """Probe the nearest existing parent by creating (and removing) the staging folder's name there."""
    parent = _nearest_existing(dest.path.parent)
    probe = parent / partial_name(dest.path.name)
    try:
        probe.mkdir()
        probe.rmdir()
    except FileExistsError:
        remove_path(probe)  # our own PID's leftover
    except OSError as exc:
        raise OutputNotWritable(f"cannot write the output's folder {parent}: {exc.strerror}") from None


def recover(dest: Destination) -> None:
    """Put right what a killed run left beside the output (see the module docstring)."""
    parent = dest.path.parent
    if not parent.is_dir():
        return
    pattern = dest.aside_pattern
    for aside in sorted(parent.iterdir()):
        if not stale_owner(aside, pattern, own=True):
            continue
        if not os.path.lexists(dest.path):
            os.rename(aside, dest.path)  # killed between the two renames: the old output is back
        else:
            _discard(aside)
    remove_stale(parent, PARTIAL_RE, own=True)


@contextmanager
def staged_folder(dest: Destination) -> Iterator[Path]:
    """An empty folder beside the output; swapped into place when the block ends without error."""
    with claimed(dest.partial, dest.aside, _trash(dest.aside)):
        yield from _staged(dest)


def _staged(dest: Destination) -> Iterator[Path]:
    tmp = _new_partial(dest)
    try:
        yield tmp
        pause_point("export:staged")
    except OSError as exc:
        remove_path(tmp)
        if exc.errno in WRITE_ERRNOS:
            raise OutputNotWritable(f"cannot write {dest.path}: {exc.strerror} (nothing written; any previous output intact)") from None
        raise
    except Interrupted as exc:
        remove_path(tmp)
        raise Interrupted(exc.signum) from None  # whatever a nested export said, nothing is in place
    except BaseException:
        remove_path(tmp)
        raise
    install(tmp, dest)


def _new_partial(dest: Destination) -> Path:
    _refuse_existing(dest)  # again: something may have appeared while planning
    tmp = dest.partial
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        remove_path(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise OutputNotWritable(f"cannot write the output's folder {tmp.parent}: {exc.strerror}") from None
    return tmp


def install(tmp: Path, dest: Destination) -> None:
    """The swap: old output aside, new one in (signals held), then the old one deleted.

    An interrupt that arrived during the swap, or comes while deleting the old output, is raised
    with a detail saying the new output is in place.
    """
    swapped = False
    try:
        with signals_deferred():
            _swap(tmp, dest)
            swapped = True
        _discard(dest.aside)
    except Interrupted as exc:
        if not swapped:
            raise
        _discard(dest.aside)
        raise exc.with_detail(AFTER_SWAP) from None
    except BaseException:
        if swapped:
            _discard(dest.aside)
        remove_path(tmp)
        raise


def _swap(tmp: Path, dest: Destination) -> None:
    moved = _move_aside(dest)
    pause_point("export:swap")
    try:
        _move_in(tmp, dest)
    except BaseException:
        if moved:
            _restore(dest)
        remove_path(tmp)
        raise


def _move_aside(dest: Destination) -> bool:
    """Rename the old output to `.NAME.old-PID`; False when there was none."""
    if not os.path.lexists(dest.path):
        return False
    os.rename(dest.path, dest.aside)
    return True


def _move_in(tmp: Path, dest: Destination) -> None:
    os.rename(tmp, dest.path)


def _restore(dest: Destination) -> None:
    os.rename(dest.aside, dest.path)


def _trash(old: Path) -> Path:
    return old.parent / partial_name(old.name)


def _discard(old: Path) -> None:
    """Delete an old output: renamed to a `.partial-` name first (never restored), then removed.

    Best effort: what a failure or a kill leaves is a stale partial that the next run removes.
    """
    if not os.path.lexists(old):
        return
    trash = _trash(old)
    try:
        os.rename(old, trash)
    except OSError:
        return
    remove_path(trash)
