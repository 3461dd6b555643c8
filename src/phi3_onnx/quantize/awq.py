"""Activation-aware weight quantization (AWQ) done by phi3-onnx itself, as a pre-pass of the export.

Two steps, like gpt-fast's quantizer:

1. `calibrate` streams the checkpoint one decoder layer at a time: run the calibration hidden
   states through the layer (PyTorch, float32), record every linear's input statistics, search
   each linear's input-channel scale s and then per block a clip value and a refit factor, then
   (GPTQ, `SearchGrid.gptq`) the int4 codes under those block scales against the linear's full
   input Gram, and move on with the layer's unquantized outputs; lm_head last (int4 in our
   targets, unlike AutoAWQ's: blocks and codes only).
   Result: an `AwqResult` (scales, uint8 clip indices, float16 refit factors, 4-bit codes).
2. `AwqWeights` is a `WeightSource`: it reads the checkpoint and returns the rescaled, clipped
   tensors, which the exporter packs with the ordinary RTN int4 kernel. Returning a block as
   alpha * clamp(w, ±c) makes ORT's absmax-based scale alpha * c / 8 with the clip's codes; with
   GPTQ the block is codes * that scale, one code pinned to -8, so ORT's packer finds the same
   scale and codes (tests/test_flagship.py checks it through ORT's packer).

Why GPTQ: at block 128 (the flagships' block, 1.30x int4-cpu's block-32 decode) clip + refit alone
left the second tiny checkpoint (tests/assets/tiny-phi3-w192) at 1.06x int4-cpu's held-out KL; with
GPTQ's rounding 0.89x there and 0.41x on tiny-phi3 (benchmarks/results/frontier_accuracy.md).

This module needs PyTorch (the `[awq]` extra); the exporter imports it only for AWQ targets.

Where each scale is folded (the preceding op absorbs 1/s, so the float model is unchanged):

    input_layernorm γ / s_qkv       ──▶ qkv_proj W · diag(s_qkv)
    v rows of qkv_proj / s_o        ──▶ o_proj W · diag(s_o)
    post_attention_layernorm γ / s_gu ─▶ gate_up_proj W · diag(s_gu)
    up rows of gate_up_proj / s_down ──▶ down_proj W · diag(s_down)     (silu(gate) * up is linear in up)

o_proj with grouped-query attention: attention output channel (head h, dim d) is a mix of v
channel (kv head h // group, d), so one v row feeds `group` o_proj inputs. We tie s_o across the
query heads sharing a KV head (geometric mean), which keeps the fold exact for any GQA ratio
(Phi-3-medium: 40 query / 10 KV heads); with num_heads == num_kv_heads the tie does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint
from phi3_onnx.checkpoint.tensors import parse_name, tensor_name
from phi3_onnx.progress import task
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import QuantRecipe
from phi3_onnx.quantize import CALIBRATION_SEQ_LEN, DEFAULT_CALIBRATION_SAMPLES
from phi3_onnx.quantize import torch_phi3 as tp
from phi3_onnx.quantize.awq_search import (BlockChoice, SearchGrid, apply_blocks, best_scale, block_gram, evenly_spaced,
                                           gptq_codes, normalized_weight_mean, pad_k, scale_candidates, search_blocks, search_scale)

DEFAULT_SAMPLES = DEFAULT_CALIBRATION_SAMPLES


def _usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the cores this process may use
    return len(affinity(0)) if affinity else os.cpu_count() or 1


@dataclass(frozen=True)
class AwqSettings:
    """How much calibration data AWQ sees; defaults sized for Phi-3-mini in well under 30 min on 2 CPU cores.

    (Measured, full-size random-weight Phi-3-mini, benchmarks/awq_bench.sh on the 2-core machine:
    calibration 736 s + packing 124 s = 14.5 min, peak RSS 2.7 GiB. One layer timed alone on one
    core: ~27 s, of which forward 6, scale search 5, clip search 15. That was block 32 without
    GPTQ; at block 128 with GPTQ one layer took 71 s vs 36 s without it on the shared machine, so
    expect ~2x the calibration time: not re-measured end to end.)
    """

    samples: int = DEFAULT_SAMPLES  # calibration sequences
    seq_len: int = CALIBRATION_SEQ_LEN  # tokens per sequence
    search_tokens: int = 512  # tokens (evenly subsampled) whose output error the scale search measures
    batch: int = 4  # sequences per forward pass
    # CPU threads for the search: all cores but one. On a shared 2-core machine OpenMP's spinning
    # made two threads 5x slower than one under load (1.35x faster when idle); measured.
    cpu_threads: int = field(default_factory=lambda: max(1, _usable_cores() - 1))
    grid: SearchGrid = field(default_factory=SearchGrid)


# ----------------------------------------------------------------------------- calibration data


def calibration_text(path: str | Path | None) -> str:
    """The user's calibration file, or the one shipped with the package."""
    if path is None:
        return resources.files("phi3_onnx.data").joinpath("calibration.txt").read_text(encoding="utf-8")
    p = Path(path)
    if not p.is_file():
        raise Phi3OnnxError(f"calibration file not found: {path}")
    return p.read_text(encoding="utf-8")


def calibration_ids(folder: Path, text: str, settings: AwqSettings) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, spread evenly over the text tokenized by the checkpoint's
    tokenizer.json: [samples, seq_len]."""
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise Phi3OnnxError(f"AWQ needs the checkpoint's tokenizer.json to tokenize calibration text ({folder})")
    return calibration_windows(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids, settings)


def calibration_windows(ids: list[int], settings: AwqSettings) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, spread evenly over the tokenized text `ids`: [samples, seq_len]."""
    n = min(settings.samples, len(ids) // settings.seq_len)
    if n < 1:
        raise Phi3OnnxError(f"calibration text has {len(ids)} tokens; AWQ needs at least {settings.seq_len}")
    starts = np.linspace(0, len(ids) - settings.seq_len, n).round().astype(int)
    return torch.tensor([ids[s:s + settings.seq_len] for s in starts], dtype=torch.long)


# ----------------------------------------------------------------------------- statistics


@dataclass
class LinearStats:
    """What the searches need about one linear's input: mean |x|, block Gram matrices, a token sample."""

    abs_sum: torch.Tensor
    gram: torch.Tensor
    sample: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    full_gram: torch.Tensor | None = None  # X^T X [K, K], for GPTQ's rounding only

    @classmethod
    def empty(cls, like: torch.Tensor, block: int, gptq: bool) -> LinearStats:
        """No tokens yet, for a linear whose inputs look like `like` [tokens, in_features]."""
        k = like.shape[1]
        return cls(like.new_zeros(k), like.new_zeros(-(-k // block), block, block), full_gram=like.new_zeros(k, k) if gptq else None)

    def add(self, x: torch.Tensor, block: int, stride: int) -> None:
        self.abs_sum += x.abs().sum(0)
        self.gram += block_gram(x, block)
        if self.full_gram is not None:
            self.full_gram += x.T @ x
        self.sample.append(x[::stride].clone())
        self.tokens += x.shape[0]

    @property
    def x_mean(self) -> torch.Tensor:
        return self.abs_sum / self.tokens

    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.sample)


LayerForward = Callable[[torch.Tensor, tp.Observer], torch.Tensor]  # (hidden states [batch, seq, hidden], observer) -> outputs


def collect_stats(forward: LayerForward, x: torch.Tensor, block: int, settings: AwqSettings) -> tuple[torch.Tensor, dict[str, LinearStats]]:
    """A layer's outputs for all calibration sequences x (`settings.batch` at a time), and the statistics of
    each linear's input, which `forward` hands to its observer."""
    stats: dict[str, LinearStats] = {}
    stride = max(1, x.shape[0] * x.shape[1] // settings.search_tokens)

    def observe(name: str, inp: torch.Tensor) -> None:
        if name not in stats:
            stats[name] = LinearStats.empty(inp, block, settings.grid.gptq)
        stats[name].add(inp, block, stride)

    outs = [forward(x[i:i + settings.batch], observe) for i in range(0, x.shape[0], settings.batch)]
    return torch.cat(outs), stats


def run_layer(spec: ModelSpec, w: tp.LayerWeights, x: torch.Tensor, rope: tp.Rotary, block: int, settings: AwqSettings) -> tuple[torch.Tensor, dict[str, LinearStats]]:
    """The Phi-3 layer's outputs for all calibration sequences, and the statistics of each linear's input."""
    return collect_stats(lambda xb, observe: tp.layer_forward(spec, w, xb, rope, observe), x, block, settings)


# ----------------------------------------------------------------------------- folding


@dataclass
class LayerScales:
    """Input-channel scales of a layer's four linears (o_proj's tied across query heads of a KV head)."""

    qkv: torch.Tensor  # [hidden]
    o: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [hidden]
    down: torch.Tensor  # [intermediate]


def tie_heads(spec: ModelSpec, s: torch.Tensor) -> torch.Tensor:
    """Geometric mean of s over the query heads that share a KV head, broadcast back: [hidden]."""
    group = spec.num_heads // spec.num_kv_heads
    if group == 1:
        return s
    g = s.log().view(spec.num_kv_heads, group, spec.head_dim).mean(1, keepdim=True)
    return g.exp().expand(-1, group, -1).reshape(-1)


def v_row_scale(spec: ModelSpec, s_o: torch.Tensor) -> torch.Tensor:
    """The per-v-row divisor [kv_dim] that o_proj's tied scale folds into."""
    group = spec.num_heads // spec.num_kv_heads
    return s_o.view(spec.num_kv_heads, group, spec.head_dim)[:, 0].reshape(-1)


def fold(spec: ModelSpec, name: str, w: torch.Tensor, s: LayerScales) -> torch.Tensor:
    """One layer tensor (its role in `checkpoint.tensors`) with the scales folded in."""
    h, i = spec.hidden_size, spec.intermediate_size
    if name == "input_layernorm":
        return w / s.qkv
    if name == "post_attention_layernorm":
        return w / s.gate_up
    if name == "qkv_proj":
        w = w * s.qkv
        w[h + spec.kv_dim:] /= v_row_scale(spec, s.o)[:, None]
        return w
    if name == "gate_up_proj":
        w = w * s.gate_up
        w[i:] /= s.down[:, None]
        return w
    return w * (s.o if name == "o_proj" else s.down)


# ----------------------------------------------------------------------------- per-layer search


@dataclass
class AwqLayer:
    """Everything AWQ decided for one layer: the scales and, per linear, each block's clip and refit."""

    scales: LayerScales
    blocks: dict[str, BlockChoice]  # linear name -> per-block clip and refit


def search_layer_scales(spec: ModelSpec, w: tp.LayerWeights, stats: dict[str, LinearStats], x: torch.Tensor, rope: tp.Rotary,
                        block: int, settings: AwqSettings) -> LayerScales:
    """Each linear's best input scale, searched on the original (unscaled) weights as AutoAWQ does.

    qkv_proj and gate_up_proj are judged by what the layer does with their outputs next (attention;
    the gated product), o_proj and down_proj by their own outputs, which the residual adds as they are.
    """
    grid = settings.grid

    def search(name: str, weight: torch.Tensor, tie=lambda s: s) -> torch.Tensor:
        st = stats[name]
        return search_scale(weight, tie(st.x_mean), st.x_sample(), block, grid, tie)

    return LayerScales(
        qkv=search_qkv_scale(spec, w, stats["qkv_proj"].x_mean, x, rope, block, settings),
        o=search("o_proj", w.o_proj, lambda s: tie_heads(spec, s)),
        gate_up=search_gate_up_scale(spec, w, stats["gate_up_proj"], block, grid),
        down=search("down_proj", w.down_proj),
    )


def qkv_rows(spec: ModelSpec, kv_heads: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """qkv_proj's rows for some KV heads: their query heads' q rows, their k rows, their v rows; and the three sizes."""
    hd, group = spec.head_dim, spec.num_heads // spec.num_kv_heads
    q = (kv_heads[:, None] * group * hd + torch.arange(group * hd)).reshape(-1)
    k = (spec.hidden_size + kv_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    return torch.cat([q, k, k + spec.kv_dim]), [len(q), len(k), len(k)]


# (q, k, v of some KV heads [batch, seq, ...], those KV heads) -> their attention output [batch, seq, ...]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def search_qkv_scale(spec: ModelSpec, w: tp.LayerWeights, x_mean: torch.Tensor, x: torch.Tensor, rope: tp.Rotary,
                     block: int, settings: AwqSettings) -> torch.Tensor:
    """qkv_proj's input scale, judged by the attention output (before o_proj) of a few KV heads
    (`search_attention_scale`) on the RMS-normed layer inputs.

    Why: what an error in q or k costs depends on the keys or queries it meets inside the softmax,
    not on its own size, and v errors are averaged over positions; the plain linear error weighs
    every qkv row alike (AutoAWQ also searches qkv on the attention output). Tiny test model,
    block 128, with the gated product below: held-out KL 0.60x/0.63x -> 0.59x/0.59x RTN's on the
    two calibration halves, perplexity to below RTN's on both.
    """
    h = tp.rms_norm(x[search_sequences(x, settings)], w.input_layernorm, spec.rms_norm_eps)
    return search_attention_scale(spec, w.qkv_proj, None, h, x_mean, block, settings,
                                  lambda q, k, v, kv_heads: tp.attend(spec, q, k, v, rope))


def search_sequences(x: torch.Tensor, settings: AwqSettings) -> torch.Tensor:
    """The whole sequences of x [batch, seq, ...] (evenly spaced) that hold about `search_tokens` tokens."""
    return evenly_spaced(x.shape[0], -(-settings.search_tokens // x.shape[1]), x.device)


def search_attention_scale(spec: ModelSpec, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, x_mean: torch.Tensor,
                           block: int, settings: AwqSettings, attend: Attend) -> torch.Tensor:
    """qkv_proj's (weight [qkv_dim, hidden], bias or None) input scale with the least error in the attention
    output of about `search_rows` output channels (whole KV heads, evenly spaced, with their query heads),
    on the sequences h [n, seq, hidden] (qkv_proj's inputs). x_mean: mean |input| over all calibration tokens.
    Cost like the linear search (`search_scale`): `search_rows` rows on about `search_tokens` tokens."""
    group = spec.num_heads // spec.num_kv_heads
    n_kv = min(spec.num_kv_heads, max(1, round(settings.grid.search_rows / (group * spec.head_dim))))
    kv_heads = evenly_spaced(spec.num_kv_heads, n_kv)
    rows, sizes = qkv_rows(spec, kv_heads)
    rows = rows.to(h.device)
    b = None if bias is None else bias[rows]

    def attention_output(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = inp @ w.T
        return attend(*(y if b is None else y + b).split(sizes, -1), kv_heads)

    candidates = scale_candidates(x_mean, normalized_weight_mean(weight, block), settings.grid.scale_points, lambda s: s)
    return best_scale(weight[rows], h, candidates, block, attention_output)


Gated = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate half, up half of gate_up_proj's output) -> down_proj's input


def search_gate_up_scale(spec: ModelSpec, w: tp.LayerWeights, stats: LinearStats, block: int, grid: SearchGrid) -> torch.Tensor:
    """gate_up_proj's input scale, judged by the gated product silu(gate) * up (`search_gated_scale`).

    Why: gate and up errors reach the residual only through silu(gate) * up and down_proj; a gate
    error matters where up is large and silu is steep, and channels that down_proj reads weakly
    matter less. The weight is the diagonal of down_proj's Gram, so the error approximates the
    MLP output's. The plain linear error weighs the 2 * intermediate rows alike.
    """
    return search_gated_scale(w.gate_up_proj, None, w.down_proj, stats, block, grid, lambda gate, up: F.silu(gate) * up)


def search_gated_scale(gate_up: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, stats: LinearStats, block: int,
                       grid: SearchGrid, gated: Gated) -> torch.Tensor:
    """A fused gate/up linear's (weight [2 * intermediate, hidden] = [gate rows | up rows], bias or None) input
    scale with the least error in gated(gate, up), each channel j weighted by ||down[:, j]||, on `search_rows`
    channels (evenly spaced; each a gate row and its up row)."""
    i = gate_up.shape[0] // 2
    ch = evenly_spaced(i, grid.search_rows, gate_up.device)
    rows = torch.cat([ch, ch + i])
    down_norm = down[:, ch].norm(dim=0)
    b = None if bias is None else bias[rows]

    def gated_output(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = inp @ w.T
        return gated(*(y if b is None else y + b).chunk(2, -1)) * down_norm

    candidates = scale_candidates(stats.x_mean, normalized_weight_mean(gate_up, block), grid.scale_points, lambda s: s)
    return best_scale(gate_up[rows], stats.x_sample(), candidates, block, gated_output)


def _input_scale(s: LayerScales, name: str) -> torch.Tensor:
    return {"qkv_proj": s.qkv, "o_proj": s.o, "gate_up_proj": s.gate_up, "down_proj": s.down}[name]


def scaled_gram(stats: LinearStats, s: torch.Tensor, block: int) -> torch.Tensor:
    """Block Gram matrices of the scaled input x / s (what the folded weight sees)."""
    inv = pad_k(1.0 / s, block).view(-1, block)  # padded channels: zero Gram rows either way
    return stats.gram * inv[:, :, None] * inv[:, None, :]


def search_layer_blocks(spec: ModelSpec, w: tp.LayerWeights, stats: dict[str, LinearStats], s: LayerScales, block: int, grid: SearchGrid) -> dict[str, BlockChoice]:
    """Per-block clip and refit for the folded weights (row scales of the next linear included)."""
    return {name: choose_blocks(fold(spec, name, getattr(w, name), s), stats[name], _input_scale(s, name), block, grid)
            for name in tp.LINEARS}


def choose_blocks(folded: torch.Tensor, stats: LinearStats, s: torch.Tensor, block: int, grid: SearchGrid) -> BlockChoice:
    """Per-block clip + refit (and GPTQ's codes) for a folded weight [N, K] whose input, as `stats` saw it
    before folding, the fold divides by s [K]; on the CPU."""
    choice = search_blocks(folded, scaled_gram(stats, s, block), block, grid)
    if grid.gptq:
        inv = 1.0 / s
        gram = stats.full_gram * inv[:, None] * inv[None, :]
        choice = BlockChoice(choice.clip, choice.alpha, gptq_codes(folded, gram, choice, block, grid))
    return BlockChoice(choice.clip.cpu(), choice.alpha.cpu(), None if choice.codes is None else choice.codes.cpu())


def calibrate_layer(spec: ModelSpec, ckpt: SafetensorsCheckpoint, layer: int, x: torch.Tensor, rope: tp.Rotary,
                    block: int, settings: AwqSettings) -> tuple[AwqLayer, torch.Tensor]:
    """Search one layer; return its decisions and its unquantized outputs (the next layer's inputs)."""
    w = tp.load_layer(ckpt, layer, x.device)
    out, stats = run_layer(spec, w, x, rope, block, settings)
    scales = search_layer_scales(spec, w, stats, x, rope, block, settings)
    blocks = search_layer_blocks(spec, w, stats, scales, block, settings.grid)
    cpu = LayerScales(*(t.cpu() for t in (scales.qkv, scales.o, scales.gate_up, scales.down)))
    return AwqLayer(cpu, blocks), out


def calibrate_head(spec: ModelSpec, ckpt: SafetensorsCheckpoint, x: torch.Tensor, block: int, settings: AwqSettings) -> BlockChoice:
    """The int4 lm_head gets the per-block clip + refit search on the final normed states.

    No input scale: on the tiny test model it bought no KL and cost perplexity (measured), so
    model.norm stays as it is.
    """
    gamma = torch.from_numpy(ckpt.read(tensor_name("norm"))).to(x.device)
    w = torch.from_numpy(ckpt.read(tensor_name("lm_head"))).to(x.device)
    h = x.shape[-1]
    gram = x.new_zeros(-(-h // block), block, block)
    full = x.new_zeros(h, h) if settings.grid.gptq else None
    for i in range(0, x.shape[0], settings.batch):
        normed = tp.rms_norm(x[i:i + settings.batch], gamma, spec.rms_norm_eps).reshape(-1, h)
        gram += block_gram(normed, block)
        if full is not None:
            full += normed.T @ normed
    choice = search_blocks(w, gram, block, settings.grid)
    codes = gptq_codes(w, full, choice, block, settings.grid).cpu() if full is not None else None
    return BlockChoice(choice.clip.cpu(), choice.alpha.cpu(), codes)


@dataclass
class AwqResult:
    """Everything AWQ decided: per layer, and for lm_head when it is quantized and not tied."""

    layers: list[AwqLayer]
    head: BlockChoice | None


# ----------------------------------------------------------------------------- the weight source


class AwqWeights:
    """A `WeightSource`: the checkpoint's tensors with AWQ's scales folded in and its block choices applied."""

    def __init__(self, ckpt: SafetensorsCheckpoint, spec: ModelSpec, result: AwqResult, block: int, grid: SearchGrid, clip: bool = True):
        self.ckpt, self.spec, self.result, self.block, self.grid, self.clip = ckpt, spec, result, block, grid, clip

    @property
    def layers(self) -> list[AwqLayer]:
        return self.result.layers

    def read(self, name: str) -> np.ndarray:
        w = torch.from_numpy(self.ckpt.read(name))
        key = parse_name(name)
        if key.layer is not None:
            w = self._layer_tensor(self.layers[key.layer], key.role, w)
        elif self.result.head is not None and self.clip and key.role == "lm_head":
            w = apply_blocks(w, self.result.head, self.block, self.grid)
        return w.numpy().astype(np.float32, copy=False)

    def _layer_tensor(self, layer: AwqLayer, inner: str, w: torch.Tensor) -> torch.Tensor:
        w = fold(self.spec, inner, w, layer.scales)
        return apply_blocks(w, layer.blocks[inner], self.block, self.grid) if self.clip and inner in layer.blocks else w

    def without_clipping(self) -> AwqWeights:
        """The scaled weights only: the float model is exactly the original one (tests check this)."""
        return type(self)(self.ckpt, self.spec, self.result, self.block, self.grid, clip=False)


# ----------------------------------------------------------------------------- entry point


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _cpu_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream_layers(spec: ModelSpec, ckpt: Any, x: torch.Tensor, rope: tp.Rotary, recipe: QuantRecipe, settings: AwqSettings,
                  title: str, layer_fn: Callable, head_fn: Callable, progress: bool = False) -> tuple[list, BlockChoice | None]:
    """Step 1 for every architecture: each layer searched (`layer_fn`) on the previous layer's unquantized
    outputs, then an untied quantized lm_head (`head_fn`) on the last layer's."""
    block, layers, head = recipe.block_size, [], None
    with torch.inference_mode(), _cpu_threads(settings.cpu_threads), task(title, spec.num_layers + 1, progress) as advance:
        for i in range(spec.num_layers):
            layer, x = layer_fn(spec, ckpt, i, x, rope, block, settings)
            layers.append(layer)
            advance(1)
        if recipe.quantize_lm_head and not spec.tie_word_embeddings:  # tied: clipping would change the embedding
            head = head_fn(spec, ckpt, x, block, settings)
        advance(1)
    return layers, head


def calibrate(folder: Path, spec: ModelSpec, recipe: QuantRecipe, text: str, settings: AwqSettings, progress: bool = False) -> AwqResult:
    """Step 1: stream the layers, searching each one on the previous layer's unquantized outputs."""
    ckpt = SafetensorsCheckpoint(folder)
    ids = calibration_ids(folder, text, settings)
    device = _device()
    x = torch.from_numpy(ckpt.read(tensor_name("embed_tokens")))[ids].to(device)
    rope = tp.rotary_for(spec, ids.shape[1], device)
    title = f"AWQ calibration ({ids.shape[0]} x {ids.shape[1]} tokens)"
    return AwqResult(*stream_layers(spec, ckpt, x, rope, recipe, settings, title, calibrate_layer, calibrate_head, progress))


def awq_weights(checkpoint_folder: str | Path, spec: ModelSpec, recipe: QuantRecipe, calibration: str | None = None,
                samples: int = DEFAULT_SAMPLES, *, settings: AwqSettings | None = None, progress: bool = False):
    """Calibrate Phi-3's dense layers on `calibration` (a text file; None: the built-in one) and return AWQ's
    weight source (Phi-3.5-MoE: awq_moe.awq_moe_weights)."""
    folder, settings = Path(checkpoint_folder), run_settings(recipe, settings, samples)
    result = calibrate(folder, spec, recipe, calibration_text(calibration), settings, progress)
    return AwqWeights(SafetensorsCheckpoint(folder), spec, result, recipe.block_size, settings.grid)


def run_settings(recipe: QuantRecipe, settings: AwqSettings | None, samples: int) -> AwqSettings:
    """The settings one AWQ run uses (`samples` calibration windows); refuses what AWQ cannot emulate."""
    if not recipe.symmetric:
        raise Phi3OnnxError("AWQ supports symmetric int4 only (its search emulates ORT's symmetric packer)")
    return replace(settings or AwqSettings(), samples=samples)


__all__ = ["AwqLayer", "AwqResult", "AwqSettings", "AwqWeights", "DEFAULT_SAMPLES", "awq_weights", "calibrate", "run_settings"]
