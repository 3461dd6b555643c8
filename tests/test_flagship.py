"""The AWQ flagships (issue 10): one block size for every MatMulNBits, exactly int4-cpu's graph at that
block size (so their speed is that graph's), and at least as accurate as int4-cpu (RTN block 32).

The accuracy claim is checked on tests/assets/tiny-phi3-w192, a second trained checkpoint whose widths
(hidden 192, MLP 864, qkv 320) are not multiples of 128 and which AWQ's design was not tuned on, against
its fp32-cpu export on held-out text the calibration text does not contain (benchmarks/frontier_accuracy.py
has the whole block x method x accuracy-level table).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from helpers import TINY_PHI3, TINY_PHI3_W192

from phi3_onnx.manifest import read_manifest
from phi3_onnx.targets import FLAGSHIP_BLOCK, TARGETS

pytest.importorskip("torch")

HELDOUT = Path(__file__).resolve().parent / "assets/corpus/heldout.txt"
FLAGSHIPS = ("int4-awq-cpu", "int4-awq-cuda", "int4-awq-dml")
# the RTN target whose graph each flagship must equal at FLAGSHIP_BLOCK (DML has no RTN twin)
TWIN = {"int4-awq-cpu": "int4-cpu", "int4-awq-cuda": "int4-cuda"}
CHECKPOINTS = {"tiny-phi3": TINY_PHI3, "tiny-phi3-w192": TINY_PHI3_W192}


def test_flagship_block_size_and_the_rtn_baseline() -> None:
    assert FLAGSHIP_BLOCK == 128
    for name in FLAGSHIPS:
        assert TARGETS[name].quant.method == "awq" and TARGETS[name].quant.block_size == FLAGSHIP_BLOCK, name
    for flagship, rtn in TWIN.items():
        a, b = TARGETS[flagship], TARGETS[rtn]
        assert b.quant.method == "rtn" and b.quant.block_size == 32, "int4-cpu/int4-cuda stay RTN block 32"
        assert (a.quant.accuracy_level, a.quant.quantize_lm_head, a.quant.quantize_embedding, a.graph, a.io_dtype,
                a.provider) == (b.quant.accuracy_level, b.quant.quantize_lm_head, b.quant.quantize_embedding,
                                b.graph, b.io_dtype, b.provider)


def _structure(folder: Path) -> dict:
    """Everything about a graph except the weights' values: nodes with their attributes, I/O, initializer shapes."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    g = model.graph
    return {
        "opsets": sorted((o.domain, o.version) for o in model.opset_import),
        "inputs": [str(i) for i in g.input],
        "outputs": [str(o) for o in g.output],
        "nodes": [(n.op_type, n.domain, n.name, list(n.input), list(n.output),
                   sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)) for n in g.node],
        "initializers": [(t.name, list(t.dims), t.data_type) for t in g.initializer],
    }


def _block_sizes(folder: Path) -> set[int]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}


@pytest.mark.parametrize("ckpt", sorted(CHECKPOINTS))
@pytest.mark.parametrize("flagship", sorted(TWIN))
def test_flagship_graph_is_its_rtn_twin_at_the_flagship_block(flagship: str, ckpt: str, exported) -> None:
    """int4-awq-cpu == int4-cpu --block-size 128 (and the CUDA pair) in every node, attribute, input and
    initializer shape; only the weights' values differ (AWQ's)."""
    awq = exported(flagship, CHECKPOINTS[ckpt])
    rtn = exported(TWIN[flagship], CHECKPOINTS[ckpt], block_size=FLAGSHIP_BLOCK)
    assert _structure(awq) == _structure(rtn)
    assert _block_sizes(awq) == {FLAGSHIP_BLOCK}  # every MatMulNBits, lm_head included
    assert (awq / "model.onnx.data").read_bytes() != (rtn / "model.onnx.data").read_bytes(), "AWQ changed no weight"
    recipe = read_manifest(awq).recipe["quantization"]
    assert (recipe["method"], recipe["block_size"], recipe["accuracy_level"]) == (
        "awq", FLAGSHIP_BLOCK, TARGETS[flagship].quant.accuracy_level)
    assert recipe["rounding"] == "gptq"
    genai = [json.loads((p / "genai_config.json").read_text()) for p in (awq, rtn)]
    assert genai[0] == genai[1]


def test_dml_flagship_uses_the_flagship_block(exported) -> None:
    pkg = exported("int4-awq-dml", TINY_PHI3_W192)
    assert _block_sizes(pkg) == {FLAGSHIP_BLOCK}
    assert read_manifest(pkg).recipe["quantization"]["block_size"] == FLAGSHIP_BLOCK


# Measured (benchmarks/results/frontier_accuracy.md, CPU EP, 8192 held-out tokens): KL vs fp32 of the
# flagship / of int4-cpu = 0.40x on tiny-phi3, 0.88x on tiny-phi3-w192. Over 256..8192 tokens the w192
# ratio stays within 0.87..0.92x (0.92x at this test's 512), so the assertion has ~8 % margin there.
EVAL_TOKENS = 512
MAX_RATIO = 1.0  # the requirement: flagship KL <= int4-cpu KL


@pytest.mark.parametrize("ckpt", ["tiny-phi3-w192", "tiny-phi3"])
@pytest.mark.parametrize("flagship", FLAGSHIPS)
def test_flagship_at_least_as_accurate_as_int4_cpu(flagship: str, ckpt: str, exported, tmp_path: Path) -> None:
    """Held-out KL(fp32 || flagship) <= KL(fp32 || int4-cpu), both through `phi3-onnx eval` on the CPU EP."""
    from phi3_onnx.cli import main

    path, reference = CHECKPOINTS[ckpt], exported("fp32-cpu", CHECKPOINTS[ckpt])
    rows = {}
    for name in (flagship, "int4-cpu"):
        out = tmp_path / f"{name}.json"
        main(["eval", str(exported(name, path)), "--reference", str(reference), "--data", str(HELDOUT),
              "--max-tokens", str(EVAL_TOKENS), "--json", str(out), "--quiet"])
        (rows[name],) = json.loads(out.read_text())["variants"]
    assert all(v["status"] == "pass" for v in rows.values()), rows  # the targets' own eval limits hold too
    awq, rtn = rows[flagship]["metrics"], rows["int4-cpu"]["metrics"]
    ratio = awq["kl_mean"] / rtn["kl_mean"]
    print(f"\n{ckpt} {flagship}: KL {awq['kl_mean']:.5f} vs int4-cpu {rtn['kl_mean']:.5f} ({ratio:.2f}x), "
          f"top-1 {awq['top1']:.4f} vs {rtn['top1']:.4f}, {awq['tokens']} tokens")
    assert ratio <= MAX_RATIO, f"{flagship} KL {awq['kl_mean']:.5f} > int4-cpu {rtn['kl_mean']:.5f}"


@pytest.mark.parametrize(("k", "block"), [(864, 128), (192, 128), (512, 32)])
def test_gptq_codes_survive_orts_packer(k: int, block: int) -> None:
    """AWQ's GPTQ rounding hands the packer codes * scale with one code per block pinned to -8: ORT's
    absmax packer must find exactly that scale and those codes (widths that blocks do not divide too),
    and the codes must lower the output error against the clip-only rounding on the same scales."""
    import numpy as np
    import torch

    from phi3_onnx.quantize.awq_search import (
        BlockChoice,
        SearchGrid,
        apply_blocks,
        block_gram,
        fake_int4,
        gptq_codes,
        search_blocks,
    )
    from phi3_onnx.quantize.rtn import dequantize_int4, quantize_int4

    rng = np.random.default_rng(k)
    n = 48
    w = torch.from_numpy((rng.standard_normal((n, k)) * rng.uniform(0.05, 3.0, (1, k))).astype(np.float32))
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k) + np.eye(k, dtype=np.float32)  # correlated inputs
    x = torch.from_numpy((rng.standard_normal((1500, k)) @ mix * rng.uniform(0.1, 2, (1, k))).astype(np.float32))
    grid = SearchGrid()
    assert grid.gptq, "GPTQ rounding is AWQ's default"
    clip = search_blocks(w, block_gram(x, block), block, grid)
    codes = gptq_codes(w, x.T @ x, clip, block, grid)
    delivered = apply_blocks(w, BlockChoice(clip.clip, clip.alpha, codes), block, grid)
    packed = torch.from_numpy(dequantize_int4(quantize_int4(delivered.numpy(), block), n, k, block)).float()
    torch.testing.assert_close(packed, delivered, rtol=0, atol=1e-6)
    err = lambda v: float(((v - w) @ x.T).pow(2).sum())
    assert err(packed) < 0.95 * err(fake_int4(apply_blocks(w, clip, block, grid), block))
