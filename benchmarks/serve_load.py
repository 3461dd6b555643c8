"""Bounded load test for `phi3-onnx serve`: N chat requests, C at a time, only to 127.0.0.1.

    python benchmarks/serve_load.py PKG -n 64 -c 8 --max-tokens 64     # starts a server itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 -n 64 -c 8

Prints p50/p95 request latency, time to first token, and generated tokens/s over the whole run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import start_server, stop_server  # noqa: E402

QUESTIONS = ["What does a compiler do?", "How do I join paths?", "What is a list?", "Explain os.walk.",
             "What is a generator?", "How do I sort a dict?", "What does zip do?", "Open a file."]


def one(client: openai.OpenAI, i: int, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                            max_tokens=max_tokens, temperature=0.7, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, first or 0.0, tokens


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pkg", nargs="?", help="package to serve (omit with --url)")
    ap.add_argument("--url", help="an already running server on 127.0.0.1")
    ap.add_argument("-n", type=int, default=64, help="requests (at most 10000)")
    ap.add_argument("-c", type=int, default=8, help="concurrency (at most 64)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    if not (1 <= args.n <= 10000 and 1 <= args.c <= 64) or (args.pkg is None) == (args.url is None):
        ap.error("give PKG or --url, with 1 <= -n <= 10000 and 1 <= -c <= 64")
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(Path(args.pkg), "--max-batch", str(args.max_batch))
    elif urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        ap.error("the load test only talks to 127.0.0.1")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    try:
        one(client, 0, 4)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(args.c) as pool:
            results = list(pool.map(lambda i: one(client, i, args.max_tokens), range(args.n)))
        wall = time.perf_counter() - start
    finally:
        if proc is not None:
            stop_server(proc)
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    print(f"requests {args.n}, concurrency {args.c}, max_tokens {args.max_tokens}, wall {wall:.2f} s")
    print(f"latency  p50 {pct(lat, 50) * 1000:.0f} ms  p95 {pct(lat, 95) * 1000:.0f} ms")
    print(f"ttft     p50 {pct(ttft, 50) * 1000:.0f} ms  p95 {pct(ttft, 95) * 1000:.0f} ms")
    print(f"tokens   {tokens} generated, {tokens / wall:.1f} tok/s overall, {args.n / wall:.1f} req/s")


if __name__ == "__main__":
    main()
