"""Train a tiny Phi-3 (Phi3ForCausalLM) on the committed corpus and save it as a test asset.

Why: export/runtime tests need a checkpoint that has Phi-3's exact file layout (hub-style
4.x config.json, 2 bf16 safetensors shards, a Llama-style byte-fallback BPE tokenizer with
Phi-3's added tokens and chat template) but is a few MB and produces real English, so
that numeric and text-level comparisons mean something.  Runs in ~6 min on 2 CPU cores.

    python scripts/train_tiny_phi3.py          # -> tests/assets/tiny-phi3/
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers
from transformers import Phi3Config, Phi3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests/assets/corpus"
OUT = ROOT / "tests/assets/tiny-phi3"
BASE_VOCAB, MODEL_VOCAB = 2048, 2064  # like Phi-3's 32000 learned + added, padded to 32064
EOT, END = 2048, 2055  # <|endoftext|>, <|end|>
# Phi-3's added tokens, in its order (ids 32000.. there, 2048.. here), with its rstrip flags.
PHI3_ADDED = [("<|endoftext|>", False)] + [(t, True) for t in (
    "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>",
    "<|user|>")]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def read_docs(path: Path) -> list[str]:
    """Documents are separated by blank lines (prose paragraph or one chat sample)."""
    return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def train_tokenizer(docs: list[str]) -> Tokenizer:
    """Learn BPE merges, then lay the vocab out exactly like Llama/Phi-3's tokenizer.json."""
    prose = [d for d in docs if not d.startswith("<|")]  # no '\n' in alphabet: it byte-falls back
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tmp = Tokenizer(models.BPE(unk_token="<unk>"))
    tmp.normalizer = norm
    # Training-only split (not saved), like sentencepiece's: merges stay inside a word, a
    # punctuation run or one digit, each optionally led by "▁".
    tmp.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"▁?\p{L}+|▁?\p{N}|▁?[^\p{L}\p{N}▁]+|▁"), behavior="isolated")
    specials = ["<unk>", "<s>", "</s>"]
    tmp.train_from_iterator(prose, trainers.BpeTrainer(
        vocab_size=BASE_VOCAB - 256, special_tokens=specials, limit_alphabet=120,
        show_progress=False))
    learned = json.loads(tmp.to_str())["model"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    order = specials + byte_tokens + [t for t, _ in sorted(learned["vocab"].items(),
                                                          key=lambda kv: kv[1])[3:]]
    assert len(order) == BASE_VOCAB, len(order)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(order)}, merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials[:2]])
    tok.add_tokens([AddedToken("</s>", rstrip=True, normalized=False, special=False)])  # as Phi-3
    tok.add_special_tokens([AddedToken(t, rstrip=r, normalized=False, special=True)
                            for t, r in PHI3_ADDED])
    assert tok.token_to_id("<|user|>") == BASE_VOCAB + 10 and tok.token_to_id("<|end|>") == END
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json + the LlamaTokenizer(Fast) side files that Phi-3 ships."""
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                      "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    cfg = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
           "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces":
           False, "eos_token": "<|endoftext|>", "legacy": False, "model_max_length": 4096,
           "pad_token": "<|endoftext|>", "padding_side": "left", "sp_model_kwargs": {},
           "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
           "use_default_system_prompt": False}
    special_map = {k: {"content": cfg[k], "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False} for k in ("bos_token", "eos_token", "pad_token",
                                                       "unk_token")}
    for name, obj in (("tokenizer_config.json", cfg), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def to_ids(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """One long stream: each document followed by <|endoftext|> (as the chat template ends)."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids + [EOT]
    return torch.tensor(ids, dtype=torch.long)


def make_config() -> Phi3Config:
    """Phi-3-mini shaped, tiny; GQA (8 q heads, 4 kv heads) as in Phi-3-medium."""
    return Phi3Config(
        vocab_size=MODEL_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, hidden_act="silu",
        max_position_embeddings=4096, original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=False, sliding_window=None, bos_token_id=1, eos_token_id=EOT,
        pad_token_id=EOT, initializer_range=0.02, architectures=["Phi3ForCausalLM"])


@torch.no_grad()
def perplexity(model: Phi3ForCausalLM, ids: torch.Tensor, seq: int) -> float:
    """Token-level perplexity over non-overlapping windows of length `seq`."""
    model.eval()
    n = (len(ids) - 1) // seq * seq
    x, y = ids[:n].view(-1, seq), ids[1:n + 1].view(-1, seq)
    nll = sum(torch.nn.functional.cross_entropy(model(input_ids=xb).logits.float().transpose(1, 2),
                                                yb, reduction="sum").item()
              for xb, yb in zip(x.split(32), y.split(32)))
    model.train()
    return math.exp(nll / y.numel())


def unigram_ppl(train: torch.Tensor, held: torch.Tensor) -> float:
    """Baseline: add-one unigram model fitted on train, evaluated on held-out."""
    counts = torch.bincount(train, minlength=MODEL_VOCAB).double() + 1
    return math.exp(-(counts / counts.sum()).log()[held].mean().item())


def train(model: Phi3ForCausalLM, ids: torch.Tensor, args: argparse.Namespace) -> float:
    """AdamW + linear warmup + cosine decay on random windows; returns the last-50-step loss."""
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, args.steps - warm))))))
    losses: list[float] = []
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([ids[s:s + args.seq + 1] for s in starts.tolist()])
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:5.0f}s", flush=True)
    return sum(losses[-50:]) / len(losses[-50:])


def write_hub_config(out: Path) -> None:
    """Rewrite config.json in the transformers-4.x form the hub's Phi-3 configs use
    (transformers 5 writes `rope_parameters` and `dtype` instead)."""
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type") == "default", rope
    cfg.pop("dtype", None)
    cfg.update(rope_scaling=None, rope_theta=float(rope["rope_theta"]), torch_dtype="bfloat16",
               model_type="phi3", architectures=["Phi3ForCausalLM"], sliding_window=None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [EOT, END],
           "pad_token_id": EOT, "transformers_version": cfg.get("transformers_version")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t0 = time.time()

    train_docs, held_docs = read_docs(CORPUS / "train.txt"), read_docs(CORPUS / "heldout.txt")
    tok = train_tokenizer(train_docs)
    train_ids, held_ids = to_ids(tok, train_docs), to_ids(tok, held_docs)
    print(f"tokens: train {len(train_ids)}, held-out {len(held_ids)}; "
          f"chars/token {sum(map(len, train_docs)) / len(train_ids):.2f}")

    model = Phi3ForCausalLM(make_config())
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    loss = train(model, train_ids, args)
    ppl32 = perplexity(model, held_ids, 256)

    model.to(torch.bfloat16)
    ppl16 = perplexity(model, held_ids, 256)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in [*args.out.glob("*.safetensors"), *args.out.glob("*.index.json")]:
        stale.unlink()  # LICENSE (committed, CPython's LICENSE.txt) is left alone
    model.generation_config.eos_token_id = [EOT, END]
    model.save_pretrained(args.out, max_shard_size="4MB")
    write_hub_config(args.out)
    save_tokenizer(tok, args.out)
    shards = sorted(p.name for p in args.out.glob("*.safetensors"))
    assert len(shards) == 2, shards
    print(f"final train loss {loss:.3f}; held-out ppl fp32 {ppl32:.1f}, bf16 {ppl16:.1f}, "
          f"unigram {unigram_ppl(train_ids, held_ids):.1f}; "
          f"{sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.2f} MB; "
          f"{time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
