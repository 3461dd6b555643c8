"""CLI verb for the bench stage (registered on phi3_onnx.cli.app): `phi3-onnx bench PKG|BUNDLE`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from phi3_onnx.cli.app import app


@app.command()
def bench(
    package: Annotated[Path, typer.Argument(help="Package folder or bundle folder (every variant, or --variant)")],
    prompt_tokens: Annotated[str, typer.Option(help="Prompt lengths, comma-separated: one row each")] = "16,512",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run (the first one ends time to first token)")] = 128,
    repeats: Annotated[int, typer.Option(help="Rounds; each loads every variant afresh, variants alternating")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (0 = all physical cores; default: the package's setting, else all physical cores on CPU)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | dml")] = "auto",
    variant: Annotated[Optional[list[str]], typer.Option(help="Bundle variant to run (repeatable; default: all)")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the JSON report to FILE ('-' = stdout)")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Draw decode/prefill tokens/s to FILE.png (needs phi3-onnx[bench])")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Measure decode and prefill tokens/s, time to first token, peak RSS and load time, llama-bench style."""
    from phi3_onnx.bench import BenchOptions, bench as run_bench, parse_lengths, total_runs
    from phi3_onnx.bench.report import plot as draw, print_table, require_matplotlib
    from phi3_onnx.errors import CheckFailed
    from phi3_onnx.progress import task

    options = BenchOptions(prompt_tokens=parse_lengths(prompt_tokens), new_tokens=new_tokens, repeats=repeats,
                           threads=threads, device=device, variants=tuple(variant or ()))
    if plot is not None:
        require_matplotlib()  # before minutes of timing, not after
    with task("Benchmarking", total_runs(package, options), enabled=not quiet) as advance:
        doc = run_bench(package, options, advance)
    table_to = sys.stderr if json_out == "-" else sys.stdout
    print_table(doc, table_to)
    if json_out == "-":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif json_out:
        Path(json_out).write_text(json.dumps(doc, indent=2) + "\n")
    if plot is not None:
        draw(doc, plot)
    failed = [r["variant"] for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        raise CheckFailed(f"variant {failed[0]} failed: {next(r['error'] for r in doc['rows'] if r['status'] != 'ok')}")
