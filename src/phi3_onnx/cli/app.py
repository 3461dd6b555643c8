"""The one Typer application every verb module registers on (`@app.command()`); it imports no verb."""

from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(
    name="phi3-onnx",
    help="Export Phi-3 checkpoints to ONNX Runtime packages, run and check them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def warnings_to_stderr() -> None:
    """The runtime logs its one-line EP fallback warning; show it as `warning: ...`."""
    logger = logging.getLogger("phi3_onnx")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (not the one at setup time), one line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
