"""Shared test helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_PHI3 = ASSETS / "tiny-phi3"
TINY_PHI3_LONGROPE = ASSETS / "tiny-phi3-longrope.json"


def make_variant(src: Path, dst: Path, **config_overrides: Any) -> Path:
    """Copy checkpoint folder `src` to `dst` and merge `config_overrides` into its config.json.

    Why: we commit one set of tiny weights and derive config variants (LongRoPE,
    sliding window, ...) from it at test time instead of committing more weights.
    Overrides are shallow: a given key replaces the whole value (e.g. all of
    ``rope_scaling``); a value of None is written as JSON null.
    """
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(config_overrides)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dst


def longrope_overrides() -> dict[str, Any]:
    """The committed LongRoPE (Phi-3-128k-style) overrides for the tiny checkpoint."""
    return json.loads(TINY_PHI3_LONGROPE.read_text(encoding="utf-8"))


def make_padded_vocab(src: Path, dst: Path, vocab_size: int) -> Path:
    """Copy checkpoint `src` with embed_tokens / lm_head zero-padded to `vocab_size` rows.

    Why: full-size random-weight checkpoints have a vocabulary larger than their tokenizer, and a
    sampled id past the tokenizer's last one used to crash decoding; zero lm_head rows give those
    ids logit 0, which sampling at temperature 1 picks often on this tiny model.
    """
    import torch
    from safetensors.torch import load_file, save_file

    dst = make_variant(src, dst, vocab_size=vocab_size)
    for shard in sorted(dst.glob("model-*.safetensors")):
        tensors = load_file(shard)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                t = tensors[name]
                pad = torch.zeros((vocab_size - t.shape[0], t.shape[1]), dtype=t.dtype)
                tensors[name] = torch.cat([t, pad])
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst
