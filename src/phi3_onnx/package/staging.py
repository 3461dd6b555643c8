"""Writing an output folder safely: a temp folder beside it, renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from phi3_onnx.errors import Phi3OnnxError


def temp_folder_for(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def refuse_existing(output: Path, force: bool) -> None:
    """Checked before any slow work starts, and again when the folder is staged."""
    if output.exists() and not force:
        raise Phi3OnnxError(f"output {output} exists; pass --force to replace it")


@contextmanager
def staged_folder(output: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside `output`, renamed into place on success and removed on any error."""
    refuse_existing(output, force)
    tmp = temp_folder_for(output)
    try:
        yield tmp
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
