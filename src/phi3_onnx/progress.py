"""Progress reporting: rich bars on a terminal, a few plain lines otherwise (CI logs), nothing when quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def task(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; shows a rich bar on a TTY, start/end lines on a pipe."""
    if not enabled:
        yield lambda n=1: None
        return
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)
        return
    t0 = time.perf_counter()
    print(f"{description} ...", file=sys.stderr, flush=True)
    yield lambda n=1: None
    print(f"{description}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
