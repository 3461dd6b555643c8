"""Exceptions the CLI turns into one-line messages and exit codes (2: bad input, 1: a check failed)."""


class Phi3OnnxError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class CheckFailed(Phi3OnnxError):
    """A check ran and failed (e.g. accuracy drift over a limit): exit code 1."""

    exit_code = 1


class UnsafeOutput(Phi3OnnxError):
    """`--output` would overwrite or delete what it must not (the checkpoint, a folder holding it,
    a folder phi3-onnx did not write): exit code 2, before anything is written."""


class OutputExists(UnsafeOutput):
    """The output exists and --force was not given: exit code 2."""


class OutputNotWritable(Phi3OnnxError):
    """The output cannot be written there (unwritable parent, disk full, file too large, read-only
    file system): exit code 2; nothing half-written is left and a previous output is intact."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while the CLI ran (its handlers raise this): exit code 128 + signal.

    A BaseException like KeyboardInterrupt, so `except Exception` paths let it through and every
    `finally` / context manager cleans up on the way out. `detail` says what is on disk when the
    interrupt came after the new output was already in place (set by the output staging).
    """

    def __init__(self, signum: int, detail: str | None = None) -> None:
        super().__init__(signum, detail)
        self.signum = int(signum)
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def with_detail(self, detail: str) -> "Interrupted":
        return Interrupted(self.signum, detail)
