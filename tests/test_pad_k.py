"""Block sizes that do not divide a layer width: the int4 packer pads K, MatMulNBits keeps the real K.

ORT's contrib-op spec: B is [N, ceil(K / block_size), block_size * bits / 8]; ORT's own
MatMulNBitsQuantizer zero-pads the last block. Checked on one node against numpy, and end to end
on a checkpoint of width 192 / 352 (block 128 divides neither) against the fp32 export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from phi3_onnx.quantize.rtn import dequantize_int4, k_blocks, quantize_int4

HELDOUT = Path(__file__).resolve().parent / "assets" / "corpus" / "heldout.txt"
TINY = Path(__file__).resolve().parent / "assets" / "tiny-phi3"


def matmul_nbits(x: np.ndarray, w_nk: np.ndarray, block: int, level: int) -> np.ndarray:
    """One MatMulNBits node on ORT's CPU EP over the packed weight."""
    n, k = w_nk.shape
    q = quantize_int4(w_nk, block)
    inits = [onnx.numpy_helper.from_array(q.packed, "B"), onnx.numpy_helper.from_array(q.scales, "scales")]
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("k, block", [(192, 128), (352, 128), (352, 64), (100, 32), (40, 128)])
def test_padded_blocks_pack_and_run_like_numpy(k, block):
    rng = np.random.default_rng(k + block)
    w = rng.normal(0, 0.05, (48, k)).astype(np.float32)
    x = rng.normal(0, 1, (5, k)).astype(np.float32)
    q = quantize_int4(w, block)
    assert q.packed.shape == (48, k_blocks(k, block), block // 2) and q.scales.shape == (48 * k_blocks(k, block),)
    dq = dequantize_int4(q, 48, k, block)
    # the same blocks as quantizing the weight with zero input features appended (what the padding means)
    wide = quantize_int4(np.pad(w, ((0, 0), (0, k_blocks(k, block) * block - k))), block)
    assert np.array_equal(wide.packed, q.packed) and np.array_equal(wide.scales, q.scales)
    # every value within one step of its block's scale (codes -8..7: the extreme of one sign saturates at 7)
    step = np.repeat(np.abs(q.scales.reshape(48, -1)), block, axis=1)[:, :k]
    assert np.all(np.abs(dq - w) <= step + 1e-7)
    assert matmul_nbits(x, w, block, level=0) == pytest.approx(x @ dq.T, abs=1e-4)
    ref = x @ dq.T  # level 4 (int8 activations, blocks along K like the weight's): within int8 rounding
    assert np.abs(matmul_nbits(x, w, block, level=4) - ref).max() < 0.02 * np.abs(ref).max()


@pytest.fixture(scope="module")
def wide192(tmp_path_factory) -> Path:
    """Random Phi-3 with hidden 192, intermediate 352, 6 heads of 32 (2 KV heads), the tiny tokenizer."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out = tmp_path_factory.mktemp("ckpt") / "wide192"
    cfg = Phi3Config(vocab_size=2064, hidden_size=192, intermediate_size=352, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
                     rope_theta=10000.0, bos_token_id=1, eos_token_id=2048, pad_token_id=2048, initializer_range=0.1,
                     tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(TINY / name, out / name)
    return out


def window_logits(pkg: Path, ids: np.ndarray) -> np.ndarray:
    manifest = json.loads((pkg / "manifest.json").read_text())["model"]
    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    head_dim = manifest["hidden_size"] // manifest["num_heads"]
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, ids.size), np.int64)}
    for i in range(manifest["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, manifest["num_kv_heads"], 0, head_dim), np.float32)
    return sess.run(["logits"], feeds)[0][0].astype(np.float64)


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean()), float((ref.argmax(-1) == got.argmax(-1)).mean())


def dequantized_copy(ckpt: Path, out: Path, block: int) -> Path:
    """The checkpoint with every int4-quantized weight replaced by its RTN-dequantized self (float32)."""
    from safetensors.numpy import save_file

    from phi3_onnx.checkpoint import SafetensorsCheckpoint
    from phi3_onnx.checkpoint.tensors import parse_name

    shutil.copytree(ckpt, out)
    reader = SafetensorsCheckpoint(ckpt)
    tensors = {}
    for name in reader.entries:
        w = reader.read(name)
        role = parse_name(name).role
        if role in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
            w = dequantize_int4(quantize_int4(w, block), *w.shape, block)
        tensors[name] = np.ascontiguousarray(w, dtype=np.float32)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_block_128_on_width_192_matches_its_dequantized_weights(wide192, exported, tmp_path):
    """End to end, every MatMulNBits padded (K = 192 and 352, block 128): the int4 package's logits
    are those of the fp32 graph over the dequantized weights (accuracy level 0: fp32 compute)."""
    from tokenizers import Tokenizer

    b128 = exported("int4-cpu", wide192, block_size=128, accuracy_level=0)
    model = onnx.load(str(b128 / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nbits for a in n.attribute if a.name == "K"} == {192, 352}
    assert all(a.i == 128 for n in nbits for a in n.attribute if a.name == "block_size")
    assert json.loads((b128 / "manifest.json").read_text())["recipe"]["quantization"]["block_size"] == 128
    reference = exported("fp32-cpu", dequantized_copy(wide192, tmp_path / "dq128", 128))

    ids = np.array(Tokenizer.from_file(str(b128 / "tokenizer.json")).encode(HELDOUT.read_text()).ids[:96])
    ref, got = window_logits(reference, ids), window_logits(b128, ids)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max() + 1e-4
    kl, top1 = kl_top1(ref, got)
    assert kl < 1e-6 and top1 == 1.0
    # for the record: what the coarser, padded blocks cost against the float model (random weights: large)
    fp32 = window_logits(exported("fp32-cpu", wide192), ids)
    b32 = window_logits(exported("int4-cpu", wide192, accuracy_level=0), ids)
    print(f"\nwidth 192/352 vs fp32 (random weights): KL block 32 {kl_top1(fp32, b32)[0]:.4f}, "
          f"block 128 padded {kl_top1(fp32, got)[0]:.4f}")


def test_awq_emulates_the_padded_packer_exactly():
    """AWQ's search scores blocks with fake_int4: for a K that the block does not divide it must be
    what the packer (zero-padded) produces, or AWQ would optimise something other than what runs."""
    import torch

    from phi3_onnx.quantize.awq_search import SearchGrid, apply_blocks, block_gram, fake_int4, search_blocks

    w = torch.from_numpy(np.random.default_rng(3).normal(0, 0.05, (24, 192)).astype(np.float32))
    packed = dequantize_int4(quantize_int4(w.numpy(), 128), 24, 192, 128)
    assert torch.allclose(fake_int4(w, 128), torch.from_numpy(packed).float(), atol=1e-7)
    x = torch.from_numpy(np.random.default_rng(4).normal(0, 1, (300, 192)).astype(np.float32))
    gram = block_gram(x, 128)
    assert gram.shape == (2, 128, 128) and float(gram[1, 64:].abs().max()) == 0.0
    choice = search_blocks(w, gram, 128, SearchGrid())
    assert choice.clip.shape == (24, 2)
    assert apply_blocks(w, choice, 128, SearchGrid()).shape == (24, 192)


@pytest.mark.slow
def test_awq_block_128_on_width_192(wide192, exported):
    """AWQ at a block that divides neither width: exports, and tracks fp32 at least about as well as RTN."""
    from tokenizers import Tokenizer

    awq = exported("int4-awq-cpu", wide192, block_size=128)
    model = onnx.load(str(awq / "model.onnx"), load_external_data=False)
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "K"} == {192, 352}
    ids = np.array(Tokenizer.from_file(str(awq / "tokenizer.json")).encode(HELDOUT.read_text()).ids[:96])
    fp32 = window_logits(exported("fp32-cpu", wide192), ids)
    kl_awq, _ = kl_top1(fp32, window_logits(awq, ids))
    kl_rtn, _ = kl_top1(fp32, window_logits(exported("int4-cpu", wide192, block_size=128), ids))
    print(f"\nwidth 192/352, block 128, vs fp32 (random weights): KL RTN {kl_rtn:.4f}, AWQ {kl_awq:.4f}")
    assert np.isfinite(kl_awq) and kl_awq < 1.5 * kl_rtn
