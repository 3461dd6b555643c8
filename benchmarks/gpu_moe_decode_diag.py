"""Where fp16-cuda's Phi-3.5-MoE decode past the original context departs from the CPU EP (diagnosis).

    PYTHONPATH=src python benchmarks/gpu_moe_decode_diag.py

gpu_moe_check.py found the fp16-cuda decode after the LongRoPE switch ~8x further from transformers than
the CPU EP (int4-cuda is not). This runs one decode step of the same fp16 package on both EPs from the
same past (the CPU EP's), at a position inside the original context and one past it, with every node's
output exposed, and prints the first nodes whose outputs differ by more than 3e-3 of their range.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def main() -> int:
    import onnx
    import onnxruntime as ort
    from gpu_moe_check import _past, _published_rotary
    from helpers import make_random_phimoe, phimoe_longrope

    from phi3_onnx import export

    work = Path(tempfile.mkdtemp(prefix="moe-diag-"))
    ckpt = make_random_phimoe(work / "tiny-phimoe", seed=1, **phimoe_longrope())
    ids = np.random.default_rng(0).integers(3, 2048, size=(1, 200)).astype(np.int64)
    with _published_rotary():
        pkg = export(ckpt, "fp16-cuda", work / "fp16-cuda")
    model = onnx.load(str(pkg / "model.onnx"))
    graph_outputs = [o.name for o in model.graph.output]
    inner = [n.output[0] for n in model.graph.node if n.output and n.output[0] and n.output[0] not in graph_outputs]
    for name in inner:
        model.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    blob = model.SerializeToString()
    cpu = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    eps = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    cuda = ort.InferenceSession(blob, providers=[*eps, "CPUExecutionProvider"])
    print("cuda session:", cuda.get_providers()[0])
    names = [o.name for o in cpu.get_outputs()]
    presents = [n for n in names if n.startswith("present.")]
    past = _past(cpu, np.float16)
    out = cpu.run(presents, {"input_ids": ids[:, :40], "attention_mask": np.ones((1, 40), np.int64), **past})
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(presents, out)}
    for t in range(40, 100):
        feed = {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64), **past}
        if t in (50, 70, 90):
            a, b = cpu.run(names, feed), cuda.run(names, feed)
            print(f"\n--- decode step at position {t} (original context 64) ---")
            shown = 0
            for name, x, y in zip(names, a, b):
                if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.shape != y.shape or x.size == 0:
                    continue
                x32, y32 = x.astype(np.float32), y.astype(np.float32)
                finite = np.isfinite(x32) & np.isfinite(y32)
                if not finite.any():
                    continue
                rng = float(np.ptp(x32[finite])) or 1.0
                d = float(np.abs(x32[finite] - y32[finite]).max()) / rng
                if d > 3e-3 and shown < 14:
                    print(f"{d:.2e}  {name}  {tuple(x.shape)}")
                    shown += 1
                if name == "logits":
                    print(f"logits: {d:.2e}")
        out = cpu.run(presents, feed)
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(presents, out)}
    return 0


if __name__ == "__main__":
    sys.exit(main())
