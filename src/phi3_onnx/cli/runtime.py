"""CLI verbs for the runtime stage (registered on phi3_onnx.cli.app): generate, chat, info.

Argument parsing only; everything else is `phi3_onnx.runtime`.
"""

from __future__ import annotations

import sys
from enum import Enum
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from phi3_onnx.cli.app import app, example, human_bytes, human_count, warnings_to_stderr, write_json
from phi3_onnx.safety import pause_point

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
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON to this file (- for stdout)")]


class SpeculativeChoice(str, Enum):
    off = "off"
    ngram = "ngram"


Speculative = Annotated[SpeculativeChoice, typer.Option(help=(
    "ngram: n-gram speculative decoding (drafts looked up in the text so far, verified in one step; "
    "greedy output unchanged). Draft statistics go to stderr"))]


def _load(pkg: Path, device: str, verify: bool, max_length: Optional[int], variant: Optional[str],
          speculative: SpeculativeChoice = SpeculativeChoice.off, threads: Optional[int] = None):
    from phi3_onnx.runtime import load

    warnings_to_stderr()
    return load(pkg, device=device, verify=verify, max_length=max_length, variant=variant, speculative=speculative.value,
                threads=threads)


@app.command(epilog=example(
    'phi3-onnx generate out/tiny-int4 --prompt "What does os.path.join do?" --max-new-tokens 40',
    'phi3-onnx generate out/tiny-int4 -p "The committee reviewed" --raw --json -'))
def generate(
    pkg: Pkg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text")],
    raw: Annotated[bool, typer.Option("--raw", help="Complete the text as is (no chat template)")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message (chat template only)")] = None,
    max_new_tokens: MaxNew = 256, temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 0,
    seed: Seed = None, stop: Stop = None, device: Device = "auto", max_length: MaxLength = None,
    variant: Variant = None, verify: Verify = False, json_out: JsonOut = None,
    speculative: Speculative = SpeculativeChoice.off, threads: Threads = None,
) -> None:
    """Generate from one prompt (as a user chat turn unless --raw), streaming the text to stdout and why it
    stopped to stderr (`stopped: <|end|>`, `stopped: length (max_new_tokens 256)`, ...)."""
    from phi3_onnx.runtime.model import Finish
    from phi3_onnx.runtime.options import GenerationOptions

    options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, stop)
    model = _load(pkg, device, verify, max_length, variant, speculative, threads)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    finish, t0 = Finish(), time.perf_counter()
    pieces = model.stream(prompt if raw else messages, options.max_new_tokens, options.temperature,
                          options.top_p, options.top_k, options.seed, options.stop, finish=finish)
    to_stdout = json_out is None or str(json_out) != "-"  # --json -: stdout holds the JSON document only
    parts = []
    for piece in pieces:
        parts.append(_echo(piece) if to_stdout else piece)
        pause_point("generate:stream")
    text = "".join(parts)
    seconds = time.perf_counter() - t0
    if to_stdout:
        sys.stdout.write("\n")
    print(f"stopped: {_stop_line(finish)}", file=sys.stderr)
    if finish.speculative is not None:
        print(f"speculative: {_speculative_line(finish.speculative)}", file=sys.stderr)
    if json_out is not None:
        write_json(_generation_doc(model, text, finish, seconds), json_out)


def _echo(piece: str) -> str:
    sys.stdout.write(piece)
    sys.stdout.flush()
    return piece


def _stop_line(finish: Any) -> str:
    """`length (max_length 4096)`, `<|end|>`, `stop string 'THE END'`."""
    if finish.reason in ("max_new_tokens", "max_length"):
        return f"length ({finish.detail})"
    if finish.reason == "stop_string":
        return f"stop string {finish.detail!r}"
    return finish.detail or "end"


def _speculative_line(stats: dict[str, Any]) -> str:
    """`ngram, 120 draft tokens proposed, 81 accepted (67.5 %), 1.9 tokens per verify step`."""
    proposed, accepted = int(stats.get("draft_tokens_proposed", 0)), int(stats.get("draft_tokens_accepted", 0))
    rate = f" ({100 * accepted / proposed:.1f} %)" if proposed else ""
    per_round = float(stats.get("mean_emitted_tokens_per_round", 0.0))
    return f"ngram, {proposed} draft tokens proposed, {accepted} accepted{rate}, {per_round:.2f} tokens per verify step"


def _generation_doc(model: Any, text: str, finish: Any, seconds: float) -> dict[str, Any]:
    return {
        "text": text, "finish_reason": finish.finish_reason, "stopped_by": finish.reason, "stop_detail": finish.detail,
        "prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
        "seconds": round(seconds, 4), "tokens_per_second": round(finish.completion_tokens / seconds, 2) if seconds > 0 else None,
        "package": str(model.path), "target": model.manifest.target.name, "provider": model.provider,
        "speculative": finish.speculative,
    }


CHAT_COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation (keeps --system)",
                 "/exit": "quit (also /quit, or end of input: Ctrl-D)"}


@app.command(epilog=example('phi3-onnx chat out/tiny-int4 --system "You are terse."',
                            'printf "What is a compiler?\\n/reset\\nAnd a linker?\\n" | phi3-onnx chat out/tiny-int4'))
def chat(
    pkg: Pkg,
    system: Annotated[Optional[str], typer.Option(help="System message")] = None,
    max_new_tokens: MaxNew = 512, temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 0,
    seed: Seed = None, device: Device = "auto", max_length: MaxLength = None,
    variant: Variant = None, verify: Verify = False, speculative: Speculative = SpeculativeChoice.off,
    threads: Threads = None,
) -> None:
    """Interactive multi-turn chat, streaming replies to stdout; /help lists the commands (/reset, /exit).
    The banner and command replies go to stderr, so piped output holds only the model's replies."""
    from phi3_onnx.runtime.options import GenerationOptions

    options = GenerationOptions.build(max_new_tokens, temperature, top_p, top_k, seed, None)
    model = _load(pkg, device, verify, max_length, variant, speculative, threads)
    options.check_vocab(model.manifest.model.vocab_size)  # bad options end the command, not each turn
    session = model.chat(system)
    interactive = sys.stdin.isatty()
    _note(f"{model.manifest.source} ({model.manifest.target.name}) on {model.provider}; /help for commands, /exit to quit")
    while (line := _read_turn(interactive)) is not None:
        if _is_command(line):
            _run_command(line, session)
            continue
        _chat_turn(session, line, options)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _is_command(line: str) -> bool:
    """`/word` alone is a command; text that merely starts with a slash (`/usr/bin is?`) goes to the model."""
    return line.startswith("/") and " " not in line


def _run_command(line: str, session: Any) -> None:
    if line == "/help":
        _note("\n".join(f"  {name:<7} {what}" for name, what in CHAT_COMMANDS.items()))
    elif line == "/reset":
        session.reset()
        _note("conversation reset")
    else:
        _note(f"unknown command {line}; /help lists the commands")


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


@app.command(epilog=example("phi3-onnx info out/tiny-int4 --verify", "phi3-onnx info phi3-mini-bundle --json -"))
def info(pkg: Pkg, device: Device = "auto", variant: Variant = None, verify: Verify = False,
         json_out: JsonOut = None) -> None:
    """Print the package (or bundle) summary and the execution provider `load` would choose, and why."""
    from phi3_onnx.runtime import plan_load

    plan = plan_load(pkg, device=device, verify=verify, variant=variant)
    if json_out is not None:
        write_json(_info_doc(pkg, plan, verify), json_out)
        if str(json_out) == "-":
            return
    m, t = plan.package.manifest, plan.package.manifest.target
    if plan.variants:
        typer.echo(f"bundle:     {pkg} ({len(plan.variants)} variants: {', '.join(v.name for v in plan.variants)})")
        typer.echo(f"variant:    {plan.variant}")
    typer.echo(f"package:    {plan.package.path}")
    typer.echo(f"model:      {m.source} ({human_count(m.model.num_params())} parameters, {m.model.num_layers} layers, "
               f"context {m.model.max_position_embeddings}{', LongRoPE' if m.model.longrope else ''})")
    typer.echo(f"target:     {t.name} ({t.description})")
    typer.echo(f"weights:    {t.weight_dtype} {t.quant.method if t.quant else ''}".rstrip() + f", activations {t.io_dtype}")
    typer.echo(f"max_length: {m.max_length}")
    typer.echo(f"requires:   {', '.join(f'{k}>={v}' for k, v in sorted(m.requires.items()))}")
    typer.echo(f"built with: {', '.join(f'{k} {v}' for k, v in sorted(m.tool_versions.items()))}")
    typer.echo(f"files:      {len(m.files)}, {human_bytes(sum(f.size for f in m.files.values()))}"
               f" ({'sizes and sha256 checked' if verify else 'sizes checked'})")
    typer.echo(f"available:  {', '.join(plan.environment.providers)}")
    typer.echo(f"provider:   {plan.choice.provider} — {plan.choice.reason}")
    if plan.choice.warning:
        typer.echo(f"warning:    {plan.choice.warning}")


def _info_doc(pkg: Path, plan: Any, verify: bool) -> dict[str, Any]:
    """`info --json`: the same facts as the text form."""
    m = plan.package.manifest
    return {
        "path": str(pkg), "package": str(plan.package.path),
        "bundle": {"variant": plan.variant, "variants": [v.name for v in plan.variants]} if plan.variants else None,
        "source": m.source, "parameters": m.model.num_params(), "layers": m.model.num_layers,
        "context_length": m.model.max_position_embeddings, "longrope": m.model.longrope is not None,
        "target": m.target.to_dict(), "max_length": m.max_length, "requires": dict(sorted(m.requires.items())),
        "tool_versions": dict(sorted(m.tool_versions.items())), "files": len(m.files),
        "bytes": sum(f.size for f in m.files.values()), "sha256_checked": verify,
        "available_providers": list(plan.environment.providers),
        "provider": plan.choice.provider, "reason": plan.choice.reason, "warning": plan.choice.warning,
    }
