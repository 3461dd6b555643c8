"""What one `phi3-onnx bench` run measures, checked once (bad values are exit-code-2 errors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime.providers import DEVICES
from phi3_onnx.runtime.threads import check_threads


@dataclass(frozen=True)
class BenchOptions:
    """prompt_tokens: one row per length; new_tokens: tokens generated per run (min_length = max_length,
    so no end token can stop a run early); repeats: rounds, each loading every variant afresh in its own
    process (variants alternate A B A B, medians are reported)."""

    prompt_tokens: tuple[int, ...] = (16, 512)
    new_tokens: int = 128
    repeats: int = 3
    threads: int | None = None
    device: str = "auto"
    variants: tuple[str, ...] = ()  # bundle variants to run (default: all)
    seed: int = 0
    warmup_tokens: int = 4  # a short untimed run after each load (first-call allocations)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompt_tokens or any(p < 1 for p in self.prompt_tokens):
            raise Phi3OnnxError(f"prompt tokens must be positive, got {list(self.prompt_tokens)}")
        if len(set(self.prompt_tokens)) != len(self.prompt_tokens):
            raise Phi3OnnxError(f"prompt tokens are repeated: {list(self.prompt_tokens)}")
        if self.new_tokens < 2:
            raise Phi3OnnxError(f"new tokens must be >= 2 (the first one is time to first token), got {self.new_tokens}")
        if self.repeats < 1:
            raise Phi3OnnxError(f"repeats must be >= 1, got {self.repeats}")
        if self.device not in DEVICES:
            raise Phi3OnnxError(f"unknown device {self.device!r}; choose from: {', '.join(DEVICES)}")
        check_threads(self.threads)

    @property
    def max_length(self) -> int:
        """KV cache size every run of a variant is loaded with (the same for every prompt length)."""
        return max(self.prompt_tokens) + self.new_tokens


def parse_lengths(text: str) -> tuple[int, ...]:
    """'16,512' -> (16, 512)."""
    try:
        values = tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise Phi3OnnxError(f"--prompt-tokens takes comma-separated whole numbers like 16,512, got {text!r}") from None
    if not values:
        raise Phi3OnnxError("--prompt-tokens is empty")
    return values
