#!/usr/bin/env bash
# Strategy figures on a GPU, each configuration in its own bounded process.
# Usage: OUT=dir bash experiments/scripts/gpu_benchmark.sh "8:loop/lax/1,vmap/lax/1" "128:vmap/im2col/1" ...
set -u
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
for group in "$@"; do
  size=${group%%:*}; configs=${group#*:}
  for cfg in ${configs//,/ }; do
    name=$(echo "$size-$cfg" | tr '/' '_')
    timeout "${PER_CONFIG_TIMEOUT:-90}" python3 -m experiments.benchmark --suites=train --population_sizes="$size" \
      --configs="$cfg" --batch_size="${BATCH:-128}" --num_steps="${STEPS:-5}" \
      --out="$OUT/bench_$name.json" > "$OUT/bench_$name.log" 2>&1
    echo "$size $cfg rc=$? $(grep -E 'img/s' "$OUT/bench_$name.log" | head -1)"
  done
done
