#!/usr/bin/env bash
# The Phi-3-mini-4k CUDA window (issue 10 item 3) on the GPU machine, as ONE device command per part,
# after the wheel-install calls of ../shared/gpu/README.md (export PYTHONPATH=/tmp/site:$PWD/src):
#   PART=gpu bash benchmarks/gpu_window.sh   full-size random mini-4k: ours int4-cuda / fp16-cuda (default
#                                            packages: window-free decoder + windowed) vs the builder's
#                                            int4 / fp16 (CUDA graph on) at prompts 16/512/1536; crossing
#                                            the window through the runtime; the tiny-model exactness check
#   PART=more bash benchmarks/gpu_window.sh  mini-128k int4 at prompt 16 vs the builder
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/wb; mkdir -p "$W/m"
exec > >(tee -a "$OUT/gpu_window-${PART:-gpu}.log") 2>&1
export PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
ours() {  # name checkpoint target [extra python kwargs]
  [ -f "$W/m/$1/genai_config.json" ] || python3 -c "import sys; from phi3_onnx import export; export(sys.argv[1], sys.argv[2], sys.argv[3], force=True$4)" "$2" "$3" "$W/m/$1" > "$W/$1.log" 2>&1 || { echo "ours $1 FAILED"; tail -3 "$W/$1.log"; }
}
builder() {  # name checkpoint precision ep [extra]
  [ -f "$W/m/$1/genai_config.json" ] || python3 -m onnxruntime_genai.models.builder -i "$2" -o "$W/m/$1" -p "$3" -e "$4" -c "$W/cache-$1" $5 > "$W/$1.log" 2>&1 || { echo "builder $1 FAILED"; tail -3 "$W/$1.log"; }
}
stamp "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
python3 -c "import onnxruntime as o, onnxruntime_genai as g; print('ort', o.__version__, 'genai', g.__version__)"
if [ "${PART:-gpu}" = gpu ]; then
  [ -f "$W/mini4k/config.json" ] || python3 benchmarks/make_random_checkpoint.py phi3-mini-4k "$W/mini4k" | tail -1
  stamp "exports"
  pids=()  # explicit: a bare `wait` would also wait for the tee process substitution (never ends)
  ours ours-int4 "$W/mini4k" int4-cuda "" & pids+=($!); ours ours-fp16 "$W/mini4k" fp16-cuda "" & pids+=($!)
  builder builder-int4 "$W/mini4k" int4 cuda "--extra_options enable_cuda_graph=1" & pids+=($!)
  builder builder-fp16 "$W/mini4k" fp16 cuda "--extra_options enable_cuda_graph=1" & pids+=($!)
  wait "${pids[@]}"
  ls -la "$W/m/ours-int4" | grep onnx; du -sh "$W"/m/*
  stamp "decode by prompt length"
  python3 benchmarks/window_bench.py "$OUT/window-bench-mini4k.json" builder-int4=builder:"$W/m/builder-int4" \
    ours-int4=ours:"$W/m/ours-int4" builder-fp16=builder:"$W/m/builder-fp16" ours-fp16=ours:"$W/m/ours-fp16" --rounds 3
  stamp "crossing the window"
  python3 benchmarks/gpu_checks.py cross "$W/m/ours-int4" 1536 2600
  python3 benchmarks/gpu_checks.py cross "$W/m/ours-fp16" 1536 2600
  stamp "tiny exactness"
  python3 benchmarks/gpu_checks.py dual "$W/tiny"
else
  [ -f "$W/mini128k/config.json" ] || python3 benchmarks/make_random_checkpoint.py phi3-mini-128k "$W/mini128k" | tail -1
  stamp "mini-128k exports"
  pids=(); ours ours128-int4 "$W/mini128k" int4-cuda "" & pids+=($!)
  builder builder128-int4 "$W/mini128k" int4 cuda "--extra_options enable_cuda_graph=1" & pids+=($!)
  wait "${pids[@]}"
  python3 benchmarks/window_bench.py "$OUT/window-bench-mini128k.json" builder-int4=builder:"$W/m/builder128-int4" \
    ours-int4=ours:"$W/m/ours128-int4" --prompts 16 --rounds 3
fi
stamp done
