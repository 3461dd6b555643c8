"""`python -m phi3_onnx.cli ...` runs the `phi3-onnx` command (benchmarks/ scripts call it so)."""

from phi3_onnx.cli import run

run()
