"""The one Typer application every verb module registers on (`@app.command()`); it imports no verb.

Help reads like a plain click CLI's: metavars PATH / TEXT / INTEGER / FLOAT / [a|b] after options
that take a value, none after flags, `Usage: phi3-onnx VERB [OPTIONS] PKG`. `phi3-onnx` with no
command prints the help and exits 0; `--version`; `--install-completion` / `--show-completion`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand

from phi3_onnx.version import __version__

_TYPE_METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}


def _metavar(param: Any) -> str:
    """click's names for a value: PATH, TEXT, INTEGER, FLOAT, [a|b]; "" for a flag; an argument's own name."""
    if isinstance(param, TyperArgument):
        return param.name.upper()
    if getattr(param, "is_flag", False):
        return ""
    desc = getattr(param, "type_descriptor", None)
    if desc is None:  # typer before type descriptors: read click's own type
        return _click_metavar(param)
    if desc.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices or ()) + "]"
    if desc.is_path:
        return "FILE" if desc.is_file else "PATH"
    annotation = desc.annotation
    if desc.is_list:
        annotation = getattr(annotation, "__args__", (str,))[0]
    return _TYPE_METAVARS.get(annotation, "TEXT")


def _click_metavar(param: Any) -> str:
    kind = getattr(param, "type", None)
    choices = getattr(kind, "choices", None)
    if choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
    name = str(getattr(kind, "name", "text")).lower()
    return {"integer": "INTEGER", "float": "FLOAT", "boolean": "BOOLEAN", "path": "PATH", "file": "FILE"}.get(name, "TEXT")


class Command(TyperCommand):
    """A verb whose help shows click-style metavars and a plain usage line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            param.metavar = _metavar(param)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """click's two sections; an argument is listed by its name alone (no `<path>` type tag)."""
        params = [(p, p.get_help_record(ctx)) for p in self.get_params(ctx)]
        args = [(p.metavar, rec[1]) for p, rec in params if rec and isinstance(p, TyperArgument)]
        opts = [rec for p, rec in params if rec and not isinstance(p, TyperArgument)]
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        args = [p.metavar if p.required else f"[{p.metavar}]" for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        return [self.options_metavar or "", *args]


class _App(typer.Typer):
    def command(self, *args: Any, cls: type = Command, **kwargs: Any) -> Any:  # every verb gets Command
        return super().command(*args, cls=cls, **kwargs)


app = _App(
    name="phi3-onnx",
    help="Export Phi-3 checkpoints to ONNX Runtime packages, run and check them.",
    epilog="Run `phi3-onnx COMMAND --help` for a command's options and an example.",
    rich_markup_mode=None,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"phi3-onnx {__version__}")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(None, "--version", is_eager=True, callback=_print_version,
                                           help="Print the version and exit"),
) -> None:
    """Export Phi-3 checkpoints to ONNX Runtime packages, run and check them."""
    if ctx.invoked_subcommand is None:  # no command: the help, exit 0 (as git's and docker's `help` do)
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def example(*lines: str) -> str:
    """A verb's epilog: its example command lines, kept as written (click's \\b: no rewrapping)."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


def human_count(n: float) -> str:
    """3.4M, 3.82B, 512K: a parameter count at a glance."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{2 if suffix == 'B' else 1}f}{suffix}"
    return str(int(n))


def human_bytes(n: float) -> str:
    """6.5 MiB, 2.13 GiB, 512 B (binary units)."""
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.{2 if suffix == 'GiB' else 1}f} {suffix}"
    return f"{int(n)} B"


def write_json(doc: Any, dest: Path) -> None:
    """`--json FILE` writes the document there; `--json -` to stdout."""
    write_output(dest, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_output(dest: Path, text: str) -> None:
    """A report for `--json/--markdown FILE`: written whole or not at all; `-` is stdout."""
    from phi3_onnx.errors import Phi3OnnxError
    from phi3_onnx.safety import write_text_atomic

    if str(dest) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dest, text)
    except OSError as exc:
        raise Phi3OnnxError(f"cannot write {dest} ({exc.strerror})") from None


def warnings_to_stderr() -> None:
    """The runtime logs its one-line EP fallback warning; show it as `warning: ...`."""
    logger = logging.getLogger("phi3_onnx")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (not the one at setup time), one line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
