"""CLI verbs of the export stage: `export` and `targets`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from phi3_onnx.cli.app import app, example, human_bytes, human_count, write_json
from phi3_onnx.targets import TARGETS

TARGET_HELP = "Target from the registry: " + ", ".join(TARGETS)


@app.command(epilog=example(
    "phi3-onnx export --model tests/assets/tiny-phi3 --target int4-cpu --output out/tiny-int4",
    "phi3-onnx export -m microsoft/Phi-3-mini-4k-instruct -t int4-cpu -t fp32-cpu -o phi3-bundle --dry-run"))
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hugging Face hub id (owner/name)")],
    target: Annotated[list[str], typer.Option("--target", "-t", help=TARGET_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Package folder to write")],
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists")] = False,
    max_length: Annotated[Optional[int], typer.Option(help="genai search.max_length (KV cache size); default min(context, 4096)")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="int4 block size (power of two >= 16)")] = None,
    accuracy_level: Annotated[Optional[int], typer.Option(help="MatMulNBits accuracy_level 0..4 (4 = int8 compute)")] = None,
    quantize_embedding: Annotated[bool, typer.Option("--quantize-embedding", help=(
        "int4 targets: store the embedding table in int4 too (GatherBlockQuantized; a smaller package, same RSS on CPU). "
        "Tied models (Phi-4-mini) always share one int4 table with lm_head"))] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be written and the memory estimate")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output")] = False,
    calibration: Annotated[Optional[Path], typer.Option(help="AWQ targets: calibration text file (default: the built-in one)")] = None,
    calibration_samples: Annotated[Optional[int], typer.Option(help="AWQ targets: calibration sequences of 256 tokens (default 8)")] = None,
    context_length: Annotated[Optional[int], typer.Option(help=(
        "Cap the package's context (default: the model's). Phi-3-mini-4k at <= 2047 needs no sliding "
        "window in the graph: faster CUDA decode"))] = None,
    tiktoken: Annotated[Path | None, typer.Option(help=(
        "Phi-3-small: the cl100k_base .tiktoken BPE ranks (default: a *.tiktoken file in the checkpoint, else tiktoken's cache)"))] = None,
) -> None:
    """Export a Phi-3 checkpoint to an ONNX Runtime package (several --target: a bundle, one folder each)."""
    from phi3_onnx.package import CalibrationOptions, ExportOptions, export_bundle, pipeline

    options = ExportOptions(
        max_length=max_length, context_length=context_length, block_size=block_size, accuracy_level=accuracy_level,
        quantize_embedding=quantize_embedding or None,
        calibration=CalibrationOptions(str(calibration) if calibration else None, calibration_samples),
        tiktoken=str(tiktoken) if tiktoken else None,
    )
    if dry_run:
        for plan in pipeline.dry_run(model, target, output, options, force=force):
            _print_plan(plan)
        return
    if len(target) > 1:
        path = export_bundle(model, target, output, options, force=force, progress=not quiet)
        typer.echo(f"wrote bundle {path} ({', '.join(target)})")
        return
    path = pipeline.export(model, target[0], output, options, force=force, progress=not quiet)
    typer.echo(f"wrote {path}")


def _print_plan(plan) -> None:
    typer.echo(f"model:      {plan.source} ({human_count(plan.spec.num_params())} parameters)")
    typer.echo(f"target:     {plan.target.name} ({plan.target.description})")
    typer.echo(f"output:     {plan.output}")
    typer.echo(f"files:      {', '.join(plan.files)}")
    typer.echo(f"weights:    {human_bytes(plan.weight_bytes)} in model.onnx.data")
    typer.echo(f"max_length: {plan.max_length}")
    window = plan.spec.attention_window
    typer.echo(f"context:    {plan.spec.max_position_embeddings} tokens, " + (f"sliding window {window}" if window else "no sliding window"))
    awq = f", of which AWQ calibration ~{human_bytes(plan.awq_ram_bytes)}" if plan.awq_ram_bytes else ""
    typer.echo(f"peak RAM:   ~{human_bytes(plan.peak_ram_bytes)} (estimate{awq})")


@app.command(epilog=example("phi3-onnx targets", "phi3-onnx targets --json - | python -m json.tool"))
def targets(
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the registry as JSON to this file (- for stdout)")] = None,
) -> None:
    """List the registered targets."""
    from rich.console import Console

    if json_out is not None:
        write_json({"targets": [t.to_dict() for t in TARGETS.values()]}, json_out)
        if str(json_out) == "-":
            return
    from rich.table import Table

    table = Table("target", "provider", "weights", "activations", "block", "description")
    for t in TARGETS.values():
        block = str(t.quant.block_size) if t.quant else "-"
        table.add_row(t.name, t.provider, f"{t.weight_dtype} {t.quant.method if t.quant else ''}".strip(), t.io_dtype, block, t.description)
    Console(width=max(100, Console().width)).print(table)
