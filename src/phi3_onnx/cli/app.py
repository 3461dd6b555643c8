"""The one Typer application every verb module registers on (`@app.command()`); it imports no verb."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="phi3-onnx",
    help="Export Phi-3 checkpoints to ONNX Runtime packages, run and check them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
