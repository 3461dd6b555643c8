"""Generation settings, checked once, turned into genai search options."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phi3_onnx.errors import Phi3OnnxError

MAX_TEMPERATURE = 100.0  # past this sampling is uniform noise; genai's float32 math overflows far later
MAX_SEED = 2**31 - 1  # genai's random_seed is a C int


@dataclass(frozen=True)
class Speculative:
    """n-gram speculative decoding (onnxruntime-genai's `set_speculative_options`): draft tokens are
    looked up in the sequence so far and verified in one step; greedy output is unchanged."""

    ngram_size: int = 3
    max_draft_tokens: int = 4

    def genai_options(self) -> dict[str, int]:
        return {"ngram_size": self.ngram_size, "max_draft_tokens": self.max_draft_tokens}


SPECULATIVE: dict[str, Speculative | None] = {"off": None, "ngram": Speculative()}


def speculative_method(name: str | None) -> Speculative | None:
    """`speculative=` as given to load/generate/stream/chat: "ngram", "off" or None (off)."""
    if name is None:
        return None
    if name not in SPECULATIVE:
        raise Phi3OnnxError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {name!r:.40}")
    return SPECULATIVE[name]


@dataclass(frozen=True)
class GenerationOptions:
    """temperature 0 is greedy; top_k 0 means no top-k cut; stop strings end generation (not included);
    min_new_tokens suppresses the end tokens until that many were generated (like transformers');
    json_schema (canonical JSON text, see runtime.structured) constrains the answer to that schema."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0
    json_schema: str | None = None
    speculative: Speculative | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Phi3OnnxError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also rejects NaN
            raise Phi3OnnxError(f"temperature must be >= 0 and <= {MAX_TEMPERATURE:g} (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Phi3OnnxError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Phi3OnnxError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise Phi3OnnxError(f"min_new_tokens must be in 0..max_new_tokens, got {self.min_new_tokens}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise Phi3OnnxError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise Phi3OnnxError(f"stop strings must be non-empty strings, got {self.stop!r:.120}")

    @classmethod
    def build(cls, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
              stop: str | Sequence[str] | None, min_new_tokens: int = 0,
              json_schema: Mapping[str, Any] | bool | None = None) -> GenerationOptions:
        """From keyword arguments, type-checked; a single stop string is one stop, not its characters."""
        from phi3_onnx.runtime.structured import schema_text

        schema = None if json_schema is None else schema_text(json_schema)
        return cls(whole("max_new_tokens", max_new_tokens), real("temperature", temperature), real("top_p", top_p),
                   whole("top_k", top_k), None if seed is None else whole("seed", seed), _stops(stop),
                   whole("min_new_tokens", min_new_tokens), schema)

    def check_vocab(self, vocab_size: int) -> GenerationOptions:
        """top_k may not exceed the vocabulary (genai refuses it only at the first token)."""
        if self.top_k > vocab_size:
            raise Phi3OnnxError(f"top_k must be <= the vocabulary size {vocab_size} (0 = no limit), got {self.top_k}")
        return self

    @property
    def sampling(self) -> tuple[float, float, int, int | None, Speculative | None]:
        """What a genai Generator fixes at creation (a chat session keeps it while this is unchanged)."""
        return (self.temperature, self.top_p, self.top_k, self.seed, self.speculative)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def json_budget(self, max_length: int, prompt_length: int) -> int:
        """Tokens a structured answer may use: max_new_tokens, or less where the KV cache ends first."""
        return max(min(self.max_new_tokens, max_length - prompt_length), 0)

    def search_options(self, max_length: int, vocab_size: int, prompt_length: int = 0) -> dict[str, Any]:
        """genai GeneratorParams.set_search_options keywords (min_length counts the prompt too)."""
        opts: dict[str, Any] = {"max_length": max_length, "do_sample": not self.greedy}
        if self.min_new_tokens:
            opts["min_length"] = min(prompt_length + self.min_new_tokens, max_length)
        if self.greedy:
            return opts
        opts.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k or vocab_size)
        if self.seed is not None:
            opts["random_seed"] = int(self.seed)
        return opts


def whole(name: str, value: Any) -> int:
    """An integer argument: an int, or a float with an integral finite value (bool and NaN/inf refused)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise Phi3OnnxError(f"{name} must be an integer, got {value!r:.80}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise Phi3OnnxError(f"{name} must be a finite integer, got {value!r}")
    return int(value)


def real(name: str, value: Any) -> float:
    """A finite number argument (bool, NaN and inf refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise Phi3OnnxError(f"{name} must be a number, got {value!r:.80}")
    try:
        number = float(value)
    except OverflowError:
        raise Phi3OnnxError(f"{name} must be a finite number, got {value!r:.80}") from None
    if not math.isfinite(number):
        raise Phi3OnnxError(f"{name} must be a finite number, got {value!r}")
    return number


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, Sequence):
        raise Phi3OnnxError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return tuple(stop)


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text` that can be shown: a tail that may begin a stop string is held back."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
