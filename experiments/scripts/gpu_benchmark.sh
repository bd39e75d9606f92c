#!/usr/bin/env bash
# The benchmark suite on a GPU, each training configuration in its own bounded process (a
# config that runs out of memory or compiles too long cannot take the others down).
# Usage: OUT=dir bash experiments/scripts/gpu_benchmark.sh                       # defaults below
#        OUT=dir bash experiments/scripts/gpu_benchmark.sh "8:loop/lax/1,vmap/lax/1" "128:vmap/im2col/1"
set -u
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
if [ $# -eq 0 ]; then
  set -- "1:loop/lax/1,vmap/lax/1" "8:loop/lax/1,vmap/lax/1,vmap/im2col/1,vmap/lax_bf16/1" \
         "32:vmap/lax/1,vmap/im2col/1,vmap/lax_bf16/1" "128:vmap/lax/1,vmap/im2col/1,vmap/lax_bf16/1" \
         "250:vmap/lax/1,vmap/lax_bf16/1" "500:vmap/lax/1"
fi
for group in "$@"; do
  size=${group%%:*}; configs=${group#*:}
  for cfg in ${configs//,/ }; do
    name=$(echo "$size-$cfg" | tr '/' '_')
    timeout "${PER_CONFIG_TIMEOUT:-120}" python3 -m experiments.benchmark --suites=train \
      --population_sizes="$size" --configs="$cfg" --batch_size="${BATCH:-128}" \
      --num_steps="${STEPS:-5}" --out="$OUT/bench_$name.json" > "$OUT/bench_$name.log" 2>&1
    echo "$size $cfg rc=$? $(grep -E 'img/s' "$OUT/bench_$name.log" | head -1)"
  done
done
timeout "${ALIGN_TIMEOUT:-300}" python3 -m experiments.benchmark --suites=align \
  --align_sizes=50,500 --align_filters=10,100 --out="$OUT/bench_align.json" > "$OUT/bench_align.log" 2>&1
echo "align rc=$?"; grep '^|' "$OUT/bench_align.log"
