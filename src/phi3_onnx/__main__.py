"""python -m phi3_onnx: the phi3-onnx command."""

from phi3_onnx.cli import run

run()
