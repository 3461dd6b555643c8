"""Which device will a user's machine run your package on, and how fast? (support/diagnostics script)

    python examples/device_report.py path/to/package-or-bundle [--device auto|cpu|cuda|dml]

Prints the installed execution providers, the device probes, the variant and EP `load` picks and
why, then generates a few tokens and reports tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime import load, plan_load, probe_environment


def report(path: str, device: str, tokens: int) -> None:
    env = probe_environment()
    print(f"providers:    {', '.join(env.providers)}")
    print(f"devices:      CUDA {env.cuda_devices}, DirectML adapters {env.dml_adapters}")
    plan = plan_load(path, device=device, environment=env)
    print(f"package:      {plan.package.path} ({plan.package.manifest.target.name})")
    print(f"provider:     {plan.choice.provider}: {plan.choice.reason}")
    model = load(path, device=device)
    start = time.perf_counter()
    pieces = list(model.stream("The quick brown fox", max_new_tokens=tokens, min_new_tokens=tokens))
    elapsed = time.perf_counter() - start
    print(f"generated:    {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s, prefill included)")
    print(f"text:         {''.join(pieces)[:120]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    try:
        report(args.package, args.device, args.tokens)
    except Phi3OnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
