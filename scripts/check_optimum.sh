#!/usr/bin/env bash
# Does a phi3-onnx package load in Hugging Face optimum's ORTModelForCausalLM, and does optimum's
# greedy output equal ours? Builds its own virtual environment (optimum-onnx 0.1.0 pins
# transformers < 4.58; the main venv has transformers 5), exports the tiny checkpoint, and compares
# greedy token ids (and the chat answers' text) for raw and chat prompts. Exit 0 when all agree.
#
#   scripts/check_optimum.sh                 # venv in .venv-optimum (OPTIMUM_VENV=... to move it)
#
# What optimum needs, and what a package has (see README "Hugging Face optimum"):
#   config.json beside model.onnx              copied from the checkpoint by every export
#   past_key_values.N.key/value inputs,        the names genai's phi3 graph already uses;
#   present.N.key/value outputs                optimum matches ".key"/".value" in the names
#   position_ids                               not an input (positions come from attention_mask);
#                                              optimum warns "legacy model" and runs without it
#   empty first-step cache of the right shape  optimum 0.1.0 sizes it with num_attention_heads for
#                                              model_type phi3 (not in its GQA list): fine for
#                                              Phi-3-mini / 3.5-mini (32 = 32 KV heads), rejected by
#                                              ORT for GQA models (Phi-3-medium 40/10, the tiny 8/4);
#                                              workaround: model.num_key_value_heads = config.num_key_value_heads
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OPTIMUM_VENV:-.venv-optimum}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[cpu]" "optimum-onnx[onnxruntime]==0.1.0" "transformers>=4.36,<4.58" \
    "torch==2.13.0" "safetensors>=0.4" 2>&1 | grep -v "^WARNING: Location" || true
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" - "$WORK" <<'PY'
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import phi3_onnx
from phi3_onnx.runtime import load
from phi3_onnx.runtime.options import GenerationOptions

from importlib.metadata import version

from optimum.onnxruntime import ORTModelForCausalLM  # each load warns once: no position_ids ("legacy model")

work = Path(sys.argv[1])
TINY = Path("tests/assets/tiny-phi3")
NEW = 40
PROMPTS = ["The committee reviewed the proposal and", "def join(a, b):",
           [{"role": "user", "content": "What does os.path.join do?"}],
           [{"role": "user", "content": "Return a list of the keys."}]]


def mha_copy(src: Path, dst: Path) -> Path:
    """The tiny GQA model as exact multi-head attention: each KV head repeated for its query heads
    (what GQA computes), num_key_value_heads = num_attention_heads, as in Phi-3-mini."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    for shard in dst.glob("model-*.safetensors"):
        tensors = load_file(shard)
        for name, w in tensors.items():
            if name.endswith("qkv_proj.weight"):
                q, k, v = w.split([heads * d, kv * d, kv * d])
                rep = lambda t: t.view(kv, d, -1).repeat_interleave(heads // kv, dim=0).reshape(heads * d, -1)
                tensors[name] = torch.cat([q, rep(k), rep(v)]).contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
    cfg["num_key_value_heads"] = heads
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index.get("metadata", {}).pop("total_size", None)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def ours(model, prompt) -> tuple[list[int], list[int], str]:
    ids = model.prompt_ids(prompt)
    opts = GenerationOptions(max_new_tokens=NEW)
    new = list(model.token_ids(model.new_decoder(opts, len(ids)), ids, opts))
    return ids, new, model.generate(prompt, max_new_tokens=NEW)


def optimum_greedy(ort_model, ids: list[int], stops: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = ort_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] in stops else out


def check(pkg: Path, gqa: bool) -> bool:
    from transformers import AutoTokenizer

    model, tok = load(pkg), AutoTokenizer.from_pretrained(pkg)
    stops = sorted(model.stop_token_ids)
    ort_model = ORTModelForCausalLM.from_pretrained(pkg)
    print(f"\n{pkg.name}: {ort_model.config.num_attention_heads} heads, {ort_model.config.num_key_value_heads} KV heads; "
          f"inputs {', '.join(ort_model.input_names)[:90]}...")
    if gqa:
        try:
            optimum_greedy(ort_model, model.prompt_ids(PROMPTS[0]), stops)
            print("  as loaded: ran (optimum sized the empty cache right)")
        except Exception as exc:  # onnxruntime's InvalidArgument
            print(f"  as loaded: fails: {str(exc).splitlines()[0][:150]}")
        ort_model.num_key_value_heads = ort_model.config.num_key_value_heads  # the one-line workaround
        print("  with ort_model.num_key_value_heads = config.num_key_value_heads:")
    ok = True
    for prompt in PROMPTS:
        ids, mine, text = ours(model, prompt)
        theirs = optimum_greedy(ort_model, ids, stops)
        same = mine == theirs
        chat = not isinstance(prompt, str)
        hf_text = tok.decode(theirs, skip_special_tokens=True)
        text_same = (hf_text == text) if chat else None  # a raw completion's leading space: transformers drops it
        ok &= same and text_same is not False
        label = prompt if isinstance(prompt, str) else "chat: " + prompt[-1]["content"]
        print(f"  {'OK  ' if same else 'DIFF'} {len(mine):2d} tokens  {label!r:48.48} -> {text[:40]!r}"
              + ("" if text_same is None else f"  text == transformers' decode: {text_same}"))
        if not same:
            print(f"       ours    {mine}\n       optimum {theirs}")
    return ok


print(" / ".join(f"{d} {version(d)}" for d in ("optimum-onnx", "optimum", "transformers", "onnxruntime", "phi3-onnx")))
results = []
for target in ("fp32-cpu", "int4-cpu"):
    results.append(check(phi3_onnx.export(TINY, target, work / f"tiny-{target}"), gqa=True))
mha = mha_copy(TINY, work / "tiny-mha-ckpt")
results.append(check(phi3_onnx.export(mha, "int4-cpu", work / "tiny-mha-int4-cpu"), gqa=False))
print("\nall greedy outputs agree" if all(results) else "\nMISMATCH")
sys.exit(0 if all(results) else 1)
PY
