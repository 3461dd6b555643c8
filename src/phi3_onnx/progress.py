"""Progress reporting: rich bars on a terminal, a few plain lines otherwise (CI logs), nothing when quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def task(description: str, total: int, enabled: bool = True, pipe_lines: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, total=None)` (a total given there replaces `total`: the work turned out to be that
    many steps); shows a rich bar on a TTY, start/end lines on a pipe (unless pipe_lines=False)."""
    if not enabled:
        yield lambda n=1, total=None: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:  # stdout stays the result
            tid = bar.add_task(description, total=total)
            yield lambda n=1, total=None: bar.update(tid, advance=n, total=total)
        return
    if not pipe_lines:
        yield lambda n=1, total=None: None
        return
    t0 = time.perf_counter()
    print(f"{description} ...", file=sys.stderr, flush=True)
    yield lambda n=1, total=None: None
    print(f"{description}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
