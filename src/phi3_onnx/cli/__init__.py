"""The `phi3-onnx` command: parses arguments and calls library functions, nothing else.

One module per verb group registers its commands on `phi3_onnx.cli.app.app`; this module imports
them (VERB_MODULES) and runs the app. Exit codes: 0 ok, 1 a check failed, 2 bad input or usage.
Errors are one line on stderr; set PHI3_ONNX_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

from phi3_onnx.cli.app import app
from phi3_onnx.errors import Phi3OnnxError

VERB_MODULES = ("export", "runtime", "eval", "bench")
for _name in VERB_MODULES:
    importlib.import_module(f"phi3_onnx.cli.{_name}")


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
