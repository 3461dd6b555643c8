"""Shared test helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_PHI3 = ASSETS / "tiny-phi3"
TINY_PHI3_LONGROPE = ASSETS / "tiny-phi3-longrope.json"
# a second trained checkpoint, widths not multiples of 128 (hidden 192, MLP 864, 6/2 heads): the flagship's held-out check
TINY_PHI3_W192 = ASSETS / "tiny-phi3-w192"
# a trained tiny Phi-3.5-MoE (hidden 128, 4 experts top-2, plain RoPE): the MoE accuracy checks (tests/test_phimoe.py)
TINY_PHIMOE = ASSETS / "tiny-phimoe"
# a trained tiny Phi-3-small (reference_forward of tests/phi3_small_ref.py, byte-level ranks): its accuracy checks
TINY_PHI3_SMALL = ASSETS / "tiny-phi3-small"


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


def make_random_phi3(dst: Path, seed: int = 0, **config: Any) -> Path:
    """A random-weight Phi3ForCausalLM of the given config (for parity tests), with the tiny asset's tokenizer.

    Why: Phi-4-mini's shape (partial rotary, tied embeddings, LongRoPE on the rotary dims) has no
    trained tiny checkpoint here; parity against transformers needs no training.
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    dst = Path(dst)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**config)).eval()
    with torch.no_grad():  # a little more spread than the default init, so logits differ visibly
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    model.save_pretrained(dst, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(TINY_PHI3 / name, dst / name)
    return dst


def phi4_mini_like(**override: Any) -> dict[str, Any]:
    """Phi-4-mini-instruct's architecture at a tiny size: partial rotary 0.75 (48 of 64 head dims),
    GQA 4/2, tied embeddings, LongRoPE past an original context of 64, no sliding window."""
    rotary_half = 24
    cfg: dict[str, Any] = dict(
        vocab_size=2064, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=64,
        partial_rotary_factor=0.75, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2048, pad_token_id=2048,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(rotary_half)],
                      "long_factor": [1.0 + 0.5 * i for i in range(rotary_half)]},
        sliding_window=None,
    )
    cfg.update(override)
    return cfg


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


def phimoe_like(**override: Any) -> dict[str, Any]:
    """Phi-3.5-MoE's architecture at a tiny size: LayerNorm, q/k/v/o and lm_head biases, 4 experts with
    sparsemixer top-2 routing (jitter eps 0.01), GQA 4/2, no sliding window, plain RoPE (see phimoe_longrope)."""
    cfg: dict[str, Any] = {
        "vocab_size": 2064, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.01,
        "max_position_embeddings": 1024, "attention_bias": True, "lm_head_bias": True, "bos_token_id": 1, "eos_token_id": 2048,
        "pad_token_id": 2048, "sliding_window": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    cfg.update(override)
    return cfg


def phimoe_longrope(**override: Any) -> dict[str, Any]:
    """phimoe_like with LongRoPE past an original context of 64 and distinct short/long mscales (1.1 / 1.3)."""
    half = 16  # head_dim 32
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.02 * i for i in range(half)], "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "short_mscale": 1.1, "long_mscale": 1.3}
    return phimoe_like(rope_parameters=rope, **override)


def make_random_phimoe(dst: Path, seed: int = 0, **config: Any) -> Path:
    """A random-weight PhimoeForCausalLM (saved in the hub layout: block_sparse_moe.experts.E.w1/w2/w3) with
    the tiny asset's tokenizer. Weights are spread x3 and biases drawn N(0, 0.1) so both matter in the logits."""
    import torch
    from transformers import PhimoeConfig, PhimoeForCausalLM

    dst = Path(dst)
    torch.manual_seed(seed)
    model = PhimoeForCausalLM(PhimoeConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(3.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(dst, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(TINY_PHI3 / name, dst / name)
    return dst


def genai_greedy(pkg: Path, prompt: list[int], new: int, configure: Callable[[Any], None] | None = None) -> list[int]:
    """onnxruntime-genai's greedy continuation of `prompt` by exactly `new` tokens (end tokens suppressed);
    `configure` may change the package's og.Config first (providers, their options)."""
    import onnxruntime_genai as og

    config = og.Config(str(pkg))
    if configure is not None:
        configure(config)
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def export_all_and_eval(ckpt: Path, targets: list[str], root: Path, heldout: Path, window: int, tokens: int,
                        label: str) -> dict:
    """Every target of `ckpt` exported under root/variants and one `phi3-onnx eval` of them all against its
    fp32-cpu export on `heldout` (`window`-token windows, `tokens` in all); prints each row's metrics.
    Returns {"root", "reference", "rc", "rows": {target: report row}}."""
    import json
    import time

    from phi3_onnx import export
    from phi3_onnx.cli import main

    t0 = time.perf_counter()
    reference = export(ckpt, "fp32-cpu", root / "reference")
    for target in targets:
        export(ckpt, target, root / "variants" / target)
    t1 = time.perf_counter()
    out = root / "report.json"
    rc = main(["eval", str(root / "variants"), "--reference", str(reference), "--data", str(heldout), "--window",
               str(window), "--max-tokens", str(tokens), "--json", str(out), "--quiet"])
    rows = {row["target"]: row for row in json.loads(out.read_text())["variants"]}
    print(f"\n{label}: export {t1 - t0:.1f}s, eval {time.perf_counter() - t1:.1f}s")
    nan = float("nan")
    for name, row in rows.items():
        m = row["metrics"] or {}
        print(f"  {name:14s} {row['status']:5s} KL {m.get('kl_mean', nan):.5f}  top-1 {m.get('top1', nan):.4f}"
              f"  ppl {m.get('ref_ppl', nan):.3f} -> {m.get('ppl', nan):.3f} ({m.get('ppl_increase_pct', nan):+.2f}%)"
              f"  max|dlogit| {m.get('max_abs_dlogit', nan):.3f}  {m.get('tokens')} tokens")
    return {"root": root, "reference": reference, "rc": rc, "rows": rows}


def assert_within_registry_limits(row: dict, target: str, tokens: int, window: int) -> None:
    """An eval report row (export_all_and_eval's) judged by `target`'s registry limits, passing, over
    every window's next tokens (each window of `window` scores window - 1)."""
    from phi3_onnx.targets import TARGETS

    lim = TARGETS[target].limits
    assert row["limits"] == {"max_ppl_increase_pct": lim.max_ppl_increase_pct, "max_kl": lim.max_kl,
                             "min_top1": lim.min_top1, "source": "registry"}
    assert row["status"] == "pass", row["failures"] or row["reason"]
    assert row["metrics"]["tokens"] == tokens - tokens // window
