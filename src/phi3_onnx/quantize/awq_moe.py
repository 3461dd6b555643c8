"""AWQ for Phi-3.5-MoE (PhimoeForCausalLM): the same searches as awq.py on a Phimoe layer (PyTorch, float32).

A Phimoe layer: LayerNorm (weight + bias) -> q/k/v with biases -> attention -> o_proj (+ bias) ->
residual -> LayerNorm -> router (float32, sparsemixer top-2) -> experts w1 (gate), w3 (up), w2 (down).

Where each scale is folded (the preceding op absorbs 1/s, so the float model is unchanged):

    input_layernorm γ / s_qkv, β / s_qkv             ──▶ q/k/v_proj W · diag(s_qkv)
    v_proj rows and v bias / s_o                     ──▶ o_proj W · diag(s_o)
    post_attention_layernorm γ / s_moe, β / s_moe    ──▶ router W · diag(s_moe) (float: logits unchanged)
                                                         and every expert's w1, w3 W · diag(s_moe)
    w3 rows of expert e / s_down[e]                  ──▶ w2 of expert e W · diag(s_down[e])   (silu(w1 x) * (w3 x) is linear in w3 x)

LayerNorm's output is γ ⊙ n + β, so dividing it by s divides both γ and β. One s_moe for the router and
every expert (the MoE input is shared): it is searched on the sum over experts of each expert's gated-product
error (awq.search_gate_up_scale's objective) on the calibration tokens the exact sparsemixer routes to it.
s_down is per expert, searched on that expert's routed tokens. Per-block clip + refit and GPTQ rounding
run per weight: q/k/v (fused, rows split back), o_proj, each expert's w1, w3, w2 (their Grams from the
tokens routed to the expert), and lm_head (after the final LayerNorm). An expert no calibration token
reaches keeps s_down = 1 and plain round-to-nearest blocks (of its s_moe-folded w1/w3).

Experts are read one at a time, so the layer's experts are never all in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from phi3_onnx.checkpoint.phimoe_tensors import parse_phimoe_name, phimoe_name
from phi3_onnx.checkpoint.reader import SafetensorsCheckpoint
from phi3_onnx.quantize import torch_phi3 as tp
from phi3_onnx.quantize.awq import (DEFAULT_SAMPLES, AwqSettings, _device, calibration_ids, stream_layers,
                                    calibration_text, run_settings, search_attention_scale, search_sequences, tie_heads,
                                    v_row_scale)
from phi3_onnx.quantize.awq_search import (BlockChoice, SearchGrid, apply_blocks, block_gram, evenly_spaced,
                                           fake_int4, gptq_codes, normalized_weight_mean, scale_candidates,
                                           search_blocks, search_scale)
from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import QuantRecipe


# ----------------------------------------------------------------------------- the layer


@dataclass
class AttentionWeights:
    """A Phimoe layer's attention half, its MoE LayerNorm and router (float32; biases zero where absent)."""

    ln1: torch.Tensor
    ln1_b: torch.Tensor
    qkv: torch.Tensor  # [q; k; v] rows
    qkv_b: torch.Tensor
    o: torch.Tensor
    o_b: torch.Tensor
    ln2: torch.Tensor
    ln2_b: torch.Tensor
    router: torch.Tensor  # [experts, hidden]


def _read(ckpt, role: str, layer: int | None = None, expert: int | None = None, device=None) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ckpt.read(phimoe_name(role, layer, expert)), dtype=np.float32)).to(device)


def load_attention(ckpt, spec: ModelSpec, layer: int, device: torch.device) -> AttentionWeights:
    r = lambda role: _read(ckpt, role, layer, device=device)  # noqa: E731
    qkv = torch.cat([r(f"{p}_proj") for p in "qkv"])
    if spec.attention_bias:
        qkv_b, o_b = torch.cat([r(f"{p}_proj_bias") for p in "qkv"]), r("o_proj_bias")
    else:
        qkv_b, o_b = qkv.new_zeros(qkv.shape[0]), qkv.new_zeros(spec.hidden_size)
    return AttentionWeights(r("input_layernorm"), r("input_layernorm_bias"), qkv, qkv_b, r("o_proj"), o_b,
                            r("post_attention_layernorm"), r("post_attention_layernorm_bias"), r("router"))


def load_expert(ckpt, layer: int, expert: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3, w2) of one expert."""
    return tuple(_read(ckpt, role, layer, expert, device) for role in ("w1", "w3", "w2"))


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' sparsemixer at inference: (experts [T, 2] long, weights [T, 2]) of logits [T, E]."""
    def choose(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = scores.max(-1, keepdim=True)
        factor = logits.abs().clamp(min=top)
        far = ((top - logits) / factor) > 2 * eps
        gates = torch.softmax(scores.masked_fill(far, float("-inf")), -1)
        return idx, gates.gather(-1, idx)

    e1, m1 = choose(logits)
    e2, m2 = choose(logits.scatter(-1, e1, float("-inf")))
    return torch.cat([e1, e2], -1), torch.cat([m1, m2], -1)


def attention_half(spec: ModelSpec, w: AttentionWeights, x: torch.Tensor, rope: tp.Rotary):
    """(qkv input h, o_proj input, residual after attention) for hidden states [batch, seq, hidden]."""
    h = layer_norm(x, w.ln1, w.ln1_b, spec.rms_norm_eps)
    attn = tp.attention(spec, h @ w.qkv.T + w.qkv_b, rope)
    return h, attn, x + attn @ w.o.T + w.o_b


def expert_forward(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w2's input silu(x w1^T) * (x w3^T), the expert's output)."""
    mid = F.silu(x @ w1.T) * (x @ w3.T)
    return mid, mid @ w2.T


def route(spec: ModelSpec, w: AttentionWeights, moe_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsemixer's choices for MoE inputs [T, hidden]: (experts [T, 2], weights [T, 2])."""
    return sparsemixer(moe_in @ w.router.T, spec.moe.router_jitter_eps)


# ----------------------------------------------------------------------------- decisions


@dataclass
class MoeLayerScales:
    qkv: torch.Tensor  # [hidden]
    o: torch.Tensor  # [hidden]
    moe: torch.Tensor  # [hidden]: router and every expert's w1 / w3
    down: list[torch.Tensor]  # per expert [intermediate]


@dataclass
class MoeAwqLayer:
    scales: MoeLayerScales
    blocks: dict[str, BlockChoice]  # "qkv", "o_proj", "w1.{e}", "w3.{e}", "w2.{e}"
    tokens_per_expert: list[int]


@dataclass
class MoeAwqResult:
    layers: list[MoeAwqLayer]
    head: BlockChoice | None


def fold(spec: ModelSpec, role: str, expert: int | None, w: torch.Tensor, s: MoeLayerScales) -> torch.Tensor:
    """One Phimoe layer tensor (its role in phimoe_tensors) with the scales folded in."""
    if role in ("input_layernorm", "input_layernorm_bias"):
        return w / s.qkv
    if role in ("post_attention_layernorm", "post_attention_layernorm_bias"):
        return w / s.moe
    if role in ("q_proj", "k_proj"):
        return w * s.qkv
    if role == "v_proj":
        return w * s.qkv / v_row_scale(spec, s.o)[:, None]
    if role == "v_proj_bias":
        return w / v_row_scale(spec, s.o)
    if role == "o_proj":
        return w * s.o
    if role in ("router", "w1"):
        return w * s.moe
    if role == "w3":
        return w * s.moe / s.down[expert][:, None]
    if role == "w2":
        return w * s.down[expert]
    return w  # q/k/o biases


def _choose_blocks(w: torch.Tensor, x: torch.Tensor, block: int, grid: SearchGrid) -> BlockChoice:
    """Per-block clip + refit (and GPTQ's codes) for the folded weight w [N, K] seeing inputs x [T, K]."""
    choice = search_blocks(w, block_gram(x, block), block, grid)
    if grid.gptq:
        choice = BlockChoice(choice.clip, choice.alpha, gptq_codes(w, x.T @ x, choice, block, grid))
    return BlockChoice(choice.clip.cpu(), choice.alpha.cpu(), None if choice.codes is None else choice.codes.cpu())


def _sample(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[0] <= n else x[evenly_spaced(x.shape[0], n, x.device)]


def search_qkv_scale(spec: ModelSpec, w: AttentionWeights, h: torch.Tensor, rope: tp.Rotary, block: int,
                     settings: AwqSettings) -> torch.Tensor:
    """awq.search_qkv_scale with the q/k/v biases: judged by the attention output of a few KV heads."""
    x_mean = h.reshape(-1, h.shape[-1]).abs().mean(0)
    return search_attention_scale(spec, w.qkv, w.qkv_b, h[search_sequences(h, settings)], x_mean, block, settings,
                                  lambda q, k, v, kv_heads: tp.attend(spec, q, k, v, rope))


def search_moe_scale(moe_in: torch.Tensor, routed: list[torch.Tensor], experts: list[tuple[torch.Tensor, ...]],
                     block: int, settings: AwqSettings) -> torch.Tensor:
    """The shared MoE input scale: the candidate with the least sum over experts of the gated-product error
    (each channel weighted by ||w2[:, j]||) on `search_rows` channels and the tokens routed to the expert.

    `experts`: per expert (w1 rows, w3 rows, w2 column norms) of the searched channels."""
    grid = settings.grid
    w_mean = normalized_weight_mean(torch.cat([torch.cat([g, u]) for g, u, _ in experts]), block)
    candidates = scale_candidates(moe_in.abs().mean(0), w_mean, grid.scale_points, lambda s: s)
    xs = [_sample(moe_in[t], settings.search_tokens) for t in routed]
    refs = [F.silu(x @ g.T) * (x @ u.T) * n for x, (g, u, n) in zip(xs, experts)]

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for x, (g, u, n), ref in zip(xs, experts, refs):
            if x.shape[0]:
                xi = x / s
                total += float((F.silu(xi @ fake_int4(g * s, block).T) * (xi @ fake_int4(u * s, block).T) * n - ref).pow(2).sum())
        return total

    errors = [error(s) for s in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]


def calibrate_layer(spec: ModelSpec, ckpt, layer: int, x: torch.Tensor, rope: tp.Rotary, block: int,
                    settings: AwqSettings) -> tuple[MoeAwqLayer, torch.Tensor]:
    """Search one Phimoe layer on its inputs x [batch, seq, hidden]; return its decisions and its float outputs."""
    device, grid, hidden = x.device, settings.grid, spec.hidden_size
    w = load_attention(ckpt, spec, layer, device)
    parts = [attention_half(spec, w, x[i:i + settings.batch], rope) for i in range(0, x.shape[0], settings.batch)]
    h, attn, mid = (torch.cat([p[j] for p in parts]) for j in range(3))
    del parts
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    stride = max(1, flat(h).shape[0] // settings.search_tokens)

    s_qkv = search_qkv_scale(spec, w, h, rope, block, settings)
    attn_f = flat(attn)
    s_o = search_scale(w.o, tie_heads(spec, attn_f.abs().mean(0)), attn_f[::stride], block, grid, lambda s: tie_heads(spec, s))
    moe_in = layer_norm(flat(mid), w.ln2, w.ln2_b, spec.rms_norm_eps)
    chosen, weights = route(spec, w, moe_in)
    n_exp = spec.moe.num_experts
    routed = [torch.nonzero((chosen == e).any(-1)).flatten() for e in range(n_exp)]

    ch = evenly_spaced(spec.intermediate_size, grid.search_rows, device)
    subset = []
    for e in range(n_exp):
        w1, w3, w2 = load_expert(ckpt, layer, e, device)
        subset.append((w1[ch].clone(), w3[ch].clone(), w2[:, ch].norm(dim=0)))
    s_moe = search_moe_scale(moe_in, routed, subset, block, settings)
    del subset

    blocks: dict[str, BlockChoice] = {}
    qkv_folded = torch.cat([w.qkv[:hidden + spec.kv_dim] * s_qkv,
                            w.qkv[hidden + spec.kv_dim:] * s_qkv / v_row_scale(spec, s_o)[:, None]])
    blocks["qkv"] = _choose_blocks(qkv_folded, flat(h) / s_qkv, block, grid)
    blocks["o_proj"] = _choose_blocks(w.o * s_o, attn_f / s_o, block, grid)
    del h, attn, attn_f, qkv_folded

    out = torch.zeros_like(moe_in)
    downs, counts = [], []
    for e in range(n_exp):
        w1, w3, w2 = load_expert(ckpt, layer, e, device)
        tokens = routed[e]
        counts.append(int(tokens.numel()))
        s_down = torch.ones(spec.intermediate_size, device=device)
        if tokens.numel():
            xe = moe_in[tokens]
            act, y = expert_forward(xe, w1, w3, w2)
            gate = (weights * (chosen == e)).sum(-1)[tokens]
            out.index_add_(0, tokens, y * gate[:, None])
            s_down = search_scale(w2, act.abs().mean(0), _sample(act, settings.search_tokens), block, grid)
            xs = xe / s_moe
            blocks[f"w1.{e}"] = _choose_blocks(w1 * s_moe, xs, block, grid)
            blocks[f"w3.{e}"] = _choose_blocks(w3 * s_moe / s_down[:, None], xs, block, grid)
            blocks[f"w2.{e}"] = _choose_blocks(w2 * s_down, act / s_down, block, grid)
        downs.append(s_down.cpu())
        del w1, w3, w2
    y = mid + out.view_as(mid)
    scales = MoeLayerScales(s_qkv.cpu(), s_o.cpu(), s_moe.cpu(), downs)
    return MoeAwqLayer(scales, blocks, counts), y


def calibrate_head(spec: ModelSpec, ckpt, x: torch.Tensor, block: int, settings: AwqSettings) -> BlockChoice:
    """lm_head's per-block clip + refit (+ GPTQ) on the final LayerNorm's outputs (no input scale, as awq.py)."""
    gamma, beta = _read(ckpt, "norm", device=x.device), _read(ckpt, "norm_bias", device=x.device)
    normed = layer_norm(x, gamma, beta, spec.rms_norm_eps).reshape(-1, x.shape[-1])
    return _choose_blocks(_read(ckpt, "lm_head", device=x.device), normed, block, settings.grid)


def calibrate(folder, spec: ModelSpec, recipe: QuantRecipe, text: str, settings: AwqSettings,
              progress: bool = False) -> MoeAwqResult:
    ckpt = SafetensorsCheckpoint(folder)
    ids = calibration_ids(folder, text, settings)
    device = _device()
    x = _read(ckpt, "embed_tokens", device="cpu")[ids].to(device)
    rope = tp.rotary_for(spec, ids.shape[1], device)
    title = f"AWQ calibration, mixture of experts ({ids.shape[0]} x {ids.shape[1]} tokens)"
    return MoeAwqResult(*stream_layers(spec, ckpt, x, rope, recipe, settings, title, calibrate_layer, calibrate_head, progress))


def awq_moe_weights(checkpoint_folder, spec: ModelSpec, recipe: QuantRecipe, calibration: str | None = None,
                    samples: int = DEFAULT_SAMPLES, *, settings: AwqSettings | None = None, progress: bool = False):
    """awq.awq_weights for Phi-3.5-MoE: calibrate its layers, router and experts; return the weight source."""
    folder, settings = Path(checkpoint_folder), run_settings(recipe, settings, samples)
    result = calibrate(folder, spec, recipe, calibration_text(calibration), settings, progress)
    return MoeAwqWeights(SafetensorsCheckpoint(folder), spec, result, recipe.block_size, settings.grid)


# ----------------------------------------------------------------------------- the weight source


class MoeAwqWeights:
    """A `WeightSource` over Phimoe's hub names: the checkpoint with AWQ's scales folded in and its blocks applied.

    (The graph wraps it in PhimoeWeights, which serves the fused qkv_proj from q/k/v_proj.)"""

    def __init__(self, ckpt, spec: ModelSpec, result: MoeAwqResult, block: int, grid: SearchGrid, clip: bool = True):
        self.ckpt, self.spec, self.result, self.block, self.grid, self.clip = ckpt, spec, result, block, grid, clip

    @property
    def layers(self) -> list[MoeAwqLayer]:
        return self.result.layers

    def _qkv_block(self, layer: MoeAwqLayer, role: str) -> BlockChoice | None:
        choice = layer.blocks.get("qkv")
        if choice is None:
            return None
        h, kv = self.spec.hidden_size, self.spec.kv_dim
        lo, hi = {"q_proj": (0, h), "k_proj": (h, h + kv), "v_proj": (h + kv, h + 2 * kv)}[role]
        return BlockChoice(choice.clip[lo:hi], choice.alpha[lo:hi], None if choice.codes is None else choice.codes[lo:hi])

    def read(self, name: str) -> np.ndarray:
        w = torch.from_numpy(np.asarray(self.ckpt.read(name), dtype=np.float32))
        role, layer, expert = parse_phimoe_name(name)
        choice = None
        if layer is not None:
            lay = self.layers[layer]
            w = fold(self.spec, role, expert, w, lay.scales)
            if role in ("q_proj", "k_proj", "v_proj"):
                choice = self._qkv_block(lay, role)
            elif role == "o_proj":
                choice = lay.blocks.get("o_proj")
            elif role in ("w1", "w2", "w3"):
                choice = lay.blocks.get(f"{role}.{expert}")
        elif role == "lm_head":
            choice = self.result.head
        if self.clip and choice is not None:
            w = apply_blocks(w, choice, self.block, self.grid)
        return w.numpy().astype(np.float32, copy=False)

    def without_clipping(self) -> MoeAwqWeights:
        """The scaled weights only: the float model is exactly the original one (tests check this)."""
        return MoeAwqWeights(self.ckpt, self.spec, self.result, self.block, self.grid, clip=False)


__all__ = ["MoeAwqLayer", "MoeAwqResult", "MoeAwqWeights", "MoeLayerScales", "awq_moe_weights", "calibrate", "fold", "sparsemixer"]
