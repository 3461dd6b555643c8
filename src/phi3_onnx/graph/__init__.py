"""The graph stage: a ModelSpec + Target + weight source -> an onnx_ir model on ORT's fused ops.

    builder.py    plumbing: GraphBuilder, Context, lazy weights, linear (MatMul / MatMulNBits)
    rope.py       rotary caches (plain and LongRoPE)
    attention.py  mask/rotary inputs, q/k/v, rotary, GroupQueryAttention
    mlp.py        gate/up, SiLU, down
    model.py      norms, embedding, lm_head, the whole decoder (`build_model`)
"""

from __future__ import annotations

from phi3_onnx.graph.builder import Int4Blocks, Int4Packer, WeightSource
from phi3_onnx.graph.model import build_model

__all__ = ["Int4Blocks", "Int4Packer", "WeightSource", "build_model"]
