#!/usr/bin/env bash
# AWQ export time and peak RSS for full-size Phi-3-mini-4k (random weights: speed and memory
# don't depend on the values). Default calibration (8 x 256 tokens of the built-in text).
# usage: benchmarks/awq_bench.sh [CKPT_DIR] [OUT_DIR]     (check `free -g` first: making the
#        checkpoint takes ~90 s and 7.5 GiB RSS; the export itself stays at a few GiB)
set -euo pipefail
CKPT=${1:-/tmp/mini4k}
OUT=${2:-/tmp/mini-awq}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$CKPT/config.json" ]; then
    python "$HERE/../shared/anchors/make_random.py" mini-4k "$CKPT"
fi
/usr/bin/time -v phi3-onnx export --model "$CKPT" --target int4-awq-cpu --output "$OUT" --force 2>&1 \
    | grep -E "AWQ|Writing|wrote|Elapsed \(wall|Maximum resident|error"
