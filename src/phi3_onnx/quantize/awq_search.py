"""AWQ's two searches for one linear layer, in PyTorch: the input-channel scale, then per-block clipping.

Both minimise the layer's output error after int4 rounding, emulating ONNX Runtime's symmetric
block quantizer (`fake_int4`) so the search optimises what MatMulNBits will actually compute.

* scale: s = x_mean^r / w_mean^(1-r) over a grid of r (plus s = 1, so AWQ never loses to RTN on
  the objective); error ||f(X, W) - f(X/s, Q(W s))||^2 on a token and output-row subsample, where
  f is the linear itself (X W^T) or, where the caller knows better, what the layer does with the
  linear's output next (awq.py: attention for qkv_proj, the gated product for gate_up_proj).
* clip: per output row and block, the absmax shrink c = f * max|w| and a refit factor alpha for
  the dequantized block minimising the block's output error dw^T H_g dw, with H_g = X_g^T X_g
  the block's Gram matrix over every calibration token (alpha removes clipping's shrinkage).
  Coarse-to-fine: every `clip_stride`-th grid point, then the fine neighbours of each block's best few.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SearchGrid:
    """Grid sizes and the subsample that bounds the scale search's cost."""

    scale_points: int = 20
    # Clip grid: 40 steps of 1.25 % of max|w|, searched coarse-to-fine: every clip_stride-th point,
    # then the fine neighbours of each block's clip_seeds best coarse points (24 evaluations, not 40).
    # With the refit the error is jagged in the clip value, so one seed misses minima that two find.
    # Tiny model, block 128, held-out KL vs RTN's on the two calibration halves: 20-point grid
    # 0.577x/0.584x; 40 points coarse-to-fine, 1 seed 0.574x/0.567x, 2 seeds 0.571x/0.566x; all 40
    # points 0.558x/0.564x at twice the cost of the 20-point search (2 seeds: 1.2x).
    clip_points: int = 40
    clip_stride: int = 2
    clip_seeds: int = 2
    max_shrink: float = 0.5  # clip values go from max|w| down to (1 - max_shrink) * max|w|
    search_rows: int = 512  # output rows (evenly spaced) whose error the scale search measures
    # GPTQ-style rounding after the clip search: each block keeps its clip/refit scale, but its codes
    # are chosen column by column against the full input Gram, each column's rounding error pushed
    # onto the columns not yet rounded (Frantar et al. 2022, with the scales fixed and one code per
    # block pinned to -8 so ORT's absmax packer reproduces exactly these codes).
    gptq: bool = True
    gptq_damp: float = 0.01  # added to the Gram's diagonal, times its mean

    def shrink_factors(self, device: torch.device | None = None) -> torch.Tensor:
        """The clip grid as fractions of each block's absmax (index 0 = no clipping)."""
        steps = torch.arange(self.clip_points, dtype=torch.float32, device=device)
        return 1.0 - self.max_shrink * steps / self.clip_points


def pad_k(t: torch.Tensor, block: int) -> torch.Tensor:
    """t with its last dimension (a linear's input features) zero-padded to whole blocks.

    The int4 packer pads K the same way (phi3_onnx.quantize.rtn): zeros change no block's absmax,
    and a zero input feature adds nothing to an output or a Gram matrix.
    """
    pad = -t.shape[-1] % block
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def fake_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """Quantize-dequantize [N, K] like ORT's symmetric MatMulNBits packer.

    The block's signed value of largest magnitude (the negative one on a tie) maps to code -8;
    codes span -8..7, so scale = -m / 8.
    """
    wb = pad_k(w, block).reshape(*w.shape[:-1], -1, block)
    hi, lo = wb.amax(-1, keepdim=True), wb.amin(-1, keepdim=True)
    scale = torch.where(hi > -lo, hi, lo) / -8.0
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    q = torch.round(wb * inv).clamp_(-8, 7)
    return (q * scale).reshape(*w.shape[:-1], -1)[..., : w.shape[-1]]


def evenly_spaced(n: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """min(n, count) indices spread evenly over range(n), first and last included."""
    return torch.linspace(0, n - 1, min(n, count), device=device).round().long()


def normalized_weight_mean(w: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over rows of |w| relative to its block's absmax: AWQ's per-channel weight salience."""
    wb = pad_k(w.abs(), block).reshape(w.shape[0], -1, block)
    return (wb / wb.amax(-1, keepdim=True).clamp_min(1e-6)).reshape(w.shape[0], -1)[:, : w.shape[1]].mean(0)


Output = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input, weight) -> what the search compares


def linear_output(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, points: int, tie: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """s = 1, then x_mean^r / w_mean^(1-r) for r in [0, 1), each normalised to geometric-mean-ish 1."""
    out = [torch.ones_like(x_mean)]
    for i in range(points):
        r = i / points
        s = tie((x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp_min(1e-4))
        s = s / (s.max() * s.min()).sqrt()
        out.append(torch.nan_to_num(s, nan=1.0, posinf=1.0))
    return out


def best_scale(w: torch.Tensor, x: torch.Tensor, candidates: list[torch.Tensor], block: int, output: Output = linear_output) -> torch.Tensor:
    """The candidate s with the least ||output(x, w) - output(x / s, Q(w s))||^2.

    x may carry leading dimensions (whole sequences, for attention); s scales its last one.
    """
    ref = output(x, w)

    def error(s: torch.Tensor) -> float:
        return float((output(x / s, fake_int4(w * s, block)) - ref).pow(2).sum())

    errors = [error(s) for s in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]


def search_scale(w: torch.Tensor, x_mean: torch.Tensor, x: torch.Tensor, block: int, grid: SearchGrid,
                 tie: Callable[[torch.Tensor], torch.Tensor] = lambda s: s) -> torch.Tensor:
    """The input-channel scale [K] with the least linear output error on the sample x [T, K]."""
    w = w[evenly_spaced(w.shape[0], grid.search_rows, w.device)]
    candidates = scale_candidates(x_mean, normalized_weight_mean(w, block), grid.scale_points, tie)
    return best_scale(w, x, candidates, block)


def block_gram(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block Gram matrices [ceil(K/block), block, block] of x [T, K] (K zero-padded)."""
    xb = pad_k(x, block).reshape(x.shape[0], -1, block).transpose(0, 1)
    return xb.transpose(1, 2) @ xb


@dataclass
class BlockChoice:
    """Per (row, block) of one weight: the clip (index into `SearchGrid.shrink_factors`) and a
    refit factor alpha for the dequantized block, both [N, K / block]."""

    clip: torch.Tensor  # uint8
    alpha: torch.Tensor  # float16, 1 = plain absmax scale
    codes: torch.Tensor | None = None  # GPTQ's codes under those scales, two per byte (pack_codes); None: round to nearest


def _quantized_blocks(wb: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fake_int4(clamp(wb, -c, c)) without materialising the clamp.

    Clamping to ±c makes the block's extremes min(hi, c) and max(lo, -c), so the scale comes from
    [n, G, 1] tensors; codes beyond ±8 saturate exactly as the clamped values would.
    """
    hi_c, lo_c = torch.minimum(hi, c), torch.maximum(lo, -c)
    scale = torch.where(hi_c > -lo_c, hi_c, lo_c) / -8.0
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    return torch.round(wb * inv).clamp_(-8, 7).mul_(scale)


def _refit(q: torch.Tensor, wb: torch.Tensor, gram: torch.Tensor, w_h_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best alpha for alpha * q ≈ w under the block's Gram, and the error it leaves: [n, G] each.

    err(a) = wHw - 2a qHw + a^2 qHq; alpha = qHw / qHq, bounded to [0.5, 2]. Clipping alone
    shrinks outputs (error anti-correlated with the output); the refit removes that bias.
    """
    q_t, w_t = q.transpose(0, 1), wb.transpose(0, 1)
    hq = q_t @ gram
    q_h_q, q_h_w = (hq * q_t).sum(-1).T, (hq * w_t).sum(-1).T
    alpha = torch.where(q_h_q > 0, q_h_w / q_h_q, torch.ones_like(q_h_q)).clamp_(0.5, 2.0)
    return alpha, w_h_w - 2 * alpha * q_h_w + alpha * alpha * q_h_q


def search_blocks(w: torch.Tensor, gram: torch.Tensor, block: int, grid: SearchGrid, chunk: int = 256) -> BlockChoice:
    """Per (row, block): the clip and refit alpha with the least output error over the calibration tokens.

    Coarse-to-fine over the clip grid: every `clip_stride`-th point, then the points next to each
    block's `clip_seeds` best coarse ones. Rows go in small chunks so every grid point's
    temporaries stay in the CPU cache.
    """
    factors = grid.shrink_factors(w.device)
    w = pad_k(w, block)
    n_blocks = w.shape[1] // block
    clip = torch.zeros(w.shape[0], n_blocks, dtype=torch.uint8, device=w.device)
    alpha = torch.ones(w.shape[0], n_blocks, dtype=torch.float16, device=w.device)
    for r0 in range(0, w.shape[0], chunk):
        wb = w[r0:r0 + chunk].reshape(-1, n_blocks, block)
        hi, lo = wb.amax(-1, keepdim=True), wb.amin(-1, keepdim=True)
        amax, w_t = torch.maximum(hi, -lo), wb.transpose(0, 1)
        w_h_w = ((w_t @ gram) * w_t).sum(-1).T
        coarse = torch.arange(0, len(factors), grid.clip_stride, device=w.device)
        errors, alphas = [], []
        for f in factors[coarse]:
            a, err = _refit(_quantized_blocks(wb, hi, lo, amax * f), wb, gram, w_h_w)
            errors.append(err)
            alphas.append(a)
        errors, alphas = torch.stack(errors, -1), torch.stack(alphas, -1)  # [n, G, coarse points]
        best_err, pick = errors.min(-1)
        best_i, best_a = coarse[pick], alphas.gather(-1, pick[..., None])[..., 0]
        if grid.clip_stride > 1:
            seeds = coarse[errors.topk(min(grid.clip_seeds, len(coarse)), -1, largest=False).indices]  # [n, G, seeds]
            for d in range(1, grid.clip_stride):
                for idx in ((seeds - d).clamp(0, len(factors) - 1), (seeds + d).clamp(0, len(factors) - 1)):
                    for j in range(idx.shape[-1]):
                        i = idx[..., j]
                        a, err = _refit(_quantized_blocks(wb, hi, lo, amax * factors[i].unsqueeze(-1)), wb, gram, w_h_w)
                        better = err < best_err
                        best_err = torch.where(better, err, best_err)
                        best_i = torch.where(better, i, best_i)
                        best_a = torch.where(better, a, best_a)
        clip[r0:r0 + chunk] = best_i.to(torch.uint8)
        alpha[r0:r0 + chunk] = best_a.half()
    return BlockChoice(clip, alpha)


def block_scales(w: torch.Tensor, choice: BlockChoice, block: int, grid: SearchGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed scale ORT will store for each (row, block) of apply_blocks' output, and the index
    (within the block) of the element that sets it: [N, G] each. Code = value / scale, in -8..7."""
    wb = pad_k(w, block).reshape(w.shape[0], -1, block)
    hi, lo = wb.amax(-1), wb.amin(-1)
    c = torch.maximum(hi, -lo) * grid.shrink_factors(w.device)[choice.clip.long()]
    hi_c, lo_c = torch.minimum(hi, c), torch.maximum(lo, -c)
    pos = hi_c > -lo_c
    scale = torch.where(pos, hi_c, lo_c) / -8.0 * choice.alpha.float()
    return scale, torch.where(pos, wb.argmax(-1), wb.argmin(-1))


def _lower_inverse(m: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by halves ([[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]):
    K^3 / 3 multiply-adds, nearly all in matmuls (a triangular solve against the identity costs 3x that)."""
    n = m.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype, device=m.device), upper=False)
    a = n // 2
    out = torch.zeros_like(m)
    out[:a, :a], out[a:, a:] = _lower_inverse(m[:a, :a], leaf), _lower_inverse(m[a:, a:], leaf)
    out[a:, :a] = -(out[a:, a:] @ (m[a:, :a] @ out[:a, :a]))
    return out


def _inverse_cholesky(gram: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper U with U^T U = (gram + damp * mean(diag) * I)^-1, dead inputs set to 1 on the diagonal
    (float32, as GPTQ's reference); the damping grows 10x per retry while the Gram is not positive
    definite. One Cholesky and one triangular inverse: with P the reversal, P·H·P = M M^T gives
    U = P M^-1 P."""
    for attempt in range(4):
        h = gram.clone()
        h[dead, dead] = 1.0
        h.diagonal().add_(damp * 10**attempt * h.diagonal().mean())
        m, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        del h
        if int(info) == 0:
            return _lower_inverse(m).flip(0, 1)
    raise torch.linalg.LinAlgError("GPTQ: the input Gram is not positive definite even with 1000x damping")


def gptq_codes(w: torch.Tensor, gram: torch.Tensor, choice: BlockChoice, block: int, grid: SearchGrid,
               lazy: int = 128) -> torch.Tensor:
    """Codes [N, K] (pack_codes' form) for w under the block scales of `choice`, minimising ||(w - q s) X^T||^2 with
    gram = X^T X [K, K] by GPTQ's column-by-column rounding with error feedback (no reordering).

    Each block's extreme element is pinned to code -8, so ORT's absmax packer, given q * s, finds
    the same scale and the same codes. Works on w^T, so that each input column is contiguous.
    """
    n, k = w.shape
    scale, pin = block_scales(w, choice, block, grid)
    col_scale = scale.T.repeat_interleave(block, 0)[:k].contiguous()  # [K, N]
    pinned = torch.zeros(pin.shape[1] * block, n, dtype=torch.bool, device=w.device)
    pinned.scatter_(0, (pin + torch.arange(pin.shape[1], device=w.device) * block).T, True)
    pinned = pinned[:k]
    hinv = _inverse_cholesky(gram.float(), gram.diagonal() <= 0, grid.gptq_damp).to(w.dtype)
    work = w.T.contiguous()  # [K, N]
    codes = torch.zeros(k, n, dtype=torch.int8, device=w.device)
    safe = torch.where(col_scale == 0, torch.ones_like(col_scale), col_scale)
    minus8 = torch.full((n,), -8.0, dtype=w.dtype, device=w.device)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, h1 = work[i1:i2], hinv[i1:i2, i1:i2]  # a view: updated in place
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            c, s = i1 + i, col_scale[i1 + i]
            q = torch.round(w1[i] / safe[c]).clamp_(-8, 7)
            q = torch.where(pinned[c], minus8, q).mul_(s != 0)
            codes[c] = q.to(torch.int8)
            e = (w1[i] - q * s) / h1[i, i]
            w1[i:].addr_(h1[i, i:], e, alpha=-1)
            err1[i] = e
        if i2 < k:
            work[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
    return pack_codes(codes.T)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in -8..7 -> uint8 [N, ceil(K / 2)], two per byte (what AwqResult keeps per weight)."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """pack_codes' inverse: float codes [N, k]."""
    both = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)[:, :k]
    return both.float() - 8.0


def apply_blocks(w: torch.Tensor, choice: BlockChoice, block: int, grid: SearchGrid) -> torch.Tensor:
    """alpha * clamp(block, ±c): ORT's absmax scale becomes alpha * c / 8 and the codes stay those of the clip.
    With GPTQ codes: codes * that scale (the pinned -8 per block keeps ORT's scale and codes)."""
    if choice.codes is not None:
        scale, _ = block_scales(w, choice, block, grid)
        return unpack_codes(choice.codes, w.shape[1]) * scale.repeat_interleave(block, 1)[:, : w.shape[1]]
    wb = pad_k(w, block).reshape(w.shape[0], -1, block)
    c = wb.abs().amax(-1, keepdim=True) * grid.shrink_factors(w.device)[choice.clip.long()].unsqueeze(-1)
    clipped = torch.minimum(torch.maximum(wb, -c), c)
    return (clipped * choice.alpha.float().unsqueeze(-1)).reshape(w.shape[0], -1)[:, : w.shape[1]]
