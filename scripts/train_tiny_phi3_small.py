"""Train a tiny Phi-3-small (Phi3SmallForCausalLM) on the committed corpus and save it as a test asset.

Why: Phi-3-small's accuracy tests (AWQ vs RTN, every target's eval drift limits) need a model whose logits
carry information; random weights only serve the parity tests. There is no HF modeling class without
triton, so this trains tests/phi3_small_ref.py's plain-PyTorch `reference_forward` (the one the parity
tests check the exporter against) over the names `random_weights` gives, with a byte-level tokenizer:
256 byte ranks (no merges) + Phi-3-small's 96 reserved ids. It reuses scripts/train_tiny_phi3.py's corpus
split, training loop and perplexity (through a thin nn.Module wrapper). Block-sparse layers stay active:
training windows of 256 tokens span 16 sparse blocks of 16.

    python scripts/train_tiny_phi3_small.py          # -> tests/assets/tiny-phi3-small/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_phi3 import (  # noqa: E402  (puts tests/ on sys.path)
    CARD_FRONT_MATTER, CARD_LICENCE, CORPUS, add_shape_args, add_training_args, perplexity, read_docs, start_run, train,
)
import phi3_small_ref as ref  # noqa: E402

from phi3_onnx.checkpoint import tiktoken as tk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests/assets/tiny-phi3-small"
RANKS = {bytes([b]): b for b in range(256)}  # byte-level: tiktoken over these ranks is the UTF-8 bytes


class SmallLM(torch.nn.Module):
    """reference_forward over trainable tensors, with the HF call shape train()/perplexity() use."""

    def __init__(self, cfg: dict, init: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg, self.names = cfg, list(init)
        self.params = torch.nn.ParameterList(torch.nn.Parameter(init[n].clone()) for n in self.names)

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        w = self.weights()
        logits = torch.cat([ref.reference_forward(w, self.cfg, row[None])[0] for row in input_ids])
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(logits=logits, loss=loss)


def init_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """random_weights' names and shapes, GPT-style init: N(0, 0.02) matrices, zero biases, unit LayerNorms."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in ref.random_weights(cfg, seed).items():
        if "layernorm" in name:
            out[name] = torch.ones_like(t) if name.endswith("weight") else torch.zeros_like(t)
        elif name.endswith("bias"):
            out[name] = torch.zeros_like(t)
        else:
            out[name] = torch.randn(t.shape, generator=g) * 0.02
    return out


def encoder(vocab: int) -> Tokenizer:
    """The package's own conversion of the ranks (what the exported tokenizer.json is)."""
    return Tokenizer.from_str(json.dumps(tk.tokenizer_json(RANKS, vocab)))


def to_ids(tok: Tokenizer, docs: list[str], eot: int) -> torch.Tensor:
    return torch.tensor([i for enc in tok.encode_batch(docs) for i in enc.ids + [eot]])


def unigram_ppl(train_ids: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    return math.exp(-(counts / counts.sum()).log()[held].mean().item())


@torch.no_grad()
def greedy(model: SmallLM, tok: Tokenizer, prompt: str, n: int = 60) -> str:
    ids = ref.reference_greedy(model.weights(), model.cfg, tok.encode(prompt).ids, n)
    stops = set(tk.chat_stop_ids(model.cfg["vocab_size"]))
    cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
    return repr(prompt + tok.decode(ids[:cut], skip_special_tokens=False))


CARD = CARD_FRONT_MATTER + """# {name}: a {params}M-parameter Phi-3-small test fixture for phi3-onnx

The file layout `tests/phi3_small_ref.make_small_checkpoint` writes (config.json with Phi-3-small's keys,
`Phi3SmallForCausalLM`; one model.safetensors in the checkpoint's own names, query_key_value / up_proj
interleaved; `cl100k_base.tiktoken`; tokenizer_config.json), trained: hidden {hidden}, {layers} layers
(1 and 3 dense, 0 and 2 block-sparse: blocks of 16, 2 local blocks, vertical stride 4), {heads} query /
{kv_heads} KV heads (head dim {head_dim}), gegelu MLP {intermediate}, tied embedding, muP multipliers
(embedding 10, width 8). Tokenizer: byte-level, 256 byte ranks and no merges, + Phi-3-small's 96
reserved ids (vocab {vocab}), so one token per UTF-8 byte. Weights bf16.

Made by `python scripts/train_tiny_phi3_small.py {argv}` ({minutes:.1f} min on a 2-core CPU) from
`tests/assets/corpus/train.txt` (the split `scripts/train_tiny_phi3.py` uses; the held-out file is never
trained on), training tests/phi3_small_ref.py's `reference_forward`: fp32 AdamW, {steps} steps of
{batch}x{seq} tokens, then cast to bf16. Final train loss {loss:.3f}; held-out perplexity per byte
{ppl32:.2f} (bf16 {ppl16:.2f}; unigram baseline {uni:.2f}). Greedy samples:

    {samples}

""" + CARD_LICENCE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(ap, OUT, batch=8)
    add_shape_args(ap, intermediate=512, layers=False,
                   hidden_help="make_small_checkpoint's random default is 128; 256 as tiny-phi3 / tiny-phimoe")
    args = ap.parse_args()
    t0 = start_run(args)

    cfg = ref.small_config(len(RANKS), hidden_size=args.hidden, ff_intermediate_size=args.intermediate,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                           embedding_dropout_prob=0.0, ffn_dropout_prob=0.0, torch_dtype="bfloat16")
    vocab, eot = cfg["vocab_size"], tk.special_tokens(cfg["vocab_size"])["<|endoftext|>"]
    tok = encoder(vocab)
    train_docs, held_docs = read_docs(CORPUS / "train.txt"), read_docs(CORPUS / "heldout.txt")
    specials = tk.special_tokens(vocab)
    for doc in (*train_docs[:50], *held_docs[:20], *[d for d in train_docs if d.startswith("<|")][:5]):
        assert tok.encode(doc).ids == ref.reference_encode(doc, RANKS, specials), doc[:60]
    assert tok.encode(held_docs[0]).ids == list(held_docs[0].encode())
    train_ids, held_ids = to_ids(tok, train_docs, eot), to_ids(tok, held_docs, eot)
    print(f"tokens: train {len(train_ids)}, held-out {len(held_ids)}; vocab {vocab}, <|endoftext|> {eot}")

    model = SmallLM(cfg, init_weights(cfg, args.seed))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"params: {params:.2f}M")
    loss = train(model, train_ids, args)
    ppl32 = perplexity(model, held_ids, 256)

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with torch.no_grad():
        half = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.weights().items()}
    save_file(half, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    ref.write_ranks(RANKS, args.out / "cl100k_base.tiktoken")
    (args.out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Phi3SmallTokenizer",
                                                                "model_max_length": 1024}))
    lic = ROOT / "tests/assets/tiny-phi3/LICENSE"
    if not (args.out / "LICENSE").exists():
        (args.out / "LICENSE").write_bytes(lic.read_bytes())
    # Evaluate what ships (reloaded from the bf16 file).
    model = SmallLM(cfg, ref.load_weights(args.out)).eval()
    ppl16 = perplexity(model, held_ids, 256)
    prompts = ("The module provides", "Return the number of",
               "<|user|>\nWhat does os.path.join do?<|end|>\n<|assistant|>\n")
    samples = "\n    ".join(greedy(model, tok, p) for p in prompts)
    uni = unigram_ppl(train_ids, held_ids, vocab)
    print(f"final train loss {loss:.3f}; held-out ppl fp32 {ppl32:.2f}, bf16 {ppl16:.2f}, unigram {uni:.2f}\n"
          f"    {samples}")
    minutes = (time.time() - t0) / 60
    (args.out / "README.md").write_text(CARD.format(
        name=args.out.name, params=f"{params:.2f}", hidden=args.hidden, layers=cfg["num_hidden_layers"],
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        intermediate=args.intermediate, vocab=vocab,
        argv=" ".join(a for a in sys.argv[1:] if str(args.out) not in a and a != "--out"),
        minutes=minutes, steps=args.steps, batch=args.batch, seq=args.seq, loss=loss, ppl32=ppl32,
        ppl16=ppl16, uni=uni, samples=samples))
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved {args.out} ({size:.2f} MB) in {minutes:.1f} min")


if __name__ == "__main__":
    main()
