"""Make a full-size random-weight Phi-3 checkpoint from this repo's presets (speed and memory don't
depend on weight values), streaming: one chunk of one tensor in memory at a time.

usage: python benchmarks/make_random_checkpoint.py phi3-mini-4k OUT_DIR [--seed 0] [--shard-gb 2]

Writes bf16 safetensors shards + model.safetensors.index.json, the preset's config.json verbatim
(`src/phi3_onnx/checkpoint/configs/NAME.json`, hub form), and the tokenizer of the committed tiny
checkpoint (`tests/assets/tiny-phi3`: BPE with byte fallback and the Phi-3 special tokens; benchmark
prompts are random token ids, so its small vocabulary does not matter; gguf conversion pads it to
vocab_size). Phi-3-small (phi3-small-8k): its own tensor names (checkpoint/phi3_small.py) and, instead of
tokenizer files, a synthetic `random.tiktoken` of vocab_size - 96 ranks (every byte, every byte pair, then
byte triples), which the export turns into tokenizer.json as it does cl100k_base's.
Weights: N(0, 0.02) for matrices, 1.0 for norms and biases, like a freshly initialised model.
Needs only numpy and ml_dtypes (both phi3-onnx dependencies); peak RSS stays under ~0.5 GiB.
Phi-3-mini-4k: 7.6 GB on disk, ~1-2 min on a 2-core machine.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from phi3_onnx.checkpoint import expected_tensors, preset_config, spec_from_config  # noqa: E402
from phi3_onnx.checkpoint.phi3_small import small_names  # noqa: E402
from phi3_onnx.checkpoint.tiktoken import RESERVED  # noqa: E402

TOKENIZER_FROM = REPO / "tests" / "assets" / "tiny-phi3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHUNK = 1 << 24  # elements generated at once (64 MiB of float32)


def shard_plan(tensors: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensors in table order, cut into shards of about `shard_bytes` (bf16)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shard(path: Path, names: list[str], tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A safetensors file written header first, then each tensor chunk by chunk."""
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        nbytes = 2 * int(np.prod(tensors[name]))
        header[name] = {"dtype": "BF16", "shape": list(tensors[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            _write_tensor(f, tensors[name], rng)


def _write_tensor(f, shape: tuple[int, ...], rng: np.random.Generator) -> None:
    count = int(np.prod(shape))
    if len(shape) == 1:  # norm weights
        f.write(np.ones(count, dtype=ml_dtypes.bfloat16).tobytes())
        return
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        values = rng.standard_normal(n, dtype=np.float32)
        values *= 0.02
        f.write(values.astype(ml_dtypes.bfloat16).tobytes())


def make(preset: str, out: Path, seed: int = 0, shard_gb: float = 2.0) -> Path:
    cfg = preset_config(preset)
    spec = spec_from_config(cfg, name=preset)
    small = spec.small is not None
    tensors = {own: shape for own, _, shape in small_names(spec).values()} if small else expected_tensors(spec)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = shard_plan(tensors, int(shard_gb * 1e9))
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / file, names, tensors, rng)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(2 * int(np.prod(s)) for s in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=2))
    if small:
        write_ranks(out / "random.tiktoken", spec.vocab_size - RESERVED)
    else:
        for name in TOKENIZER_FILES:
            shutil.copy2(TOKENIZER_FROM / name, out / name)
    return out


def write_ranks(path: Path, count: int) -> None:
    """A .tiktoken file of `count` ranks: each byte, each byte pair, then byte triples, in that order (so
    every multi-byte token splits into two lower-ranked ones, as BPE merges need)."""
    singles = [bytes([b]) for b in range(256)]
    tokens = itertools.chain(singles, (a + b for a in singles for b in singles),
                             (a + b + c for a in singles for b in singles for c in singles))
    with open(path, "w") as f:
        for rank, token in enumerate(itertools.islice(tokens, count)):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", help="a preset in src/phi3_onnx/checkpoint/configs, e.g. phi3-mini-4k")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    make(args.preset, args.out, args.seed, args.shard_gb)
    print(f"{args.preset}: random checkpoint in {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
