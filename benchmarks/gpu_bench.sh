#!/usr/bin/env bash
# Batch-1 decode benchmark on the GPU machine: phi3-onnx's fp16-cuda / int4-cuda packages against
# onnxruntime-genai's model builder output for the same full-size random-weight Phi-3-mini-4k,
# side by side in one run; then long inputs (2048 / 3000-token prompts decoded to 4096), the
# LongRoPE switch under CUDA graphs, the DirectML-shaped graph on the CUDA EP, and a kernel profile.
#
# Runs as ONE device command, after the wheel-install calls of /work/shared/gpu/README.md (each call's
# working tree + chunk must stay under 64 MiB: with the test assets in the tree, split each 60 MB
# chunk in halves, `split -n 2 -d -a 1 partNN` -> partNNa/partNNb; install.sh's `cat ortgpu.part*` keeps the order):
#   export PYTHONPATH=/tmp/site:$PWD/src; bash benchmarks/gpu_bench.sh        (carry [".bench"])
# .bench/ holds copies of ../shared/anchors/{make_random,og_bench}.py (git-ignored).
# Knobs: MODEL (make_random preset, mini-4k), ONLY_INT4=1 (no fp16 exports), BLOCK (int4 block size, 32), REPS (3), ROUNDS (1), SKIP_LONG=1, SKIP_CHECKS=1, SKIP_PROFILE=1,
#        WINDOW_PROBE=1, FPA_INTB=1, XQA_ENV=1 (also bench ours with ORT_ENABLE_XQA=1),
#        SKIP_DECODE=1, EXTRA_TARGETS="name:target:block:context ..." (more of our exports, benchmarked after
#        the four main ones; block and context (--context-length) may be empty)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/bench.log"; RES="$OUT/results.jsonl"; : > "$RES"
MODEL=${MODEL:-mini-4k}; W=/tmp/bench; [ "$MODEL" = mini-4k ] || W=/tmp/bench-$MODEL
M=$W/models; mkdir -p "$M"
BLOCK=${BLOCK:-32}; REPS=${REPS:-3}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$LOG") 2>&1
here=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
collect() { grep '^RESULT ' | sed 's/^RESULT //' >> "$RES"; }

stamp "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
python3 -c "import onnxruntime as o, onnxruntime_genai as g, onnx_ir, torch, transformers as t; print('ort', o.__version__, 'genai', g.__version__, 'onnx_ir', onnx_ir.__version__, 'torch', torch.__version__, 'transformers', t.__version__)"

stamp "make random $MODEL"
[ -f "$W/ckpt/config.json" ] || python3 .bench/make_random.py "$MODEL" "$W/ckpt" || exit 1

# ---- exports, in parallel (16 cores, 128 GB: builder int4 ~20 GB, fp16 ~10 GB)
ours() {  # name target [block] [context_length]
  [ -f "$M/$1/genai_config.json" ] && { echo "reuse $M/$1"; return; }
  python3 - "$W/ckpt" "$2" "$M/$1" "${3:-}" "${4:-}" <<'PY'
import sys, time
from phi3_onnx import export
t = time.time()
export(sys.argv[1], sys.argv[2], sys.argv[3], force=True, block_size=int(sys.argv[4]) if sys.argv[4] else None,
       context_length=int(sys.argv[5]) if sys.argv[5] else None)
print(f"exported {sys.argv[3]} in {time.time() - t:.0f}s", flush=True)
PY
}
builder() {  # name precision
  [ -f "$M/$1/genai_config.json" ] && { echo "reuse $M/$1"; return; }
  python3 -m onnxruntime_genai.models.builder -i "$W/ckpt" -o "$M/$1" -p "$2" -e cuda -c "$W/cache-$1" \
    --extra_options enable_cuda_graph=1 > "$W/$1.log" 2>&1 && echo "built $1" || { echo "builder $1 FAILED"; tail -5 "$W/$1.log"; }
}
stamp "exports (parallel)"
pids=()  # explicit: a bare `wait` would also wait for the tee process substitution (never ends)
ours ours-int4 int4-cuda "$BLOCK" > "$W/ours-int4.log" 2>&1 & pids+=($!)
[ -n "${ONLY_INT4:-}" ] || { ours ours-fp16 fp16-cuda > "$W/ours-fp16.log" 2>&1 & pids+=($!); }
builder builder-int4 int4 & pids+=($!)
[ -n "${ONLY_INT4:-}" ] || { builder builder-fp16 fp16 & pids+=($!); }
for extra in ${EXTRA_TARGETS:-}; do IFS=: read -r n tg bs ctx <<<"$extra"; ours "$n" "$tg" "$bs" "$ctx" > "$W/$n.log" 2>&1 & pids+=($!); done
wait "${pids[@]}"
tail -n 3 "$W"/ours-*.log
du -sh "$M"/* 2>/dev/null

# ---- decode speed: same prompt/length/reps for every model (og_bench: P=16, N=256, greedy, min=max)
bench() {  # model [label]
  [ -f "$M/$1/genai_config.json" ] || { echo "skip $1 (no package)"; return; }
  local label=${2:-$1}
  python3 .bench/og_bench.py "$M/$1" 16 256 "$REPS" 2>&1 | tee "$W/bench-$label.txt"
  python3 - "$label" "$W/bench-$label.txt" "$RES" <<'PY'
import json, re, sys
reps = [float(m) for m in re.findall(r"decode \d+ tok ([\d.]+) tok/s", open(sys.argv[2]).read())]
pre = [float(m) for m in re.findall(r"prefill \d+ tok ([\d.]+) ms", open(sys.argv[2]).read())]
row = {"check": "decode", "model": sys.argv[1], "reps_tok_s": reps, "best_tok_s": max(reps[1:] or reps or [0]), "prefill_ms": pre}
open(sys.argv[3], "a").write(json.dumps(row) + "\n"); print("RESULT", json.dumps(row))
PY
}
# probe (speed only, NOT a shippable graph): ours-int4 with GQA's sliding window off, to size what the
# window costs (it routes decode attention from cuDNN SDPA to Flash split-KV); wrong past 2047 tokens.
if [ -n "${WINDOW_PROBE:-}" ] && [ -f "$M/ours-int4/model.onnx" ]; then
  python3 - "$M/ours-int4" "$M/probe-int4-nowindow" <<'PY'
import os, sys, onnx
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if f != "model.onnx" and not os.path.exists(f"{dst}/{f}"):
        os.link(f"{src}/{f}", f"{dst}/{f}")  # hard links: ORT refuses external data outside the model folder
m = onnx.load(f"{src}/model.onnx", load_external_data=False)
for n in m.graph.node:
    for a in n.attribute:
        if n.op_type == "GroupQueryAttention" and a.name == "local_window_size":
            a.i = -1
onnx.save(m, f"{dst}/model.onnx")
PY
fi
stamp "decode benchmarks"
[ -n "${SKIP_DECODE:-}" ] || for round in $(seq "${ROUNDS:-1}"); do  # rounds alternate the models (A B A B), against drift
  for m in builder-int4 ours-int4 builder-fp16 ours-fp16; do bench "$m"; done  # a missing package is skipped
  for extra in ${EXTRA_TARGETS:-}; do bench "${extra%%:*}"; done
  [ -n "${WINDOW_PROBE:-}" ] && bench probe-int4-nowindow
  # XQA is opt-in for unquantized KV caches in some ORT builds: the same packages with it forced on
  [ -n "${XQA_ENV:-}" ] && for m in ours-int4 ours-fp16; do ORT_ENABLE_XQA=1 bench "$m" "$m+xqa"; done
done
# ORT's fpA_intB (TensorRT-LLM weight-only) GEMV/GEMM for MatMulNBits: a runtime switch (env var
# ORT_FPA_INTB_GEMM=1 or session config ep.cuda.fpa_intb_gemm=1), applied to builder and ours alike.
if [ -n "${FPA_INTB:-}" ]; then
  for m in builder-int4 ours-int4 ${EXTRA_TARGETS:+$(for e in $EXTRA_TARGETS; do echo "${e%%:*}"; done)}; do
    ORT_FPA_INTB_GEMM=1 bench "$m" "$m+fpA_intB"
  done
  python3 "$here/gpu_checks.py" long "$M/ours-int4" 16 272 graph "$W/short-default.npy" 2>&1 | tail -1 | collect
  ORT_FPA_INTB_GEMM=1 python3 "$here/gpu_checks.py" long "$M/ours-int4" 16 272 graph "$W/short-fpa.npy" 2>&1 | tail -1 | collect
  python3 - "$W" "$RES" <<'PY'
import json, sys, numpy as np
a, b = np.load(f"{sys.argv[1]}/short-default.npy"), np.load(f"{sys.argv[1]}/short-fpa.npy")
row = {"check": "fpA_intB-vs-default-tokens", "model": "ours-int4", "tokens": int(len(a)), "same_fraction": float((a == b).mean()),
       "first_difference": int(np.argmax(a != b)) if (a != b).any() else None}
open(sys.argv[2], "a").write(json.dumps(row) + "\n"); print("RESULT", json.dumps(row))
PY
fi

# ---- long inputs: prompts of 2048 and 3000 tokens, decoding on to 4096 (sliding window 2047)
if [ -z "${SKIP_LONG:-}" ]; then
  stamp "long inputs"
  for m in ours-int4 ours-fp16 builder-int4; do
    for p in 2048 3000; do
      timeout 240 python3 "$here/gpu_checks.py" long "$M/$m" "$p" 4096 graph "$W/long-$m-$p.npy" 2>&1 | tail -3 | tee /dev/stderr | collect
    done
  done
  timeout 240 python3 "$here/gpu_checks.py" long "$M/ours-int4" 2048 4096 nograph "$W/long-nograph.npy" 2>&1 | tail -3 | collect
  python3 - "$W" "$RES" <<'PY'
import json, sys, numpy as np
a, b = np.load(f"{sys.argv[1]}/long-ours-int4-2048.npy"), np.load(f"{sys.argv[1]}/long-nograph.npy")
n = min(len(a), len(b)); diff = int(np.argmax(a[:n] != b[:n])) if (a[:n] != b[:n]).any() else None
row = {"check": "long-graph-vs-nograph", "model": "ours-int4", "tokens": n, "first_difference": diff}
open(sys.argv[2], "a").write(json.dumps(row) + "\n"); print("RESULT", json.dumps(row))
PY
fi

# ---- LongRoPE under CUDA graphs, and the DirectML-shaped graph on the CUDA EP (tiny checkpoints)
if [ -z "${SKIP_CHECKS:-}" ]; then
  stamp "longrope, dml, sliding-window, runtime and AWQ checks (tiny checkpoints)"
  timeout 180 python3 "$here/gpu_checks.py" longrope "$W/tiny" 2>&1 | tail -4 | collect
  timeout 120 python3 "$here/gpu_checks.py" dml "$W/tiny" 2>&1 | tail -3 | collect
  timeout 180 python3 "$here/gpu_checks.py" window "$W/tiny" 2>&1 | tail -6 | collect
  timeout 180 python3 "$here/gpu_checks.py" runtime "$W/tiny" 2>&1 | tail -3 | collect
  timeout 300 python3 "$here/gpu_checks.py" awq "$W/tiny" 2>&1 | tail -3 | collect
fi

# ---- where the time goes: GPU kernel time per kernel (CUPTI via torch.profiler), CUDA graph on
if [ -z "${SKIP_PROFILE:-}" ]; then
  stamp "profile"
  for m in ours-int4 builder-int4 ${PROFILE_EXTRA:-}; do
    timeout 120 python3 "$here/gpu_checks.py" profile "$M/$m" 16 256 2>&1 | tail -2 | collect
  done
  [ -n "${FPA_INTB:-}" ] && ORT_FPA_INTB_GEMM=1 timeout 120 python3 "$here/gpu_checks.py" profile "$M/ours-int4" 16 256 2>&1 | tail -1 | collect
fi
stamp "done"
cat "$RES"
