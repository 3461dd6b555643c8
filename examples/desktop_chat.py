"""A minimal desktop-app integration of a phi3-onnx package (copy this into your app).

    pip install -e ".[cpu]"             # from a clone; or [cuda] (NVIDIA), [directml] (Windows GPUs)
    python examples/desktop_chat.py path/to/package-or-bundle      # type lines; quit, /exit or Ctrl-D ends

The runtime needs only onnxruntime + onnxruntime-genai at run time; the package folder (or a bundle
of variants, from `phi3-onnx export --target A --target B`) ships with your app.
"""

from __future__ import annotations

import sys

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime import load

USAGE = "usage: python examples/desktop_chat.py PACKAGE_OR_BUNDLE   (e.g. out/tiny-int4 from the README's Quick start)"
QUIT = {"quit", "exit", "/quit", "/exit"}


def main(path: str) -> int:
    try:
        # device="auto": CUDA > DirectML > CPU, whichever this machine can run the package on.
        # max_length sizes the KV cache: raise it (up to the model's context) for long documents.
        model = load(path, device="auto", max_length=4096)
    except Phi3OnnxError as exc:  # missing/corrupt package, missing runtime, unusable device: one line
        print(f"cannot load the model: {exc}", file=sys.stderr)
        return 2
    print(f"loaded {model.manifest.target.name} on {model.provider} ({model.choice.reason})")

    # One-shot: a list of messages goes through the Phi-3 chat template; stops at <|end|>.
    print(model.generate([{"role": "user", "content": "Say hello in five words."}], max_new_tokens=32))

    # Multi-turn chat, streamed token by token (the session keeps its KV cache across turns).
    session = model.chat(system="You are a helpful assistant.")
    for line in sys.stdin:
        if not line.strip():
            continue
        if line.strip().lower() in QUIT:  # app commands never reach the model
            break
        for piece in session.stream(line.strip(), max_new_tokens=256, temperature=0.7, top_p=0.9, seed=0):
            print(piece, end="", flush=True)
        print()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    sys.exit(main(sys.argv[1]))
