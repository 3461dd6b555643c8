"""Generation settings, checked once, turned into genai search options."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phi3_onnx.errors import Phi3OnnxError


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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Phi3OnnxError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise Phi3OnnxError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Phi3OnnxError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Phi3OnnxError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise Phi3OnnxError(f"min_new_tokens must be in 0..max_new_tokens, got {self.min_new_tokens}")
        if any(not s for s in self.stop):
            raise Phi3OnnxError("stop strings must not be empty")

    @classmethod
    def build(cls, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
              stop: str | Sequence[str] | None, min_new_tokens: int = 0,
              json_schema: Mapping[str, Any] | bool | None = None) -> GenerationOptions:
        """From keyword arguments; a single stop string is one stop, not its characters."""
        from phi3_onnx.runtime.structured import schema_text

        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        schema = None if json_schema is None else schema_text(json_schema)
        return cls(int(max_new_tokens), float(temperature), float(top_p), int(top_k), seed, stops, int(min_new_tokens),
                   schema)

    @property
    def sampling(self) -> tuple[float, float, int, int | None]:
        """What a genai Generator fixes at creation (a chat session keeps it while this is unchanged)."""
        return (self.temperature, self.top_p, self.top_k, self.seed)

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
