"""Exceptions the CLI turns into one-line messages and exit codes (2: bad input, 1: a check failed)."""


class Phi3OnnxError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class CheckFailed(Phi3OnnxError):
    """A check ran and failed (e.g. accuracy drift over a limit): exit code 1."""

    exit_code = 1
