"""AWQ: the PyTorch layer matches transformers, the search's int4 emulation matches ORT's packer,
the folded scales leave the float model unchanged, and AWQ beats our own RTN at the same block size.

All accuracy comparisons are against the fp32-cpu export of the same checkpoint, on held-out text
that the calibration text does not contain.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from phi3_onnx.checkpoint import SafetensorsCheckpoint, spec_from_folder  # noqa: E402
from phi3_onnx.manifest import read_manifest  # noqa: E402
from phi3_onnx.quantize import torch_phi3 as tp  # noqa: E402
from phi3_onnx.quantize.awq import AwqSettings, awq_weights, calibration_text, qkv_rows  # noqa: E402
from phi3_onnx.quantize.awq_search import BlockChoice, SearchGrid, apply_blocks, fake_int4  # noqa: E402
from phi3_onnx.quantize.rtn import dequantize_int4, quantize_int4  # noqa: E402
from phi3_onnx.targets import TARGETS, Target  # noqa: E402

HELDOUT = Path(__file__).resolve().parent / "assets/corpus/heldout.txt"
BLOCK = 128
TEST_SETTINGS = AwqSettings(samples=16, seq_len=128)
EVAL_WINDOWS, EVAL_LEN = 24, 256


# ----------------------------------------------------------------------------- helpers


def rtn_target() -> Target:
    return TARGETS["int4-cpu"].with_overrides(block_size=BLOCK)


def awq_target() -> Target:
    """int4-cpu's graph at block 128 with method awq: only the weights differ from RTN's package."""
    rtn = rtn_target()
    return dataclasses.replace(rtn, name="int4-awq-cpu-b128", quant=dataclasses.replace(rtn.quant, method="awq"))


def heldout_ids(ckpt: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(HELDOUT.read_text(encoding="utf-8")).ids
    n = min(EVAL_WINDOWS, len(ids) // EVAL_LEN)
    return np.array([ids[i * EVAL_LEN:(i + 1) * EVAL_LEN] for i in range(n)], dtype=np.int64)


def package_logprobs(package: Path, ids: np.ndarray) -> np.ndarray:
    """Full-sequence log-probabilities [windows, seq, vocab] from a package with plain ORT (no cache)."""
    spec = spec_from_folder(package)
    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for row in ids:
        feeds = {"input_ids": row[None], "attention_mask": np.ones_like(row[None])}
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        feeds |= {f"past_key_values.{i}.{kv}": empty for i in range(spec.num_layers) for kv in ("key", "value")}
        logits = sess.run(["logits"], feeds)[0][0].astype(np.float64)
        out.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    return np.stack(out)


@dataclasses.dataclass(frozen=True)
class Drift:
    kl: float  # mean token KL(fp32 || variant)
    top1: float  # fraction of positions whose argmax matches fp32's
    ppl: float

    def __str__(self) -> str:
        return f"KL {self.kl:.5f}  top-1 {self.top1:.4f}  ppl {self.ppl:.3f}"


def drift(ref: np.ndarray, var: np.ndarray, ids: np.ndarray) -> Drift:
    kl = float((np.exp(ref) * (ref - var)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == var.argmax(-1)).mean())
    nll = -np.take_along_axis(var[:, :-1], ids[:, 1:, None], -1).mean()
    return Drift(kl, top1, float(np.exp(nll)))


def calibration_halves(tmp: Path) -> list[Path]:
    """The built-in calibration text split at the paragraph boundary nearest its middle."""
    text = calibration_text(None)
    cut = text.find("\n\n", len(text) // 2)
    paths = [tmp / "calib-first-half.txt", tmp / "calib-second-half.txt"]
    for path, part in zip(paths, (text[:cut], text[cut:])):
        path.write_text(part.strip() + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- unit tests


def test_layer_forward_matches_transformers(tiny_ckpt: Path) -> None:
    """Our Phi-3 layer (used to collect AWQ's statistics) reproduces transformers' hidden states."""
    from transformers import Phi3ForCausalLM

    spec, ckpt = spec_from_folder(tiny_ckpt), SafetensorsCheckpoint(tiny_ckpt)
    model = Phi3ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    ids = torch.tensor(heldout_ids(tiny_ckpt)[:2, :200])
    with torch.inference_mode():
        ref = model(ids, output_hidden_states=True).hidden_states
        x, rope = ref[0], tp.rotary_for(spec, ids.shape[1], torch.device("cpu"))
        for i in range(spec.num_layers - 1):  # the last entry is after the final norm
            x = tp.layer_forward(spec, tp.load_layer(ckpt, i, torch.device("cpu")), x, rope)
            err = (x - ref[i + 1]).abs().max().item() / ref[i + 1].abs().max().item()
            assert err < 1e-5, f"layer {i}: relative error {err:.2e}"


def random_choice(rng: np.random.Generator, rows: int, blocks: int) -> BlockChoice:
    clip = torch.from_numpy(rng.integers(0, SearchGrid().clip_points, (rows, blocks)).astype(np.uint8))
    return BlockChoice(clip, torch.from_numpy(rng.uniform(0.8, 1.25, (rows, blocks)).astype(np.float16)))


@pytest.mark.parametrize("block", [32, 128])
def test_fake_int4_matches_ort_packer(block: int) -> None:
    """The search optimises what MatMulNBits computes: emulation == ORT kernel, clipped/refit or not."""
    rng = np.random.default_rng(block)
    w = (rng.standard_normal((64, 512)) * rng.uniform(0.05, 3.0, (1, 512))).astype(np.float32)
    choice = random_choice(rng, 64, 512 // block)
    for weight in (torch.from_numpy(w), apply_blocks(torch.from_numpy(w), choice, block, SearchGrid())):
        ort_dq = dequantize_int4(quantize_int4(weight.numpy(), block), 64, 512, block)
        step = np.abs(ort_dq).reshape(64, -1, block).max(-1, keepdims=True) / 8  # one int4 step per block
        diff = np.abs(fake_int4(weight, block).numpy() - ort_dq).reshape(64, -1, block)
        assert (diff <= 1e-5 * step).all(), f"max diff {diff.max()} (one step ~{step.min()})"


def test_block_choice_sets_ort_scale(tiny_ckpt: Path) -> None:
    """A block returned as alpha * clamp(w, ±c) gets ORT scale alpha * c / 8: the choice reaches the package."""
    w = torch.from_numpy(SafetensorsCheckpoint(tiny_ckpt).read("model.layers.0.mlp.down_proj.weight"))
    shape = (w.shape[0], w.shape[1] // BLOCK)
    step = SearchGrid().clip_points // 2  # shrink 1 - max_shrink / 2 = 0.75
    choice = BlockChoice(torch.full(shape, step, dtype=torch.uint8), torch.full(shape, 1.125, dtype=torch.float16))
    scales = np.abs(quantize_int4(apply_blocks(w, choice, BLOCK, SearchGrid()).numpy(), BLOCK).scales)
    absmax = w.abs().reshape(w.shape[0], -1, BLOCK).amax(-1).numpy().reshape(-1)
    np.testing.assert_allclose(scales, 1.125 * 0.75 * absmax / 8, rtol=1e-6)


def test_qkv_rows_of_some_kv_heads_give_their_attention_output(tiny_ckpt: Path) -> None:
    """The qkv scale search's head subset: attention over those rows is the full attention's slice (GQA)."""
    spec, ckpt = spec_from_folder(tiny_ckpt), SafetensorsCheckpoint(tiny_ckpt)
    w = tp.load_layer(ckpt, 1, torch.device("cpu"))
    h = torch.randn(2, 64, spec.hidden_size)
    rope = tp.rotary_for(spec, 64, torch.device("cpu"))
    kv_heads = torch.tensor([1, 3])
    rows, sizes = qkv_rows(spec, kv_heads)
    sub = tp.attend(spec, *(h @ w.qkv_proj[rows].T).split(sizes, -1), rope)
    group, hd = spec.num_heads // spec.num_kv_heads, spec.head_dim
    full = tp.attention(spec, h @ w.qkv_proj.T, rope).view(2, 64, spec.num_kv_heads, group * hd)
    torch.testing.assert_close(sub, full[:, :, kv_heads].reshape(2, 64, -1), rtol=1e-5, atol=1e-6)


def test_folded_scales_leave_the_float_model_unchanged(tiny_ckpt: Path, exported, tmp_path: Path) -> None:
    """fp32 export of AWQ's scaled weights (no clipping, no rounding) gives the original logits."""
    spec = spec_from_folder(tiny_ckpt)
    weights = awq_weights(tiny_ckpt, spec, awq_target().quant, None, 8, settings=TEST_SETTINGS)
    scales = torch.cat([torch.cat([l.scales.qkv, l.scales.o, l.scales.gate_up, l.scales.down]) for l in weights.layers])
    assert (scales - 1).abs().max() > 0.1, "AWQ chose no scaling at all: the equivalence check would be vacuous"
    from phi3_onnx import export

    folded = export(tiny_ckpt, "fp32-cpu", tmp_path / "fp32-folded", weights=weights.without_clipping())
    ids = heldout_ids(tiny_ckpt)[:4]
    ref, got = package_logprobs(exported("fp32-cpu"), ids), package_logprobs(folded, ids)
    assert np.abs(got - ref).max() < 1e-4


def _cli(capsys, args: list[str]) -> tuple[int, str]:
    from phi3_onnx.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_cli_missing_calibration_file_is_one_line(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    code, err = _cli(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-awq-cpu", "-o", str(tmp_path / "o"),
                              "--calibration", str(tmp_path / "nope.txt")])
    assert code == 2 and err.count("\n") == 1 and "calibration file not found" in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))


def test_cli_awq_export_with_calibration_options(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    import json

    calib = calibration_halves(tmp_path)[0]
    code, err = _cli(capsys, ["export", "-m", str(tiny_ckpt), "-t", "int4-awq-cpu", "-o", str(tmp_path / "o"),
                              "--calibration", str(calib), "--calibration-samples", "2"])
    assert code == 0, err
    assert "AWQ calibration (2 x 256 tokens)" in err, err  # the option reached the quantizer
    assert json.loads((tmp_path / "o/manifest.json").read_text())["target"]["quant"]["method"] == "awq"


def test_cli_without_torch_names_the_extra(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A fresh interpreter where `import torch` fails like an absent install: one line naming the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from phi3_onnx.cli import main; "
            f"sys.exit(main(['export', '-m', {str(tiny_ckpt)!r}, '-t', 'int4-awq-cpu', '-o', {str(tmp_path / 'o')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "pip install 'phi3-onnx[awq]'" in run.stderr, run.stderr


# ----------------------------------------------------------------------------- the claim


@pytest.fixture(scope="module")
def quality(tiny_ckpt: Path, exported, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Drift]:
    """Drift from fp32 of RTN and of AWQ calibrated on each half of the calibration text."""
    from phi3_onnx import export

    tmp = tmp_path_factory.mktemp("awq")
    ids = heldout_ids(tiny_ckpt)
    ref = package_logprobs(exported("fp32-cpu"), ids)
    results = {"fp32": drift(ref, ref, ids), "rtn": drift(ref, package_logprobs(exported("int4-cpu", block_size=BLOCK), ids), ids)}
    for half in calibration_halves(tmp):
        # through the exporter's AWQ dispatch, with the shipped defaults (8 x 256 tokens)
        pkg = export(tiny_ckpt, awq_target(), tmp / f"awq-{half.stem}", calibration=str(half))
        results[f"awq/{half.stem}"] = drift(ref, package_logprobs(pkg, ids), ids)
        recorded = read_manifest(pkg).recipe["quantization"]
        assert recorded["method"] == "awq" and recorded["block_size"] == BLOCK
        assert recorded["calibration"] == {"file": half.name, "sha256": hashlib.sha256(half.read_bytes()).hexdigest(),
                                           "samples": 8, "tokens_per_sample": 256}
    print(f"\nheld-out drift from fp32, {ids.size} tokens, int4 block {BLOCK}:")
    for name, d in results.items():
        print(f"  {name:28s} {d}" + (f"  (KL {d.kl / results['rtn'].kl:.2f} x RTN)" if name.startswith("awq") else ""))
    return results


@pytest.mark.parametrize("half", ["calib-first-half", "calib-second-half"])
def test_awq_beats_rtn_at_the_same_block_size(quality: dict[str, Drift], half: str) -> None:
    rtn, awq = quality["rtn"], quality[f"awq/{half}"]
    assert awq.kl <= 0.85 * rtn.kl, f"AWQ {awq} vs RTN {rtn}"
    assert awq.top1 > rtn.top1, f"AWQ {awq} vs RTN {rtn}"
    # Perplexity: no worse than RTN's, strictly. Measured (24 x 256 held-out tokens): RTN 203.19;
    # AWQ 202.73 calibrated on the first half, 201.94 on the second (KL 0.57x RTN's on both).
    assert awq.ppl <= rtn.ppl, f"AWQ {awq} vs RTN {rtn}"
