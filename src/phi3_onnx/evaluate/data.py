"""The evaluation text as fixed token windows, tokenized with the package's own tokenizer.

Tokenization uses `tokenizers` on the package's tokenizer.json when installed, else
onnxruntime-genai's tokenizer (which the cpu/cuda/directml extras always install), so an
eval in CI needs neither PyTorch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.spec import ModelSpec

Positions = Literal["start", "long"]
Encoder = Callable[[str], list[int]]


def load_encoder(package: Path) -> Encoder:
    """text -> ids with the package's tokenizer (special tokens as the tokenizer's post-processor adds)."""
    path = package / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return _genai_encoder(package)
    if not path.is_file():
        return _genai_encoder(package)
    tok = Tokenizer.from_file(str(path))
    return lambda text: tok.encode(text).ids


def _genai_encoder(package: Path) -> Encoder:
    import onnxruntime_genai as og

    tok = og.Tokenizer(str(package))
    return lambda text: [int(i) for i in tok.encode(text)]


def tokenize_file(package: Path, data: Path) -> np.ndarray:
    """All of `data` as one int64 token stream."""
    try:
        text = Path(data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Phi3OnnxError(f"cannot read --data {data} ({exc})") from None
    ids = np.asarray(load_encoder(package)(text), dtype=np.int64)
    if ids.size < 2:
        raise Phi3OnnxError(f"--data {data} has fewer than 2 tokens")
    return ids


@dataclass(frozen=True)
class WindowPlan:
    """Non-overlapping windows of `length` tokens, each starting at position 0 of the model."""

    length: int
    count: int
    positions: Positions

    def windows(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        for k in range(self.count):
            yield tokens[k * self.length : (k + 1) * self.length]


def window_length(spec: ModelSpec, window: int, positions: Positions) -> int:
    """`window`, or for "long" 2x the original context, so each window's tail is past it.

    Why: LongRoPE models switch rotary factors once a sequence exceeds the original context;
    windows that stay below it never exercise the long factors, where exports have broken.
    """
    if positions == "start":
        return window
    if spec.longrope is None:
        raise Phi3OnnxError("--positions long needs a LongRoPE model (its manifest has no long factors)")
    return 2 * spec.original_max_position_embeddings


def plan_windows(n_tokens: int, spec: ModelSpec, window: int, max_tokens: int, positions: Positions) -> WindowPlan:
    """As many whole windows as both the data and --max-tokens allow (at least one, else bad input)."""
    length = window_length(spec, window, positions)
    if length < 2:
        raise Phi3OnnxError(f"--window must be at least 2 tokens, got {length}")
    if length > spec.max_position_embeddings:
        raise Phi3OnnxError(f"window of {length} tokens exceeds the model's context {spec.max_position_embeddings}")
    if max_tokens < length:
        raise Phi3OnnxError(f"--max-tokens {max_tokens} is smaller than one window of {length} tokens")
    if n_tokens < length:
        raise Phi3OnnxError(f"--data has {n_tokens} tokens, fewer than one window of {length}")
    return WindowPlan(length, min(n_tokens, max_tokens) // length, positions)
