"""One onnxruntime-genai Generator plus the bookkeeping genai leaves to us.

- LongRoPE: the graph rotates each step's keys with short factors while the total length fits
  the original context and long factors past it, but keys already cached keep their rotation.
  transformers' Phi-3 `generate()` recomputes the whole KV cache once when the sequence first
  grows past the original context; genai cannot rewrite its cache, so we rebuild the Generator
  and re-append the full sequence (one prefill) at that step.
- Sliding window (package.window_free): a package may hold a window-free decoder that is exact only
  while the sequence fits the window, and faster. The Generator starts on it and, when the sequence
  would pass the window, is rebuilt the same way on the windowed decoder (exact at any length).
- Multi-turn reuse: a new prompt that extends the cached sequence appends only the new tokens;
  one that diverges rewinds to the common prefix first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from phi3_onnx.errors import Phi3OnnxError


class GenaiGenerator(Protocol):
    """The part of onnxruntime_genai.Generator the wrapper relies on (genai >= 0.6)."""

    def append_tokens(self, tokens: np.ndarray) -> None: ...
    def generate_next_token(self) -> None: ...
    def get_next_tokens(self) -> np.ndarray: ...
    def get_sequence(self, index: int) -> np.ndarray: ...
    def token_count(self) -> int: ...
    def is_done(self) -> bool: ...
    def rewind_to(self, length: int) -> None: ...


@dataclass(frozen=True)
class WindowSwitch:
    """The decoder to move to once a sequence passes `after` tokens (the first one is exact only up to it)."""

    after: int
    model: Callable[[], Any]  # the windowed og.Model (loaded on first use)


class Decoder:
    """Wraps og.Generator; `append` and `next_token` are its only moves. Not thread-safe."""

    def __init__(self, og_model: Any, make_params: Callable[[Any], Any], max_length: int, long_after: int | None,
                 forced: Sequence[int] | None = None, window: WindowSwitch | None = None,
                 speculative: bool = False) -> None:
        self._first_model = og_model
        self.forced = None if forced is None else [int(t) for t in forced]  # an answer emitted without sampling
        self._make_params = make_params  # og.Model -> og.GeneratorParams
        self.max_length = max_length
        self._long_after = long_after  # LongRoPE original context, None for plain RoPE
        self._window = window
        self._speculative = speculative  # a step may add several tokens: ask genai for the length
        self.windowed = False  # running on the windowed decoder (window.model)
        self._length = 0  # tokens in the sequence, kept here: genai's token_count costs a call per step
        self._gen = self._new_generator()
        self._cache_long = False  # cached keys were rotated with long factors
        self._pending = False  # the last sampled token is in the sequence but not yet run
        self.rebuilds = 0  # cache rebuilds so far (LongRoPE boundary or the move to the windowed decoder)
        self.reused = 0  # prompt tokens served from the cache by the last extend_to

    def _new_generator(self) -> GenaiGenerator:
        from phi3_onnx.runtime.deps import import_genai

        model = self._window.model() if self.windowed else self._first_model
        return import_genai().Generator(model, self._make_params(model))

    def tokens(self) -> list[int]:
        return [int(t) for t in self._gen.get_sequence(0)]

    def __len__(self) -> int:
        return self._length

    def _needs_long(self, total: int) -> bool:
        return self._long_after is not None and total > self._long_after

    def _needs_windowed(self, total: int) -> bool:
        return self._window is not None and total > self._window.after and not self.windowed

    def _needs_rebuild(self, total: int) -> bool:
        return bool(self._length) and (self._needs_long(total) != self._cache_long or self._needs_windowed(total))

    def append(self, ids: Sequence[int]) -> None:
        """Run the model over `ids` after the current sequence; rebuild if they cross the LongRoPE boundary."""
        ids = [int(t) for t in ids]
        if not ids:
            return
        total = len(self) + len(ids)
        if total > self.max_length:
            raise Phi3OnnxError(f"prompt needs {total} tokens but the model was loaded with max_length="
                                f"{self.max_length}; shorten it or load with a larger max_length")
        if self._needs_rebuild(total):
            self._rebuild(self.tokens() + ids)
        else:
            if self._needs_windowed(total):  # an empty Generator: start it on the windowed decoder
                self.windowed = True
                self._gen = self._new_generator()
            self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
            self._length = total
            self._cache_long = self._needs_long(total)
        self._pending = False

    def extend_to(self, ids: Sequence[int]) -> int:
        """Make the sequence equal `ids`, reusing the longest cached prefix; returns tokens reused."""
        have = self.tokens()
        common = _common_prefix(have, ids)
        if common == len(ids):  # nothing new to run: recompute the last token for fresh logits
            common = max(common - 1, 0)
        if common < len(have):
            self.rewind(common)
        self.append(ids[common:])
        self.reused = common
        return common

    def rewind(self, length: int) -> None:
        if length == 0:
            self.windowed = False
            self._gen = self._new_generator()
            self._cache_long = False
        else:
            self._gen.rewind_to(length)
        self._length = length
        self._pending = False

    def next_token(self) -> int:
        """Sample one token; run the pending one first (rebuilding at the LongRoPE boundary or the window)."""
        if self._pending and self._needs_rebuild(len(self)):
            self._rebuild(self.tokens())
        self._gen.generate_next_token()
        self._length = int(self._gen.token_count()) if self._speculative else self._length + 1
        self._pending = not self._gen.is_done()
        return int(self._gen.get_next_tokens()[0])

    def speculative_stats(self) -> dict[str, Any]:
        """genai's speculative-decoding counters for this Generator (drafts proposed/accepted, ...)."""
        try:
            return dict(self._gen.get_speculative_stats())
        except (AttributeError, RuntimeError):
            return {}

    def done(self) -> bool:
        return self._length >= self.max_length or bool(self._gen.is_done())

    def _rebuild(self, ids: list[int]) -> None:
        """A fresh Generator over the whole sequence: one prefill, every key rotated alike, on the windowed
        decoder once the sequence passes the window."""
        self.windowed = self.windowed or self._needs_windowed(len(ids))
        self._gen = self._new_generator()
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        self._length = len(ids)
        self._cache_long = self._needs_long(len(ids))
        self.rebuilds += 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
