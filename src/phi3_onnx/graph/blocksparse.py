"""Phi-3-small's block-sparse attention layout: which key blocks each query block of each head sees.

Query block i of head h sees key block j (j <= i) when j is one of the `local_blocks` latest
(i - j < local_blocks) or j is "vertical" for that head: (j + h * head_step + 1) % vert_stride == 0.
Tokens inside a visible block are still causal. Two forms of the same rule:

* `block_layout` / `csr_layout`: the dense [layouts, blocks, blocks] mask and its CSR rows/cols, the
  `block_row_indices` / `block_col_indices` constants of ORT's SparseAttention (CUDA). Heads use the
  layouts cyclically (head h -> layout h % layouts), so only the distinct period of the pattern is stored.
* `make_sparse_bias` (in graph.phi3_small): the same rule as ops over the step's positions, an additive
  bias for GroupQueryAttention on EPs without a SparseAttention kernel the plain graph contract can use.
"""

from __future__ import annotations

import numpy as np

from phi3_onnx.spec import ModelSpec, SmallSpec


def layout_count(small: SmallSpec, num_heads: int) -> int:
    """Distinct per-head layouts: the smallest period p (dividing num_heads) of the head pattern."""
    step = small.head_step(num_heads)
    for p in range(1, num_heads + 1):
        if num_heads % p == 0 and (p * step) % small.vert_stride == 0:
            return p
    return num_heads


def head_offsets(small: SmallSpec, num_heads: int) -> np.ndarray:
    """The vertical pattern's offset per query head, h * head_step: [num_heads], or [1] when homogeneous."""
    if small.homo_head_pattern:
        return np.zeros(1, np.int64)
    return np.arange(num_heads, dtype=np.int64) * small.head_step(num_heads)


def block_layout(spec: ModelSpec) -> np.ndarray:
    """bool [layouts, blocks, blocks]: query block i sees key block j, for the whole context."""
    small = spec.small
    assert small is not None
    blocks = -(-spec.max_position_embeddings // small.block_size)
    layouts = layout_count(small, spec.num_heads)
    q, k = np.arange(blocks)[:, None], np.arange(blocks)[None, :]
    offsets = np.arange(layouts) * small.head_step(spec.num_heads)
    vertical = (np.arange(blocks)[None, :] + offsets[:, None] + 1) % small.vert_stride == 0  # [layouts, blocks]
    return (q >= k)[None] & (((q - k) < small.local_blocks)[None] | vertical[:, None, :])


def csr_layout(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """block_row_indices int32 [layouts, blocks + 1], block_col_indices int32 [layouts, max nnz] (right-padded with -1)."""
    mask = block_layout(spec)
    rows = np.zeros((mask.shape[0], mask.shape[1] + 1), np.int32)
    rows[:, 1:] = np.cumsum(mask.sum(-1), axis=-1)
    cols = np.full((mask.shape[0], int(rows[:, -1].max())), -1, np.int32)
    for layout, m in enumerate(mask):
        idx = np.nonzero(m)[1]  # row-major: block columns row by row
        cols[layout, : idx.size] = idx
    return rows, cols


__all__ = ["block_layout", "csr_layout", "head_offsets", "layout_count"]
