"""The `phi3-onnx` command: parses arguments and calls library functions, nothing else.

Exit codes: 0 ok, 1 a check failed, 2 bad input or usage. Errors are one line on stderr;
set PHI3_ONNX_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.targets import TARGETS

app = typer.Typer(
    name="phi3-onnx",
    help="Export Phi-3 checkpoints to ONNX Runtime packages, run and check them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TARGET_HELP = "Target from the registry: " + ", ".join(TARGETS)


@app.command()
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hugging Face hub id (owner/name)")],
    target: Annotated[list[str], typer.Option("--target", "-t", help=TARGET_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Package folder to write")],
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists")] = False,
    max_length: Annotated[Optional[int], typer.Option(help="genai search.max_length (KV cache size); default min(context, 4096)")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="int4 block size (power of two >= 16)")] = None,
    accuracy_level: Annotated[Optional[int], typer.Option(help="MatMulNBits accuracy_level 0..4 (4 = int8 compute)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be written and the memory estimate")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output")] = False,
    calibration: Annotated[Optional[Path], typer.Option(help="AWQ targets: calibration text file (default: the built-in one)")] = None,
    calibration_samples: Annotated[Optional[int], typer.Option(help="AWQ targets: calibration sequences of 256 tokens (default 8)")] = None,
    context_length: Annotated[Optional[int], typer.Option(help=(
        "Cap the package's context (default: the model's). Phi-3-mini-4k at <= 2047 needs no sliding "
        "window in the graph: faster CUDA decode"))] = None,
) -> None:
    """Export a Phi-3 checkpoint to an ONNX Runtime package (several --target: a bundle, one folder each)."""
    from phi3_onnx.exporters import package

    if dry_run:
        for name in target:
            plan, _ = package.plan_export(model, name, output / name if len(target) > 1 else output,
                                          max_length=max_length, block_size=block_size, accuracy_level=accuracy_level,
                                          context_length=context_length)
            _print_plan(plan)
        return
    if len(target) > 1:
        from phi3_onnx.exporters.bundle import export_bundle

        path = export_bundle(model, target, output, force=force, max_length=max_length, block_size=block_size,
                             accuracy_level=accuracy_level, progress=not quiet, context_length=context_length,
                             calibration=str(calibration) if calibration else None, calibration_samples=calibration_samples)
        typer.echo(f"wrote bundle {path} ({', '.join(target)})")
        return
    path = package.export(model, target[0], output, force=force, max_length=max_length, block_size=block_size,
                          accuracy_level=accuracy_level, progress=not quiet, context_length=context_length,
                          calibration=str(calibration) if calibration else None, calibration_samples=calibration_samples)
    typer.echo(f"wrote {path}")


def _print_plan(plan) -> None:
    gib = 2**30
    typer.echo(f"model:      {plan.source} ({plan.spec.num_params() / 1e9:.2f}B parameters)")
    typer.echo(f"target:     {plan.target.name} ({plan.target.description})")
    typer.echo(f"output:     {plan.output}")
    typer.echo(f"files:      {', '.join(plan.files)}")
    typer.echo(f"weights:    {plan.weight_bytes / gib:.2f} GiB in model.onnx.data")
    typer.echo(f"max_length: {plan.max_length}")
    window = plan.spec.attention_window
    typer.echo(f"context:    {plan.spec.max_position_embeddings} tokens, " + (f"sliding window {window}" if window else "no sliding window"))
    typer.echo(f"peak RAM:   ~{plan.peak_ram_bytes / gib:.1f} GiB (estimate)")


@app.command()
def targets() -> None:
    """List the registered targets."""
    from rich.console import Console
    from rich.table import Table

    table = Table("target", "provider", "weights", "activations", "block", "description")
    for t in TARGETS.values():
        block = str(t.quant.block_size) if t.quant else "-"
        table.add_row(t.name, t.provider, f"{t.weight_dtype} {t.quant.method if t.quant else ''}".strip(), t.io_dtype, block, t.description)
    Console(width=max(100, Console().width)).print(table)


# Verbs of other stages live in their own modules and register on `app` when imported.
from phi3_onnx import cli_eval, cli_runtime, cli_serve  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and the documented exit codes."""
    try:
        app(args=argv, standalone_mode=False)
    except Phi3OnnxError as exc:
        if os.environ.get("PHI3_ONNX_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        return _click_exit(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 2
    return 0


def _click_exit(exc: Exception) -> int:
    """Map typer's (vendored click) exceptions to exit codes; anything else is an internal error."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "Exit" in names:
        return int(getattr(exc, "exit_code", 0))
    if "Abort" in names:
        print("aborted", file=sys.stderr)
        return 2
    if "UsageError" in names:
        print(f"error: {exc.format_message()}".replace("\n", " "), file=sys.stderr)
        return 2
    if os.environ.get("PHI3_ONNX_DEBUG"):
        raise exc
    msg = str(exc).splitlines()[0] if str(exc) else ""
    print(f"error: internal {type(exc).__name__}: {msg} (set PHI3_ONNX_DEBUG=1 for a traceback)", file=sys.stderr)
    return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
