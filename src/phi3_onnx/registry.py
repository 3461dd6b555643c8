"""Registries as data: a name -> item table built once, refusing a duplicate name (never silently skipped)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def registry(items: Iterable[T], key: Callable[[T], str], what: str) -> dict[str, T]:
    """{key(item): item} in the given order; a second item with the same key is a ValueError."""
    table: dict[str, T] = {}
    for item in items:
        name = key(item)
        if name in table:
            raise ValueError(f"duplicate {what} {name}")
        table[name] = item
    return table
