"""Round-to-nearest int4 block quantization, packed by ONNX Runtime's own kernel for MatMulNBits.

`quantize_matmul_4bits` is the C++ routine ORT's MatMulNBitsQuantizer uses; calling it directly
keeps the packing (nibble order, zero points, scale layout) exactly what the kernels expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phi3_onnx.errors import Phi3OnnxError


@dataclass(frozen=True)
class Int4Packed:
    """MatMulNBits inputs for a weight of N output and K input features."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size / 2]
    scales: np.ndarray  # float [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks / 2)], None when symmetric


def _kernel():
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    except ImportError:
        raise Phi3OnnxError(
            "int4 export uses ONNX Runtime's quantization kernel: pip install 'phi3-onnx[cpu]'"
        ) from None
    return quantize_matmul_4bits


def k_blocks(k: int, block_size: int) -> int:
    """Blocks per output row: ceil(K / block_size); MatMulNBits' B is [N, k_blocks, block_size / 2]."""
    return -(-k // block_size)


def quantize_int4(weight_nk: np.ndarray, block_size: int, symmetric: bool = True, dtype: str = "float32") -> Int4Packed:
    """Quantize a Hugging Face-layout weight [out=N, in=K] for MatMulNBits (B = W^T).

    K need not be a multiple of block_size: the weight is padded with zero input features to whole
    blocks (zeros change no block's absmax), as ORT's own MatMulNBitsQuantizer pads it; the node keeps
    the real K.
    """
    n, k = weight_nk.shape
    blocks = k_blocks(k, block_size)
    w_kn = np.zeros((blocks * block_size, n), dtype=dtype)
    w_kn[:k] = weight_nk.T
    packed = np.zeros((n, blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=dtype)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
    # the kernel quantizes all blocks * block_size rows: padded values get the zero code (8), so a kernel
    # that reads whole blocks adds exactly 0 for them (with rows=K their bytes stay 0, i.e. code -8)
    _kernel()(packed, w_kn, scales, zero_points, block_size, n, blocks * block_size, symmetric)
    return Int4Packed(packed, scales.reshape(-1), None if symmetric else zero_points)


def dequantize_int4(q: Int4Packed, n: int, k: int, block_size: int) -> np.ndarray:
    """[N, K] float32 weight the packed blocks stand for (tests and error analysis; padding dropped)."""
    blocks = k_blocks(k, block_size)
    low = (q.packed & 0x0F).astype(np.int32)
    high = (q.packed >> 4).astype(np.int32)
    values = np.stack([low, high], axis=-1).reshape(n, blocks, block_size)
    if q.zero_points is None:
        zp = np.full((n, blocks, 1), 8, dtype=np.int32)
    else:
        zpl = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(n, -1)
        zp = zpl[:, :blocks, None].astype(np.int32)
    scales = q.scales.astype(np.float32).reshape(n, blocks, 1)
    return ((values - zp) * scales).reshape(n, blocks * block_size)[:, :k]
