"""Train a tiny Phi-3 (Phi3ForCausalLM) on the committed corpus and save it as a test asset.

Why: export/runtime tests need a checkpoint that has Phi-3's exact file layout (hub-style
4.x config.json, 2 bf16 safetensors shards, a Llama-style byte-fallback BPE tokenizer with
Phi-3's added tokens and chat template) but is a few MB and produces real English, so
that numeric and text-level comparisons mean something.  ~10 min on 2 idle CPU cores.

    python scripts/train_tiny_phi3.py          # -> tests/assets/tiny-phi3/
    python scripts/train_tiny_phi3.py --threads 1 --hidden 192 --intermediate 864 --layers 4 \
        --heads 6 --kv-heads 2 --out tests/assets/tiny-phi3-w192   # widths not multiples of 128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import longrope_overrides, make_variant

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
    # Training-only split (not saved), like sentencepiece's: merges stay inside a word or a
    # punctuation run (optionally led by "▁") or a single digit ("▁" + digit is 2 tokens, as
    # in Llama). onnxruntime-extensions pre-splits Llama-style text at these same boundaries
    # before BPE, so merges that crossed them would make it disagree with tokenizers.
    tmp.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"▁?\p{L}+|\p{N}|▁?[^\p{L}\p{N}▁]+|▁"), behavior="isolated")
    specials = ["<unk>", "<s>", "</s>"]
    tmp.train_from_iterator(prose, trainers.BpeTrainer(
        vocab_size=BASE_VOCAB - 256, special_tokens=specials, limit_alphabet=120,
        show_progress=False))
    learned = json.loads(tmp.to_str())["model"]  # ids: specials, alphabet, merged tokens
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted(
        learned["vocab"], key=learned["vocab"].get)[3:]
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
                                                       "unk_token")}  # as Phi-3's file
    for name, obj in (("tokenizer_config.json", cfg), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def to_ids(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """One long stream: each document followed by <|endoftext|> (as the chat template ends)."""
    return torch.tensor([i for enc in tok.encode_batch(docs) for i in enc.ids + [EOT]])


def make_config(hidden: int = 256, intermediate: int = 512, layers: int = 4, heads: int = 8,
                kv_heads: int = 4) -> Phi3Config:
    """Phi-3-mini shaped, tiny; by default GQA (8 q heads, 4 kv heads) as in Phi-3-medium."""
    return Phi3Config(
        vocab_size=MODEL_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        hidden_act="silu",
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
        starts = torch.randint(0, len(ids) - args.seq, (args.batch,), generator=g).tolist()
        x = torch.stack([ids[s:s + args.seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:5.0f}s", flush=True)
    return sum(losses[-50:]) / len(losses[-50:])


def write_hub_config(out: Path) -> str:
    """Rewrite config.json in the transformers-4.x form the hub's Phi-3 configs use
    (transformers 5 writes `rope_parameters` and `dtype` instead); returns the 5.x text."""
    v5_text = (out / "config.json").read_text()
    cfg = json.loads(v5_text)
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type") == "default", rope
    cfg.pop("dtype", None)
    cfg.update(rope_scaling=None, rope_theta=float(rope["rope_theta"]), torch_dtype="bfloat16",
               model_type="phi3", architectures=["Phi3ForCausalLM"], sliding_window=None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [EOT, END],
           "pad_token_id": EOT, "transformers_version": cfg.get("transformers_version")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return v5_text


# the model cards' shared head (hub front matter) and foot (the licence of the training text)
CARD_FRONT_MATTER = """---
license: other
license_name: psf-2.0
license_link: LICENSE
language: [en]
pipeline_tag: text-generation
---
"""
CARD_LICENCE = """Licence: trained on CPython's docstrings, so distributed under the same terms, the PSF
License Agreement (LICENSE is CPython's LICENSE.txt).
"""

CARD = CARD_FRONT_MATTER + """# {name}: a {params}M-parameter Phi-3 test fixture for phi3-onnx

The file layout of Microsoft's Phi-3 hub checkpoints (4.x-style config.json; bf16 weights
in 2 safetensors shards; Llama-style byte-fallback BPE tokenizer with Phi-3's added tokens
at ids 2048-2058 and its chat template; generation stops on `<|endoftext|>`/`<|end|>`),
but tiny: hidden {hidden}, {layers} layers, {heads} query / {kv_heads} KV heads, MLP {intermediate}, vocab 2048 + 11, padded
to 2064. It writes semi-coherent English about Python and is otherwise useless.

Made by `python scripts/train_tiny_phi3.py {argv}` ({minutes:.1f} min on a 2-core CPU)
from `tests/assets/corpus/train.txt` ({kb} KB of CPython 3.11 standard-library docstring
prose plus {chats} chat samples, made by `scripts/make_corpus.py`): fp32 AdamW, {steps}
steps of {batch}x{seq} tokens, then cast to bf16. Final train loss {loss:.3f}; held-out
perplexity {ppl32:.1f} (bf16 {ppl16:.1f}; unigram baseline {uni:.1f}). Greedy samples:

    {samples}

""" + CARD_LICENCE


def greedy(model: Phi3ForCausalLM, tok: Tokenizer, prompt: str, n: int = 40) -> str:
    """Prompt + greedy continuation, special tokens shown (stops at <|endoftext|>/<|end|>)."""
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[EOT, END],
                         pad_token_id=EOT)
    return repr(tok.decode(out[0].tolist(), skip_special_tokens=False))


@torch.no_grad()
def verify(out: Path, v5_config: str, text: str) -> None:
    """Reload with transformers: tokenizer round-trip + chat template; the 4.x-form config
    gives the same logits as the config transformers 5 wrote; the LongRoPE and
    sliding-window variants run 600 tokens."""
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok.encode(text)
    assert hf_tok.decode(ids) == text
    assert ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat == "<|user|>\nHi<|end|>\n<|assistant|>\n", chat
    x = torch.tensor([(ids * 60)[:600]])
    with tempfile.TemporaryDirectory() as tmp:
        v5 = make_variant(out, Path(tmp) / "v5")
        (v5 / "config.json").write_text(v5_config)
        a, b = (Phi3ForCausalLM.from_pretrained(d, dtype=torch.float32)(x).logits
                for d in (out, v5))
        assert torch.equal(a, b)
        for name, over in (("longrope", longrope_overrides()), ("swa", {"sliding_window": 100})):
            dst = make_variant(out, Path(tmp) / name, **over)
            logits = Phi3ForCausalLM.from_pretrained(dst, dtype=torch.float32)(x).logits
            assert logits.shape == (1, 600, MODEL_VOCAB) and torch.isfinite(logits).all()
    print("verified: tokenizer round-trip, chat template, reload logits, variants")


def add_training_args(ap: argparse.ArgumentParser, out: Path, batch: int) -> None:
    """The options every tiny-asset trainer takes (this one, train_tiny_phimoe.py, train_tiny_phi3_small.py)."""
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="1 is faster on a busy machine")
    ap.add_argument("--out", type=Path, default=out)


def add_shape_args(ap: argparse.ArgumentParser, intermediate: int, layers: bool = True, hidden_help: str | None = None,
                   intermediate_help: str | None = None) -> None:
    """The model-shape options the trainers share (hidden 256, 8 query / 4 KV heads, 4 layers where offered)."""
    ap.add_argument("--hidden", type=int, default=256, help=hidden_help)
    ap.add_argument("--intermediate", type=int, default=intermediate, help=intermediate_help)
    if layers:
        ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)


def start_run(args: argparse.Namespace) -> float:
    """Threads and seed from the training options; returns the start time."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(ap, OUT, batch=16)
    ap.add_argument("--dropout", type=float, default=0.0, help="training only; saved as 0")
    add_shape_args(ap, intermediate=512)
    args = ap.parse_args()
    t0 = start_run(args)

    train_docs, held_docs = read_docs(CORPUS / "train.txt"), read_docs(CORPUS / "heldout.txt")
    tok = train_tokenizer(train_docs)
    train_ids, held_ids = to_ids(tok, train_docs), to_ids(tok, held_docs)
    print(f"tokens: train {len(train_ids)}, held-out {len(held_ids)}; "
          f"chars/token {sum(map(len, train_docs)) / len(train_ids):.2f}")

    config = make_config(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)
    config.resid_pdrop = config.embd_pdrop = args.dropout
    model = Phi3ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"params: {params:.2f}M")
    loss = train(model, train_ids, args)
    model.config.resid_pdrop = model.config.embd_pdrop = 0.0  # as Phi-3's configs; eval anyway
    ppl32 = perplexity(model, held_ids, 256)

    args.out.mkdir(parents=True, exist_ok=True)
    for stale in [*args.out.glob("*.safetensors"), *args.out.glob("*.index.json")]:
        stale.unlink()  # LICENSE (committed: CPython's LICENSE.txt) is left alone
    model.generation_config.eos_token_id = [EOT, END]
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="4MB")
    assert len(list(args.out.glob("*.safetensors"))) == 2
    v5_config = write_hub_config(args.out)
    save_tokenizer(tok, args.out)
    # Evaluate what ships (reloaded: RoPE inv_freq stays fp32, unlike after model.to(bf16)).
    model = Phi3ForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16).eval()
    ppl16 = perplexity(model, held_ids, 256)
    prompts = ("The module provides",
               "<|user|>\nWhat does os.path.join do?<|end|>\n<|assistant|>\n")
    samples = "\n    ".join(greedy(model, tok, p) for p in prompts)
    uni = unigram_ppl(train_ids, held_ids)
    print(f"final train loss {loss:.3f}; held-out ppl fp32 {ppl32:.1f}, bf16 {ppl16:.1f}, "
          f"unigram {uni:.1f}\n    {samples}")
    minutes = (time.time() - t0) / 60
    (args.out / "README.md").write_text(CARD.format(
        name=args.out.name, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, intermediate=args.intermediate,
        params=f"{params:.1f}", argv=" ".join(a for a in sys.argv[1:] if str(args.out) not in a
                                            and a != "--out"), minutes=minutes, loss=loss,
        kb=(CORPUS / "train.txt").stat().st_size // 1000, steps=args.steps, batch=args.batch,
        chats=sum(d.startswith("<|") for d in train_docs), seq=args.seq, ppl32=ppl32,
        ppl16=ppl16, uni=uni, samples=samples))
    verify(args.out, v5_config, held_docs[0])
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved {args.out} ({size:.2f} MB) in {minutes:.1f} min")


if __name__ == "__main__":
    main()
