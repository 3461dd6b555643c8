"""CLI verb `serve` (registered on phi3_onnx.cli.app): argument parsing only; see phi3_onnx.serve."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from phi3_onnx.cli.app import app, example, warnings_to_stderr
from phi3_onnx.errors import Phi3OnnxError


class Speculative(str, Enum):
    ngram = "ngram"


@app.command(epilog=example("phi3-onnx serve out/tiny-int4 --port 8000",
                            'phi3-onnx serve phi3-mini-bundle --host 0.0.0.0 --api-key "$KEY" --max-batch 8'))
def serve(
    pkg: Annotated[Path, typer.Argument(help="Package folder or bundle folder (from `phi3-onnx export`)")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback warns without --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port)")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="PHI3_ONNX_API_KEY", help="Require `Authorization: Bearer KEY`")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | dml (auto: CUDA > DirectML > CPU)")] = "auto",
    variant: Annotated[Optional[str], typer.Option(help="Bundle variant (target name) instead of the best for this device")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="KV cache size per request (default: the package's max_length)")] = None,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together in one batch (genai Engine slots)")] = 8,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted")] = 1 << 20,
    speculative: Annotated[Optional[Speculative], typer.Option(help=(
        "ngram: n-gram speculative decoding on every request (each on its own genai Generator, at most "
        "--max-batch at once, instead of the batching engine, which verifies no drafts); greedy answers unchanged"))] = None,
) -> None:
    """Serve a package over an OpenAI-compatible HTTP API (needs the [serve] extra)."""
    try:
        from phi3_onnx.serve.options import ServeOptions
        from phi3_onnx.serve.server import serve as run_server
    except ImportError as exc:
        raise Phi3OnnxError(f"serve needs the [serve] extra: pip install -e \".[cpu,serve]\" ({exc.name} is missing)") from None
    from phi3_onnx.runtime import load

    options = ServeOptions(host=host, port=port, api_key=api_key, max_body_bytes=max_body_bytes)
    warnings_to_stderr()
    spec = speculative.value if speculative is not None else None
    model = load(pkg, device=device, max_length=max_length, variant=variant, max_batch=max_batch, speculative=spec)
    if warning := options.exposure_warning():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"serving {model.path.name} ({model.manifest.target.name} on {model.provider}, batch {max_batch}) "
          f"on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    run_server(model, options)
