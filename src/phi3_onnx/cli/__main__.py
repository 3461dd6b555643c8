"""python -m phi3_onnx.cli: the phi3-onnx command."""

from phi3_onnx.cli import run

run()
