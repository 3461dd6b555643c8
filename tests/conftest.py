"""Session fixtures shared by every test module: the tiny checkpoints and cached exports of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import os
import sys

import pytest
from hypothesis import settings

# CI runs the property tests derandomized (same examples every run, no example database); locally they
# explore. PHI3_ONNX_FUZZ_EXAMPLES raises the budget for a longer hunt.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY_PHI3, longrope_overrides, make_variant  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    """The committed tiny trained Phi-3 (hub layout, 2 bf16 shards, transformers-4.x config)."""
    return TINY_PHI3


@pytest.fixture(scope="session")
def tiny_longrope_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights with a Phi-3-128k-style LongRoPE config (original context 64)."""
    return make_variant(TINY_PHI3, tmp_path_factory.mktemp("ckpt") / "tiny-longrope", **longrope_overrides())


@pytest.fixture(scope="session")
def tiny_sliding_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights with a 100-token sliding window (Phi-3-mini-4k has 2047)."""
    return make_variant(TINY_PHI3, tmp_path_factory.mktemp("ckpt") / "tiny-sw100", sliding_window=100)


@pytest.fixture(scope="session")
def ranks() -> dict[bytes, int]:
    """BPE ranks trained on a slice of the corpus: the tiny random Phi-3-small checkpoints' tiktoken file."""
    import phi3_small_ref as ref

    return ref.train_ranks(ref.corpus_text(30_000), 400)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory, ranks) -> Path:
    """A tiny random Phi-3-small checkpoint (tests/phi3_small_ref.py): parity against the plain-torch reference."""
    import phi3_small_ref as ref

    return ref.make_small_checkpoint(tmp_path_factory.mktemp("small") / "tiny-phi3-small", ranks)


@pytest.fixture(scope="session")
def small_longrope_ckpt(tmp_path_factory: pytest.TempPathFactory, ranks) -> Path:
    """The same shape with LongRoPE past a short original context (the 128k variant's rules)."""
    import phi3_small_ref as ref

    return ref.make_small_checkpoint(tmp_path_factory.mktemp("small") / "tiny-phi3-small-128k", ranks, seed=1,
                                     **ref.longrope_overrides())


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """exported(target, ckpt=None, **overrides) -> package folder, exported once per session."""
    from phi3_onnx import export

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("packages")

    def get(target: str, ckpt: Path | None = None, **overrides) -> Path:
        ckpt = ckpt or TINY_PHI3
        key = (target, str(ckpt), tuple(sorted(overrides.items())))
        if key not in cache:
            out = root / f"{Path(ckpt).name}-{target}-{len(cache)}"
            cache[key] = export(ckpt, target, out, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def pkg(exported) -> Path:
    """The tiny checkpoint's int4-cpu package (the runtime, CLI and server tests' default)."""
    return exported("int4-cpu")


@pytest.fixture(scope="module")
def model(pkg):
    """That package loaded with phi3_onnx.runtime, once per test module."""
    from phi3_onnx.runtime import load

    return load(pkg)

