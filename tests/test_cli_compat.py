"""The help's metavars on older typer releases (no `type_descriptor`: the GPU machine's typer had none,
and every verb failed there with `internal AttributeError`): click's own types are read instead."""

from __future__ import annotations

import importlib

import click
import pytest

app_module = importlib.import_module("phi3_onnx.cli.app")


class _OldTyperOption:
    """What an option looks like to the help code on a typer without type descriptors."""

    is_flag = False

    def __init__(self, kind: click.ParamType) -> None:
        self.type = kind


@pytest.mark.parametrize(("kind", "metavar"), [
    (click.INT, "INTEGER"), (click.FLOAT, "FLOAT"), (click.STRING, "TEXT"), (click.Path(), "PATH"),
    (click.Choice(["off", "ngram"]), "[off|ngram]"),
])
def test_metavar_without_type_descriptor(kind, metavar) -> None:
    assert not hasattr(_OldTyperOption(kind), "type_descriptor")
    assert app_module._metavar(_OldTyperOption(kind)) == metavar
