"""AWQ for Phi-3-small (Phi3SmallForCausalLM): awq.py's searches on its layer (PyTorch, float32).

The checkpoint is read as the exporter reads it (`checkpoint.phi3_small`): Phi-3's tensor names, q/k/v rows
[q | k | v] and up_proj's rows [gelu half | linear half], each linear's and LayerNorm's bias at `bias_name`.
A layer: LayerNorm (γ, β) -> qkv_proj (+ bias) -> attention (softmax scale `small.attention_scale`; block-sparse
on the layers that are not dense, `visible_keys`) -> o_proj (+ bias) -> residual -> LayerNorm ->
gate_up_proj (+ bias) -> gegelu: quick_gelu(min(gelu, limit)) * (clip(linear, ±limit) + 1) -> down_proj (+ bias).

Where each scale is folded (the preceding op absorbs 1/s, so the float model is unchanged):

    input_layernorm γ / s_qkv, β / s_qkv                 ──▶ qkv_proj W · diag(s_qkv)
    v rows of qkv_proj and the v bias / s_o              ──▶ o_proj W · diag(s_o)       (tied across the query
                                                              heads of a KV head: awq.tie_heads / v_row_scale)
    post_attention_layernorm γ / s_up, β / s_up          ──▶ gate_up_proj W · diag(s_up)  (both halves)
    down_proj: no scale (s_down = 1)
    lm_head: the embedding table (tied): no scale, no clip; the packer rounds the shared table (awq.py's tied path)

LayerNorm's output is γ ⊙ n + β, so dividing it by s divides both γ and β. Why down_proj gets no scale: its
input is quick_gelu(min(g, L)) * (clip(l, ±L) + 1), and an exact fold would need the producer of each input
channel to divide it by s. quick_gelu is not homogeneous, so the gelu half cannot; the linear half's "+ 1" could
go into its bias (l' = (l + 1) / s - 1), but the clamp then clips l at s (±L + 1) - 1 instead of ±L, which
changes the model wherever activations reach the limit (the published configs set gegelu_limit 20; the test
checkpoint reaches it). So down_proj gets per-block clip + refit and GPTQ rounding only, as every linear does.
The tied lm_head: an input scale would have to divide the final LayerNorm and multiply the table, which the
embedding Gather reads too; clipping the table would change the embedding. An untied lm_head (a config with
tie_word_embeddings false) gets clip + refit + GPTQ on the final LayerNorm's outputs, as in awq.py.

Calibration attends like the graph: GQA over rotary q/k (LongRoPE's long factors past the original context),
the muP embedding multiplier on the embedding rows, Phi-3-small's block-sparse rule with causal masking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from phi3_onnx.checkpoint import tiktoken as tk
from phi3_onnx.checkpoint.phi3_small import Phi3SmallCheckpoint, bias_name, open_small
from phi3_onnx.checkpoint.tensors import LAYER_ROLES, parse_name, tensor_name
from phi3_onnx.quantize import torch_phi3 as tp
from phi3_onnx.quantize.awq import (DEFAULT_SAMPLES, AwqLayer, AwqResult, AwqSettings, AwqWeights, LayerScales, LinearStats,
                                    _device, calibration_text, calibration_windows, choose_blocks, collect_stats,
                                    fold, run_settings, search_attention_scale, search_gated_scale, search_sequences,
                                    stream_layers, tie_heads, v_row_scale)
from phi3_onnx.quantize.awq_search import BlockChoice, search_scale
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import QuantRecipe

# ----------------------------------------------------------------------------- the layer


@dataclass
class SmallLayerWeights:
    """One Phi-3-small layer's float32 tensors under Phi-3's roles: the weights (LayerNorms' γ) and the biases (β)."""

    w: tp.LayerWeights
    b: tp.LayerWeights


def load_layer(ckpt: Phi3SmallCheckpoint, layer: int, device: torch.device) -> SmallLayerWeights:
    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(ckpt.read(name)).to(device)

    return SmallLayerWeights(tp.LayerWeights(**{role: read(tensor_name(role, layer)) for role in LAYER_ROLES}),
                             tp.LayerWeights(**{role: read(bias_name(role, layer)) for role in LAYER_ROLES}))


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def visible_keys(spec: ModelSpec, layer: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Which keys each query of a sequence sees in this layer, bool [heads or 1, seq, seq], causality included.

    Dense layers: causal. Block-sparse layers (graph/phi3_small.py `_sparse_rule`, tests/phi3_small_ref.py):
    query block qb sees key block kb when qb - kb < local_blocks or (kb + head * head_step + 1) % vert_stride == 0.
    """
    small = spec.small
    pos = torch.arange(seq_len, device=device)
    causal = pos[:, None] >= pos[None, :]
    if small.is_dense(layer):
        return causal[None]
    blocks = pos // small.block_size
    heads = 1 if small.homo_head_pattern else spec.num_heads
    offsets = torch.arange(heads, device=device) * small.head_step(spec.num_heads)
    local = (blocks[:, None] - blocks[None, :]) < small.local_blocks  # [seq, seq]
    vertical = (blocks[None, :] + offsets[:, None] + 1) % small.vert_stride == 0  # [heads, seq]
    return causal & (local[None] | vertical[:, None, :])


def heads_of(spec: ModelSpec, visible: torch.Tensor, kv_heads: torch.Tensor) -> torch.Tensor:
    """`visible` for the query heads of some KV heads (AWQ's qkv search attends over a subset of heads)."""
    if visible.shape[0] == 1:
        return visible
    group = spec.num_heads // spec.num_kv_heads
    return visible[(kv_heads[:, None] * group + torch.arange(group)).reshape(-1).to(visible.device)]


def gegelu(spec: ModelSpec, gelu: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """quick_gelu(gelu) * (linear + 1), finite values clamped as the reference does (gelu above, linear to ±limit)."""
    limit = spec.small.gegelu_limit
    if limit is not None:
        gelu = torch.where(torch.isinf(gelu), gelu, gelu.clamp(max=limit))
        linear = torch.where(torch.isinf(linear), linear, linear.clamp(-limit, limit))
    return gelu * torch.sigmoid(1.702 * gelu) * (linear + 1)


def layer_forward(spec: ModelSpec, lw: SmallLayerWeights, x: torch.Tensor, rope: tp.Rotary, visible: torch.Tensor,
                  observe: tp.Observer | None = None) -> torch.Tensor:
    """One Phi-3-small layer on hidden states [batch, seq, hidden]; `observe` sees each linear's input."""
    w, b, eps = lw.w, lw.b, spec.rms_norm_eps

    def linear(name: str, inp: torch.Tensor) -> torch.Tensor:
        if observe is not None:
            observe(name, inp.reshape(-1, inp.shape[-1]))
        return inp @ getattr(w, name).T + getattr(b, name)

    h = layer_norm(x, w.input_layernorm, b.input_layernorm, eps)
    q, k, v = linear("qkv_proj", h).split([spec.hidden_size, spec.kv_dim, spec.kv_dim], -1)
    x = x + linear("o_proj", tp.attend(spec, q, k, v, rope, spec.small.attention_scale, visible))
    h = layer_norm(x, w.post_attention_layernorm, b.post_attention_layernorm, eps)
    return x + linear("down_proj", gegelu(spec, *linear("gate_up_proj", h).chunk(2, -1)))


# ----------------------------------------------------------------------------- folding


def fold_bias(spec: ModelSpec, role: str, beta: torch.Tensor, s: LayerScales) -> torch.Tensor:
    """One layer bias (of the tensor with role `role`) with the scales folded in; awq.fold folds the weights."""
    if role == "input_layernorm":
        return beta / s.qkv
    if role == "post_attention_layernorm":
        return beta / s.gate_up
    if role == "qkv_proj":
        beta = beta.clone()
        beta[spec.hidden_size + spec.kv_dim:] /= v_row_scale(spec, s.o)
    return beta  # o_proj's, gate_up_proj's (s_down = 1) and down_proj's are unchanged


# ----------------------------------------------------------------------------- per-layer search


def search_layer_scales(spec: ModelSpec, lw: SmallLayerWeights, stats: dict[str, LinearStats], x: torch.Tensor,
                        rope: tp.Rotary, visible: torch.Tensor, block: int, settings: AwqSettings) -> LayerScales:
    """qkv_proj's scale judged by the (block-sparse) attention output, o_proj's by its own output (tied across
    query heads), gate_up_proj's by the gegelu product weighted by down_proj's column norms; down_proj: 1."""
    w, b, grid = lw.w, lw.b, settings.grid
    seqs = x[search_sequences(x, settings)]
    h = layer_norm(seqs, w.input_layernorm, b.input_layernorm, spec.rms_norm_eps)
    scale = spec.small.attention_scale
    qkv = search_attention_scale(spec, w.qkv_proj, b.qkv_proj, h, stats["qkv_proj"].x_mean, block, settings,
                                 lambda q, k, v, kv: tp.attend(spec, q, k, v, rope, scale, heads_of(spec, visible, kv)))
    st = stats["o_proj"]
    tie = lambda s: tie_heads(spec, s)  # noqa: E731
    o = search_scale(w.o_proj, tie(st.x_mean), st.x_sample(), block, grid, tie)
    up = search_gated_scale(w.gate_up_proj, b.gate_up_proj, w.down_proj, stats["gate_up_proj"], block, grid,
                            lambda g, lin: gegelu(spec, g, lin))
    return LayerScales(qkv=qkv, o=o, gate_up=up, down=torch.ones(spec.intermediate_size, device=x.device))


def calibrate_layer(spec: ModelSpec, ckpt: Phi3SmallCheckpoint, layer: int, x: torch.Tensor, rope: tp.Rotary, block: int,
                    settings: AwqSettings) -> tuple[AwqLayer, torch.Tensor]:
    """Search one layer; return its decisions and its unquantized outputs (the next layer's inputs)."""
    lw = load_layer(ckpt, layer, x.device)
    visible = visible_keys(spec, layer, x.shape[1], x.device)
    out, stats = collect_stats(lambda xb, observe: layer_forward(spec, lw, xb, rope, visible, observe), x, block, settings)
    s = search_layer_scales(spec, lw, stats, x, rope, visible, block, settings)
    inputs = {"qkv_proj": s.qkv, "o_proj": s.o, "gate_up_proj": s.gate_up, "down_proj": s.down}
    blocks = {name: choose_blocks(fold(spec, name, getattr(lw.w, name), s), stats[name], inputs[name], block, settings.grid)
              for name in tp.LINEARS}
    return AwqLayer(LayerScales(*(t.cpu() for t in (s.qkv, s.o, s.gate_up, s.down))), blocks), out


def calibrate_head(spec: ModelSpec, ckpt: Phi3SmallCheckpoint, x: torch.Tensor, block: int, settings: AwqSettings) -> BlockChoice:
    """An untied lm_head: per-block clip + refit (+ GPTQ) on the final LayerNorm's outputs, no input scale (as awq.py)."""
    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(ckpt.read(name)).to(x.device)

    gamma, beta = read(tensor_name("norm")), read(bias_name("norm"))
    normed = layer_norm(x, gamma, beta, spec.rms_norm_eps).reshape(-1, x.shape[-1])
    stats = LinearStats.empty(normed, block, settings.grid.gptq)
    stats.add(normed, block, max(1, normed.shape[0] // settings.search_tokens))
    return choose_blocks(read(tensor_name("lm_head")), stats, torch.ones_like(gamma), block, settings.grid)


# ----------------------------------------------------------------------------- calibration


def tokenizer(folder: Path, spec: ModelSpec, tiktoken_file: str | None = None):
    """The package's tokenizer (tokenizers.Tokenizer) converted from the checkpoint's .tiktoken ranks (`--tiktoken`)."""
    from tokenizers import Tokenizer

    ranks = tk.read_ranks(tk.find_ranks(folder, tiktoken_file))
    return Tokenizer.from_str(json.dumps(tk.tokenizer_json(ranks, spec.vocab_size)))


def calibration_ids(folder: Path, spec: ModelSpec, text: str, settings: AwqSettings, tiktoken_file: str | None = None) -> torch.Tensor:
    """awq.calibration_ids with Phi-3-small's tokenizer: [samples, seq_len]."""
    return calibration_windows(tokenizer(folder, spec, tiktoken_file).encode(text).ids, settings)


def embed(spec: ModelSpec, ckpt: Phi3SmallCheckpoint, ids: torch.Tensor) -> torch.Tensor:
    """The first layer's inputs: embedding rows times the muP multiplier (none when it is <= 0, as the graph)."""
    x = torch.from_numpy(ckpt.read(tensor_name("embed_tokens")))[ids]
    m = spec.small.embedding_multiplier
    return x * m if m > 0 else x


def calibrate(folder: Path, spec: ModelSpec, recipe: QuantRecipe, text: str, settings: AwqSettings,
              tiktoken_file: str | None = None, progress: bool = False) -> AwqResult:
    """Stream the layers, searching each one on the previous layer's unquantized outputs (awq.calibrate)."""
    ckpt = open_small(folder, spec)
    ids = calibration_ids(folder, spec, text, settings, tiktoken_file)
    device = _device()
    x = embed(spec, ckpt, ids).to(device)
    rope = tp.rotary_for(spec, ids.shape[1], device)
    title = f"AWQ calibration, Phi-3-small ({ids.shape[0]} x {ids.shape[1]} tokens)"
    return AwqResult(*stream_layers(spec, ckpt, x, rope, recipe, settings, title, calibrate_layer, calibrate_head, progress))


def awq_small_weights(checkpoint_folder: str | Path, spec: ModelSpec, recipe: QuantRecipe, calibration: str | None = None,
                      samples: int = DEFAULT_SAMPLES, *, settings: AwqSettings | None = None, tiktoken: str | None = None,
                      progress: bool = False) -> SmallAwqWeights:
    """awq.awq_weights for Phi-3-small: calibrate its layers on `calibration` (None: the built-in text), tokenized
    with the checkpoint's tiktoken ranks (`tiktoken`: the --tiktoken file); return the weight source."""
    folder, settings = Path(checkpoint_folder), run_settings(recipe, settings, samples)
    result = calibrate(folder, spec, recipe, calibration_text(calibration), settings, tiktoken, progress)
    return SmallAwqWeights(open_small(folder, spec), spec, result, recipe.block_size, settings.grid)


# ----------------------------------------------------------------------------- the weight source


class SmallAwqWeights(AwqWeights):
    """A `WeightSource` over the served (Phi-3) names: AwqWeights for the weights (awq.fold; s_down = 1 leaves
    gate_up_proj's linear rows as they are) and the biases with `fold_bias`."""

    def read(self, name: str) -> np.ndarray:
        if not name.endswith(".bias"):
            return super().read(name)
        key = parse_name(name.removesuffix("bias") + "weight")
        beta = torch.from_numpy(self.ckpt.read(name))
        if key.layer is not None:
            beta = fold_bias(self.spec, key.role, beta, self.layers[key.layer].scales)
        return beta.numpy().astype(np.float32, copy=False)


__all__ = ["SmallAwqWeights", "awq_small_weights", "calibrate", "fold_bias", "gegelu", "layer_forward", "load_layer",
           "visible_keys"]
