"""Phi-3 safetensors checkpoint -> f16 GGUF for llama.cpp, streamed (one tensor in memory at a time).

usage: python benchmarks/gguf_convert.py CKPT OUT.gguf

Why not llama.cpp's convert_hf_to_gguf.py: the copy vendored in the llama-cpp-python 0.3.36 sdist
imports a `conversion` package the sdist does not ship. This writes what that converter writes for
Phi3ForCausalLM with plain RoPE (Phi-3-mini-4k / medium-4k; no LongRoPE factors), with gguf-py:
architecture `phi3`, the fused qkv (`attn_qkv`) and gate_up (`ffn_up`) matrices as in the checkpoint,
norms in f32, matrices in f16, the sliding window, and the vocabulary from gguf-py's `LlamaHfVocab`
(tokenizer.json: BPE with byte fallback, Sequence decoder) padded to vocab_size with unused tokens.
Quantize it with llama.cpp (`llama_cpp.llama_model_quantize`, see cpu_compare.py) to Q4_0 / Q4_K_M.
Needs: pip install gguf transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from phi3_onnx.checkpoint import SafetensorsCheckpoint, spec_from_folder, tensor_name  # noqa: E402

# GGUF name <- (table role, per layer)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_qkv": "qkv_proj", "attn_output": "o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_up": "gate_up_proj", "ffn_down": "down_proj",
}


def tensor_plan(spec) -> list[tuple[str, str]]:
    """(GGUF name, Hugging Face name) in file order."""
    plan = [("token_embd.weight", tensor_name("embed_tokens"))]
    for i in range(spec.num_layers):
        plan += [(f"blk.{i}.{g}.weight", tensor_name(role, i)) for g, role in LAYER_TENSORS.items()]
    plan += [("output_norm.weight", tensor_name("norm"))]
    plan += [("output.weight", tensor_name("embed_tokens" if spec.tie_word_embeddings else "lm_head"))]
    return plan


def vocab(ckpt: Path, vocab_size: int):
    import gguf

    v = gguf.LlamaHfVocab(ckpt)
    tokens, scores, types = [], [], []
    for text, score, kind in v.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]


def convert(ckpt: Path, out: Path) -> None:
    import gguf

    spec = spec_from_folder(ckpt)
    if spec.longrope is not None:
        raise SystemExit("LongRoPE checkpoints are not handled here (use llama.cpp's own converter)")
    reader = SafetensorsCheckpoint(ckpt)
    w = gguf.GGUFWriter(out, "phi3")
    w.add_name(ckpt.name)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_block_count(spec.num_layers)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = vocab(ckpt, spec.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(spec.bos_token_id)
    w.add_eos_token_id(spec.eos_token_ids[0] if spec.eos_token_ids else spec.pad_token_id)
    w.add_pad_token_id(spec.pad_token_id)
    w.add_add_bos_token(False)
    plan = tensor_plan(spec)
    for gname, hname in plan:
        shape = reader.shape(hname)
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(gname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, hname in plan:
        arr = reader.read(hname)
        w.write_tensor_data(arr if arr.ndim == 1 else arr.astype(np.float16))
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")
