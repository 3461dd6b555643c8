"""CLI verbs for the eval stage (registered on phi3_onnx.cli.app)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from phi3_onnx.cli.app import app, example, write_output
from phi3_onnx.errors import CheckFailed, Phi3OnnxError


class PositionsChoice(str, Enum):
    start = "start"
    long = "long"


@app.command("eval", epilog=example(
    "phi3-onnx eval out/tiny-int4 --reference out/tiny-fp32-cpu --data tests/assets/corpus/heldout.txt",
    "phi3-onnx eval out/bundle --data tests/assets/corpus/heldout.txt    # a bundle with fp32-cpu: its reference"))
def eval_(
    package: Annotated[Path, typer.Argument(help="A package folder, or a bundle (folder of variant folders)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="UTF-8 text file to evaluate on")],
    reference: Annotated[Optional[str], typer.Option("--reference", "-r", help="Reference: a package folder (e.g. the fp32-cpu export) or the original checkpoint (needs the torch extra); default for a bundle: its fp32-cpu variant")] = None,
    max_tokens: Annotated[int, typer.Option(help="Evaluate at most this many tokens (whole windows)")] = 1024,
    window: Annotated[int, typer.Option(help="Tokens per window (each window starts at position 0)")] = 128,
    positions: Annotated[PositionsChoice, typer.Option(help="start: windows of --window; long: windows of 2x the original context (LongRoPE)")] = PositionsChoice.start,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON (docs/eval-json.md); - for stdout")] = None,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Write the report as a Markdown table; - for stdout")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(help="Override: max perplexity increase, percent")] = None,
    max_kl: Annotated[Optional[float], typer.Option(help="Override: max mean KL(ref || variant), nats")] = None,
    min_top1: Annotated[Optional[float], typer.Option(help="Override: min top-1 agreement, 0..1")] = None,
    require_all: Annotated[bool, typer.Option("--require-all", help="Fail when any variant is skipped")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr")] = False,
) -> None:
    """Check quantized variants for accuracy drift against a reference; exit 1 when any is over a limit."""
    from phi3_onnx.evaluate import EvalOptions, LimitOverrides, bundle_reference, evaluate
    from phi3_onnx.evaluate.render import to_markdown, to_text

    _check_numbers(max_tokens, window)
    to_stdout = _stdout_target(json_out, markdown_out)
    limits = LimitOverrides(max_ppl_increase, max_kl, min_top1)
    options = EvalOptions(data, window, max_tokens, positions.value, limits, require_all, progress=not quiet)
    if reference is None:
        reference = str(bundle_reference(package))
        if not quiet:
            print(f"reference: {reference} (the bundle's fp32-cpu variant)", file=sys.stderr)
    report = evaluate(package, reference, options)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(to_text(report), end="", file=sys.stderr if to_stdout else sys.stdout)  # stdout holds the - report alone
    if json_out:
        write_output(json_out, json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    if markdown_out:
        write_output(markdown_out, to_markdown(report))
    if not report.passed:
        raise CheckFailed(report.summary())


def _check_numbers(max_tokens: int, window: int) -> None:
    if max_tokens < 2 or window < 2:
        raise Phi3OnnxError("--max-tokens and --window must be at least 2")


def _stdout_target(json_out: Path | None, markdown_out: Path | None) -> bool:
    """Whether a report goes to stdout (`-`); only one of them can."""
    dashes = [flag for flag, path in (("--json", json_out), ("--markdown", markdown_out)) if str(path) == "-"]
    if len(dashes) > 1:
        raise Phi3OnnxError("--json - and --markdown - cannot both write to stdout; give one of them a file")
    return bool(dashes)


