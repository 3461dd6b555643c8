"""The `phi3-onnx` command: parses arguments and calls library functions, nothing else.

One module per verb group registers its commands on `phi3_onnx.cli.app.app`; this module imports
them (VERB_MODULES) and runs the app. Exit codes: 0 ok, 1 a check failed, 2 bad input or usage, 130 SIGINT, 143 SIGTERM.
Errors are one line on stderr; set PHI3_ONNX_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from phi3_onnx.cli.app import app
from phi3_onnx.errors import Interrupted, Phi3OnnxError
from phi3_onnx.safety import signals_raise

VERB_MODULES = ("export", "runtime", "eval", "serve", "bench")
for _name in VERB_MODULES:
    importlib.import_module(f"phi3_onnx.cli.{_name}")


# What is on disk after an interrupt, per verb (the output staging says so when it differs).
INTERRUPTED = {
    "export": "nothing written; any previous output intact",
    "eval": "no verdict; no report written; temporary files removed",
    "generate": "generation stopped; nothing written",
    "chat": "chat stopped; nothing written",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and the documented exit codes (SIGINT 130, SIGTERM 143)."""
    with signals_raise():
        try:
            return _dispatch(argv)
        except Interrupted as exc:
            return _interrupted(exc, argv)
        except KeyboardInterrupt:  # raised before our handlers were in place, or by a library
            return _interrupted(Interrupted(signal.SIGINT), argv)


def _dispatch(argv: list[str] | None) -> int:
    try:
        app(args=argv, prog_name="phi3-onnx", standalone_mode=False)
    except Phi3OnnxError as exc:
        if os.environ.get("PHI3_ONNX_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        return _click_exit(exc)
    return 0


def _interrupted(exc: Interrupted, argv: list[str] | None) -> int:
    """One line naming the verb, the signal and what is on disk; exit 128 + the signal number."""
    args = sys.argv[1:] if argv is None else argv
    verb = next((a for a in args if not a.startswith("-")), "phi3-onnx")
    detail = exc.detail or INTERRUPTED.get(verb, "nothing written")
    print(f"interrupted: {verb} by {exc.signal_name} ({detail})", file=sys.stderr, flush=True)
    return exc.exit_code


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
