"""A plain-PyTorch Phi-3-small and a tiny random checkpoint of its shape, for tests/test_phi3_small.py.

Phi-3-small's Hugging Face code is remote code that needs triton / flash-attn, so the reference here is
written from the published modeling_phi3_small.py (microsoft/Phi-3-small-8k-instruct; read through the
code corpus) and checked against vLLM's phi3_small.py and blocksparse utils (`get_sparse_attn_mask`):

* embedding * mup_embedding_multiplier (when > 0);
* LayerNorm (weight, bias, layer_norm_epsilon) before attention and MLP, residual adds, final_layernorm;
* query_key_value [kv groups x (q_per_kv queries, k, v) x head_dim] with bias; rotate-half rotary
  (rope_embedding_base; LongRoPE "su" short/long factors chosen per forward call by the total length,
  like Phi-3-mini-128k); softmax scale mup_attn_multiplier / head_dim (mup_use_scaling);
* block-sparse attention on the layers that are not dense ((layer + 1) % dense_attention_every_n_layers
  != 0): a dense attention under the exact token-level mask = causal & kron(block mask, ones(block)),
  the block mask built like `_get_sparse_attn_mask` (per-head vertical stride, head_sliding_step);
* gegelu over the interleaved up_proj output (even: gelu half clamped above at gegelu_limit, odd: linear
  half clamped to +-limit, infinities kept), quick_gelu(g) * (l + 1), down_proj with bias;
* logits = lm_head(x) / mup_width_multiplier, dummy_token_indices filled with the dtype's minimum.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import regex
import torch

from phi3_onnx.checkpoint import tiktoken as tk
from phi3_onnx.quantize.rtn import dequantize_int4, quantize_int4

ASSETS = Path(__file__).resolve().parent / "assets"


# ----------------------------------------------------------------------------- a small tiktoken file


def train_ranks(text: str, merges: int) -> dict[bytes, int]:
    """A real BPE rank table: the 256 bytes, then `merges` most frequent pair merges over cl100k's pre-tokens."""
    words = Counter(tuple(bytes([b]) for b in piece.encode()) for piece in regex.findall(tk.CL100K_PATTERN, text))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in pairwise(word):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return ranks


def write_ranks(ranks: dict[bytes, int], path: Path) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])))
    return path


def corpus_text(chars: int = 60_000) -> str:
    files = sorted((ASSETS / "corpus").glob("*"))
    return "".join(f.read_text(encoding="utf-8", errors="ignore") for f in files if f.is_file())[:chars]


def reference_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm in plain Python: split off special tokens, regex pre-tokens, then lowest-rank merges."""
    out: list[int] = []
    pattern = "(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for chunk in regex.split(pattern, text):
        if chunk in specials:
            out.append(specials[chunk])
            continue
        for piece in regex.findall(tk.CL100K_PATTERN, chunk):
            out += _bpe(piece.encode(), ranks)
    return out


def _bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
        if best[0] == math.inf:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def reference_decode(ids: list[int], ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    back = {r: t for t, r in ranks.items()} | {i: s.encode() for s, i in specials.items()}
    return b"".join(back[i] for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- a tiny checkpoint


def small_config(ranks: int, **override: Any) -> dict[str, Any]:
    """Phi-3-small's config.json keys at a tiny size: 4 layers (1 and 3 dense), GQA 4/2, head 32, blocks of 16."""
    vocab = ranks + tk.RESERVED
    cfg: dict[str, Any] = {
        "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "attention_dropout_prob": 0.0,
        "blocksparse_block_size": 16, "blocksparse_homo_head_pattern": False, "blocksparse_num_local_blocks": 2,
        "blocksparse_triton_kernel_block_size": 16, "blocksparse_vert_stride": 4, "bos_token_id": vocab - 95,
        "dense_attention_every_n_layers": 2, "embedding_dropout_prob": 0.1, "eos_token_id": vocab - 95,
        "ff_dim_multiplier": None, "ff_intermediate_size": 256, "ffn_dropout_prob": 0.1, "gegelu_limit": 20.0,
        "gegelu_pad_to_256": True, "hidden_act": "gegelu", "hidden_size": 128, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "max_position_embeddings": 1024, "mup_attn_multiplier": 1.0,
        "mup_embedding_multiplier": 10.0, "mup_use_scaling": True, "mup_width_multiplier": 8.0, "num_attention_heads": 4,
        "num_hidden_layers": 4, "num_key_value_heads": 2, "pad_sequence_to_multiple_of_64": True,
        "reorder_and_upcast_attn": False, "rope_embedding_base": 1000000, "rope_position_scale": 1.0,
        "torch_dtype": "float32", "vocab_size": vocab, "dummy_token_indices": list(tk.dummy_token_ids(vocab)),
    }
    cfg.update(override)
    return cfg


def longrope_overrides(head_dim: int = 32, original: int = 128) -> dict[str, Any]:
    half = head_dim // 2
    return {"original_max_position_embeddings": original,
            "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.03 * i for i in range(half)],
                             "long_factor": [1.0 + 0.6 * i for i in range(half)]}}


def random_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Phi-3-small-named random tensors; up_proj is wide enough that gegelu's clamp at the limit is reached."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["ff_intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    rnd = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
    w = {"model.embed_tokens.weight": rnd(v, h, std=1.0), "model.final_layernorm.weight": 2 + rnd(h, std=0.1),
         "model.final_layernorm.bias": rnd(h, std=0.1)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}.{norm}.weight"], w[f"{p}.{norm}.bias"] = 1 + rnd(h, std=0.1), rnd(h, std=0.1)
        w[f"{p}.self_attn.query_key_value.weight"], w[f"{p}.self_attn.query_key_value.bias"] = rnd(qkv, h, std=0.2), rnd(qkv, std=0.2)
        w[f"{p}.self_attn.dense.weight"], w[f"{p}.self_attn.dense.bias"] = rnd(h, h, std=0.1), rnd(h, std=0.1)
        w[f"{p}.mlp.up_proj.weight"], w[f"{p}.mlp.up_proj.bias"] = rnd(2 * i, h, std=1.0), rnd(2 * i, std=1.0)
        w[f"{p}.mlp.down_proj.weight"], w[f"{p}.mlp.down_proj.bias"] = rnd(h, i, std=0.02), rnd(h, std=0.1)
    if not cfg.get("tie_word_embeddings", True):
        w["lm_head.weight"] = rnd(v, h, std=0.1)
    return w


def make_small_checkpoint(dst: Path, ranks: dict[bytes, int], seed: int = 0, **override: Any) -> Path:
    """A tiny Phi-3-small checkpoint folder: config.json, model.safetensors, the .tiktoken ranks, tokenizer_config.json."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    cfg = small_config(len(ranks), **override)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in random_weights(cfg, seed).items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    write_ranks(ranks, dst / "cl100k_base.tiktoken")
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Phi3SmallTokenizer", "model_max_length": 1024}))
    return dst


# ----------------------------------------------------------------------------- the reference forward


def sparse_token_mask(cfg: dict[str, Any], q_len: int, k_len: int) -> torch.Tensor:
    """bool [heads, q_len, k_len] for the last q_len of k_len positions: block rule (per head) & causal."""
    bs, local, vert = cfg["blocksparse_block_size"], cfg["blocksparse_num_local_blocks"], cfg["blocksparse_vert_stride"]
    heads = cfg["num_attention_heads"]
    blocks = -(-k_len // bs)
    q_pos, k_pos = torch.arange(blocks)[None, :, None], torch.arange(blocks)[None, None]
    step = 0 if cfg["blocksparse_homo_head_pattern"] else max(1, int(vert / heads))
    vertical = torch.vstack([(torch.arange(blocks) + h * step + 1) % vert == 0 for h in range(heads)]).unsqueeze(1)
    block_mask = (q_pos >= k_pos) & ((q_pos - k_pos < local) | vertical)  # [heads, blocks, blocks]
    dense = torch.kron(block_mask.to(torch.int32), torch.ones(bs, bs, dtype=torch.int32)).bool()[:, :k_len, :k_len]
    causal = torch.tril(torch.ones(k_len, k_len, dtype=torch.bool))
    return (dense & causal)[:, -q_len:]


def _rope(cfg: dict[str, Any], total: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = float(cfg["rope_embedding_base"])
    ext, scale = torch.ones(hd // 2), 1.0
    rs = cfg.get("rope_scaling")
    if rs:
        orig = cfg["original_max_position_embeddings"]
        ext = torch.tensor(rs["long_factor"] if total > orig else rs["short_factor"], dtype=torch.float32)
        s = cfg["max_position_embeddings"] / orig
        scale = math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0
    inv = 1.0 / (ext * base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = positions.float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos() * scale, emb.sin() * scale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _gegelu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    g, lin = x[..., ::2], x[..., 1::2]
    if limit is not None:
        g = torch.where(torch.isinf(g), g, g.clamp(min=None, max=limit))
        lin = torch.where(torch.isinf(lin), lin, lin.clamp(min=-limit, max=limit))
    return g * torch.sigmoid(1.702 * g) * (lin + 1)


def reference_forward(w: dict[str, torch.Tensor], cfg: dict[str, Any], ids: torch.Tensor,
                      past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """logits [1, S, vocab] and the new cache (rotated keys, values per layer: [1, kv, total, hd])."""
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, group, eps = h // nh, nh // nkv, cfg["layer_norm_epsilon"]
    ln = lambda x, name: torch.nn.functional.layer_norm(x, (h,), w[f"{name}.weight"], w[f"{name}.bias"], eps)
    seq = ids.shape[1]
    start = past[0][0].shape[2] if past else 0
    total = start + seq
    cos, sin = _rope(cfg, total, torch.arange(start, total))
    scale = cfg["mup_attn_multiplier"] / hd if cfg["mup_use_scaling"] else 1 / math.sqrt(hd)
    x = w["model.embed_tokens.weight"][ids]
    if cfg["mup_embedding_multiplier"] and cfg["mup_embedding_multiplier"] > 0:
        x = x * cfg["mup_embedding_multiplier"]
    new_past = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        y = ln(x, f"{p}.input_layernorm")
        mixed = y @ w[f"{p}.self_attn.query_key_value.weight"].T + w[f"{p}.self_attn.query_key_value.bias"]
        mixed = mixed.view(1, seq, nkv, group + 2, hd)
        q = mixed[:, :, :, :group].reshape(1, seq, nh, hd).transpose(1, 2)
        k = mixed[:, :, :, group].transpose(1, 2)
        v = mixed[:, :, :, group + 1].transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past:
            k, v = torch.cat([past[layer][0], k], 2), torch.cat([past[layer][1], v], 2)
        new_past.append((k, v))
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        dense = cfg["dense_attention_every_n_layers"] and (layer + 1) % cfg["dense_attention_every_n_layers"] == 0
        mask = torch.tril(torch.ones(total, total, dtype=torch.bool))[-seq:][None] if dense else sparse_token_mask(cfg, seq, total)
        scores = (q @ kk.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask[None], float("-inf"))
        attn = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(1, seq, h)
        x = x + attn @ w[f"{p}.self_attn.dense.weight"].T + w[f"{p}.self_attn.dense.bias"]
        y = ln(x, f"{p}.post_attention_layernorm")
        up = y @ w[f"{p}.mlp.up_proj.weight"].T + w[f"{p}.mlp.up_proj.bias"]
        x = x + _gegelu(up, cfg["gegelu_limit"]) @ w[f"{p}.mlp.down_proj.weight"].T + w[f"{p}.mlp.down_proj.bias"]
    x = ln(x, "model.final_layernorm")
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = (x @ head.T) / cfg["mup_width_multiplier"]
    dummy = cfg.get("dummy_token_indices") or []
    if dummy:
        logits[..., dummy] = torch.finfo(logits.dtype).min
    return logits, new_past


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}


def reference_greedy(w, cfg, prompt: list[int], new: int, rebuild_past_original: bool = False) -> list[int]:
    """Greedy tokens over the cache; with rebuild_past_original (LongRoPE), the step that first passes the
    original context recomputes the whole sequence, as transformers' generate and phi3_onnx.runtime do."""
    logits, past = reference_forward(w, cfg, torch.tensor([prompt]))
    seq, orig = list(prompt), cfg.get("original_max_position_embeddings")
    out = []
    for _ in range(new):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if rebuild_past_original and orig and len(seq) == orig + 1:
            logits, past = reference_forward(w, cfg, torch.tensor([seq]))
        else:
            logits, past = reference_forward(w, cfg, torch.tensor([[nxt]]), past)
    return out


# ----------------------------------------------------------------------------- served tensors back to the checkpoint's layout


def _interleave_qkv(cfg: dict[str, Any], w: torch.Tensor) -> torch.Tensor:
    """[all q | all k | all v] rows -> query_key_value's [kv groups x (q_per_kv queries, k, v) x head_dim]."""
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, rest = h // nh, w.shape[1:]
    kv = nkv * hd
    q, k, v = w[:h].reshape(nkv, nh // nkv, hd, *rest), w[h:h + kv].reshape(nkv, 1, hd, *rest), w[h + kv:].reshape(nkv, 1, hd, *rest)
    return torch.cat([q, k, v], 1).reshape(-1, *rest)


def _interleave_gegelu(cfg: dict[str, Any], w: torch.Tensor) -> torch.Tensor:
    """[gelu rows | linear rows] -> up_proj's alternating (gelu, linear) rows."""
    gelu, linear = w.chunk(2)
    return torch.stack([gelu, linear], 1).reshape(-1, *w.shape[1:])


def own_layout(folder: Path, source) -> dict[str, torch.Tensor]:
    """What a weight source (the exporter's Phi3SmallCheckpoint view, AWQ's weights) serves under Phi-3's names,
    back under Phi-3-small's own names and row layout, for reference_forward."""
    from phi3_onnx.checkpoint import spec_from_folder
    from phi3_onnx.checkpoint.phi3_small import small_names

    cfg = json.loads((folder / "config.json").read_text())
    fix = {"qkv_proj": _interleave_qkv, "gate_up_proj": _interleave_gegelu}
    out = {}
    for served, (own, role, _) in small_names(spec_from_folder(folder)).items():
        w = torch.from_numpy(source.read(served).copy()).float()
        out[own] = fix[role](cfg, w) if role in fix else w
    return out


def int4_round_trip(weights: dict[str, torch.Tensor], block: int, dtype: str = "float32",
                    table_block: int | None = None) -> dict[str, torch.Tensor]:
    """The weights (the checkpoint's, or AWQ's) with every matrix (the tied table included, at `table_block` when
    the recipe gives it its own) replaced by its int4 round trip; an fp16 package (dtype float16) quantizes the
    fp16-cast matrices with fp16 scales, and so does this."""
    def trip(v: torch.Tensor, bs: int) -> torch.Tensor:
        return torch.from_numpy(dequantize_int4(quantize_int4(v.numpy().astype(dtype), bs, dtype=dtype), *v.shape, bs)).float()

    return {k: trip(v, table_block if k == "model.embed_tokens.weight" and table_block else block) if v.dim() == 2 else v
            for k, v in weights.items()}
