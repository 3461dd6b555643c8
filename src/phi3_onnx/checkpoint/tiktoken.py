"""Phi-3-small's tiktoken tokenizer as files onnxruntime-genai loads (tokenizer.json + tokenizer_config.json).

Phi-3-small ships tokenization_phi3_small.py and cl100k_base's BPE ranks (`cl100k_base.tiktoken`: lines
of `base64(token bytes) rank`), no tokenizer.json. The conversion:

* vocabulary: every ranked byte string, written byte-level (GPT-2's bytes -> unicode map), id = rank;
* merges derived from the ranks as transformers' TikTokenConverter does: for each token, every split
  into two ranked halves, ordered by the token's rank (then the halves' ranks) — so the BPE merge
  order is tiktoken's "lowest rank first";
* `ignore_merges`: a pre-token that is itself ranked is one token, as tiktoken does;
* cl100k's pre-tokenizer regex (a Split, isolated), then ByteLevel without its own regex;
* Phi-3-small's special tokens (SPECIAL_LAYOUT: <|endoftext|>, <|system|>, <|user|>, <|assistant|>,
  <|end|>, fim tokens, dummies up to the padded vocabulary) as added tokens, at the ids the published
  tokenizer gives them: the layout starts right after the last rank (100256 for cl100k) and fills
  RESERVED ids, so the model's vocab_size is ranks + RESERVED (100352).

Where the ranks come from (`find_ranks`): `--tiktoken FILE`, a *.tiktoken file in the checkpoint folder,
or tiktoken's own cache (TIKTOKEN_CACHE_DIR / DATA_GYM_CACHE_DIR / <tmp>/data-gym-cache, file named by the
sha1 of cl100k's URL).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from phi3_onnx.errors import Phi3OnnxError

# cl100k_base's pre-tokenizer (tiktoken's pat_str; also Llama-3's)
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

# Phi-3-small's special tokens as offsets from the first id after the ranks (tokenization_phi3_small.py:
# cl100k's 100256 ranks, then <|dummy_id_2|> at 100256, <|endoftext|> at 100257, ... <|endofprompt|> at
# 100276, then <|dummy_id_12|>.. to the padded vocabulary of 100352).
RESERVED = 96
_NAMED = (
    ("<|dummy_id_2|>", 0), ("<|endoftext|>", 1), ("<|fim_prefix|>", 2), ("<|fim_middle|>", 3), ("<|fim_suffix|>", 4),
    ("<|system|>", 5), ("<|user|>", 6), ("<|assistant|>", 7), ("<|dummy_id_0|>", 8), ("<|dummy_id_1|>", 9),
    ("<|end|>", 10), *((f"<|dummy_id_{3 + i}|>", 11 + i) for i in range(9)), ("<|endofprompt|>", 20),
)
SPECIAL_LAYOUT: tuple[tuple[str, int], ...] = (*_NAMED, *((f"<|dummy_id_{11 + i}|>", 20 + i) for i in range(1, RESERVED - 20)))
_UNUSED_NAMED = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
CHAT_STOPS = ("<|end|>", "<|endoftext|>")

# Phi-3-small-8k/128k-instruct's chat template (its tokenizer_config.json), used when the checkpoint has none
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def special_tokens(vocab_size: int) -> dict[str, int]:
    """Phi-3-small's special tokens and their ids for a model of `vocab_size` (ranks = vocab_size - RESERVED)."""
    base = vocab_size - RESERVED
    return {name: base + offset for name, offset in SPECIAL_LAYOUT}


def dummy_token_ids(vocab_size: int) -> tuple[int, ...]:
    """The ids tokenization_phi3_small.py calls dummy (never produced): the model's logits there are masked."""
    return tuple(sorted(i for name, i in special_tokens(vocab_size).items() if "dummy_id" in name or name in _UNUSED_NAMED))


def chat_stop_ids(vocab_size: int) -> list[int]:
    specials = special_tokens(vocab_size)
    return [specials[t] for t in CHAT_STOPS]


# ----------------------------------------------------------------------------- the ranks file


def read_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file: `base64 rank` per line; ranks must be 0..n-1, each once."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        raise Phi3OnnxError(f"{path}: line {n} is not 'base64-token rank' (not a .tiktoken file)") from None
    except OSError as exc:
        raise Phi3OnnxError(f"cannot read {path}: {exc.strerror}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise Phi3OnnxError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    if not all(bytes([b]) in ranks for b in range(256)):
        raise Phi3OnnxError(f"{path}: not every single byte has a rank (a byte-level BPE needs all 256)")
    return ranks


def _tiktoken_cache() -> Path:
    base = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = Path(base) if base else Path(tempfile.gettempdir()) / "data-gym-cache"
    return folder / hashlib.sha1(CL100K_URL.encode()).hexdigest()


def find_ranks(folder: Path, explicit: str | os.PathLike | None = None) -> Path:
    """The .tiktoken file to convert: --tiktoken, else one in the checkpoint folder, else tiktoken's cache."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise Phi3OnnxError(f"--tiktoken {explicit}: file not found")
        return path
    found = sorted(folder.glob("*.tiktoken"))
    if len(found) > 1:
        raise Phi3OnnxError(f"{folder} holds several .tiktoken files ({', '.join(p.name for p in found)}): pick one with --tiktoken")
    if found:
        return found[0]
    cached = _tiktoken_cache()
    if cached.is_file():
        return cached
    raise Phi3OnnxError(f"Phi-3-small needs cl100k_base's BPE ranks: {folder} has no *.tiktoken file and tiktoken's cache "
                        f"has none ({cached}); pass --tiktoken FILE")


# ----------------------------------------------------------------------------- tokenizer.json


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenizers use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_BYTE_CHARS = _bytes_to_unicode()


def _text(token: bytes) -> str:
    return "".join(_BYTE_CHARS[b] for b in token)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two ranked halves, by the token's rank, then the halves' ranks."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort(key=lambda m: m[:3])
    return [(a, b) for _, _, _, a, b in merges]


def tokenizer_json(ranks: dict[bytes, int], vocab_size: int) -> dict[str, Any]:
    """A Hugging Face tokenizer.json (byte-level BPE) equal to tiktoken over `ranks` plus Phi-3-small's specials."""
    if len(ranks) + RESERVED != vocab_size:
        raise Phi3OnnxError(f"the tiktoken file has {len(ranks)} ranks; Phi-3-small's layout needs vocab_size "
                            f"{len(ranks)} + {RESERVED} = {len(ranks) + RESERVED}, config.json says {vocab_size}")
    specials = special_tokens(vocab_size)
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for name, i in sorted(specials.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {_text(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [[_text(a), _text(b)] for a, b in merges_from_ranks(ranks)],
        },
    }


def tokenizer_config(checkpoint_cfg: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """tokenizer_config.json for the package: a fast byte-level BPE class, Phi-3-small's specials and chat template."""
    specials = special_tokens(vocab_size)
    template = checkpoint_cfg.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    decoder = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for name, i in sorted(specials.items(), key=lambda kv: kv[1])}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": checkpoint_cfg.get("model_max_length", 8192),
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(folder: Path, dest: Path, vocab_size: int, tiktoken_file: str | os.PathLike | None = None) -> Path:
    """Convert the checkpoint's ranks into dest/tokenizer.json + tokenizer_config.json; returns the ranks file used."""
    source = find_ranks(folder, tiktoken_file)
    data = tokenizer_json(read_ranks(source), vocab_size)
    cfg_path = folder / "tokenizer_config.json"
    checkpoint_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    (dest / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = tokenizer_config(checkpoint_cfg, vocab_size)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return source


__all__ = ["CL100K_PATTERN", "RESERVED", "SPECIAL_LAYOUT", "chat_stop_ids", "dummy_token_ids", "find_ranks",
           "merges_from_ranks", "read_ranks", "special_tokens", "tokenizer_config", "tokenizer_json", "write_tokenizer"]
