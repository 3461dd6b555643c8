"""CLI verbs for the runtime stage (registered on phi3_onnx.cli.app): generate, chat, info.

Argument parsing only; everything else is `phi3_onnx.runtime`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from phi3_onnx.cli.app import app

Pkg = Annotated[Path, typer.Argument(help="Package folder or bundle folder (from `phi3-onnx export`)")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | dml (auto: CUDA > DirectML > CPU)")]
Variant = Annotated[Optional[str], typer.Option(help="Bundle variant (target name) instead of the best for this device")]
MaxLength = Annotated[Optional[int], typer.Option(help="KV cache size in tokens (default: the package's max_length)")]
Verify = Annotated[bool, typer.Option("--verify", help="Also check every file's sha256 (sizes are always checked)")]
MaxNew = Annotated[int, typer.Option(help="Most tokens to generate")]
Temperature = Annotated[float, typer.Option(help="0 = greedy")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling threshold in (0, 1]")]
TopK = Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = no limit)")]
Seed = Annotated[Optional[int], typer.Option(help="Sampling seed")]
Threads = Annotated[Optional[int], typer.Option(
    help="CPU threads for the model's session (0 = all physical cores; default: the package's setting, else all physical cores on CPU)")]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable); <|end|> and <|endoftext|> always stop")]


def _warnings_to_stderr() -> None:
    """The runtime logs its one-line EP fallback warning; show it as `warning: ...`."""
    logger = logging.getLogger("phi3_onnx")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (not the one at setup time), one line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _load(pkg: Path, device: str, verify: bool, max_length: Optional[int], variant: Optional[str],
          threads: Optional[int] = None):
    from phi3_onnx.runtime import load

    _warnings_to_stderr()
    return load(pkg, device=device, verify=verify, max_length=max_length, variant=variant, threads=threads)


@app.command()
def generate(
    pkg: Pkg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text")],
    raw: Annotated[bool, typer.Option("--raw", help="Complete the text as is (no chat template)")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message (chat template only)")] = None,
    max_new_tokens: MaxNew = 256, temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 0,
    seed: Seed = None, stop: Stop = None, device: Device = "auto", max_length: MaxLength = None,
    variant: Variant = None, verify: Verify = False, threads: Threads = None,
) -> None:
    """Generate from one prompt (as a user chat turn unless --raw), streaming to stdout."""
    from phi3_onnx.runtime.options import GenerationOptions

    options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop)
    model = _load(pkg, device, verify, max_length, variant, threads)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    pieces = model.stream(prompt if raw else messages, options.max_new_tokens, options.temperature,
                          options.top_p, options.top_k, options.seed, options.stop)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    pkg: Pkg,
    system: Annotated[Optional[str], typer.Option(help="System message")] = None,
    max_new_tokens: MaxNew = 512, temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 0,
    seed: Seed = None, device: Device = "auto", max_length: MaxLength = None,
    variant: Variant = None, verify: Verify = False, threads: Threads = None,
) -> None:
    """Interactive multi-turn chat, streaming replies; /exit or end of input (Ctrl-D) quits, /reset forgets."""
    from phi3_onnx.runtime.options import GenerationOptions

    options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, None)
    model = _load(pkg, device, verify, max_length, variant, threads)
    session = model.chat(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{model.manifest.source} ({model.manifest.target.name}) on {model.provider}; /exit to quit, /reset to forget")
    while (line := _read_turn(interactive)) is not None:
        if line == "/reset":
            session.reset()
            continue
        _chat_turn(session, line, options)


def _chat_turn(session, line: str, options) -> None:
    """Stream one reply; a turn that does not fit (conversation over max_length) keeps the session alive."""
    from phi3_onnx.errors import Phi3OnnxError

    try:
        for piece in session.stream(line, options.max_new_tokens, options.temperature, options.top_p,
                                    options.top_k, options.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except Phi3OnnxError as exc:
        print(f"error: {exc} (/reset starts a new conversation)", file=sys.stderr)
        return
    sys.stdout.write("\n")


def _read_turn(interactive: bool) -> Optional[str]:
    """The next non-empty user line, or None on EOF or /exit."""
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return None
        if line in ("/exit", "/quit"):
            return None
        if line:
            return line


@app.command()
def info(pkg: Pkg, device: Device = "auto", variant: Variant = None, verify: Verify = False) -> None:
    """Print the package (or bundle) summary and the execution provider `load` would choose, and why."""
    from phi3_onnx.runtime import plan_load

    plan = plan_load(pkg, device=device, verify=verify, variant=variant)
    m, t = plan.package.manifest, plan.package.manifest.target
    if plan.variants:
        typer.echo(f"bundle:     {pkg} ({len(plan.variants)} variants: {', '.join(v.name for v in plan.variants)})")
        typer.echo(f"variant:    {plan.variant}")
    typer.echo(f"package:    {plan.package.path}")
    typer.echo(f"model:      {m.source} ({m.model.num_params() / 1e6:.1f}M parameters, {m.model.num_layers} layers, "
               f"context {m.model.max_position_embeddings}{', LongRoPE' if m.model.longrope else ''})")
    typer.echo(f"target:     {t.name} ({t.description})")
    typer.echo(f"weights:    {t.weight_dtype} {t.quant.method if t.quant else ''}".rstrip() + f", activations {t.io_dtype}")
    typer.echo(f"max_length: {m.max_length}")
    typer.echo(f"requires:   {', '.join(f'{k}>={v}' for k, v in sorted(m.requires.items()))}")
    typer.echo(f"built with: {', '.join(f'{k} {v}' for k, v in sorted(m.tool_versions.items()))}")
    typer.echo(f"files:      {len(m.files)}, {sum(f.size for f in m.files.values()) / 2**20:.1f} MiB"
               f" ({'sizes and sha256 checked' if verify else 'sizes checked'})")
    typer.echo(f"available:  {', '.join(plan.environment.providers)}")
    typer.echo(f"provider:   {plan.choice.provider} — {plan.choice.reason}")
    if plan.choice.warning:
        typer.echo(f"warning:    {plan.choice.warning}")
