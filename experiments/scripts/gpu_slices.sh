#!/usr/bin/env bash
# ModelSet500 slices on a lent GPU, one device call per staged part.
#
# Here (CPU machine), before the first call:
#   python -m experiments.slices --action=stage --task_ids=10-49      # .stage/part_K, <= 56 MiB
# Each device call carries one part (carry: [".stage/part_K"]) and runs
#   BENCH=1 bash experiments/scripts/gpu_slices.sh .stage/part_K A-B [train_population flags]
# which (1) with BENCH=1 times the formulations of BENCH_CONFIGS at the part's population,
# (2) trains tasks A-B with experiments/flags/modelset500.flags to the end, in a command of at
# most TRAIN_TIMEOUT s that resumes from its checkpoint when rerun while the machine is warm
# (work dirs under $WORK), (3) packs the finished slices into $OUT/slices.tgz (unpack into
# results/modelset500/, then: python -m experiments.slices). The last flags win, so a dry run
# can shrink the recipe (tests/apps/test_gpu_script.py runs it on the CPU).
set -uo pipefail
DATA=$1; TASKS=$2; shift 2
OUT=${OUT:-/tmp/lps_out}; WORK=${WORK:-/tmp/lps_runs}; SLICES=$WORK/slices
mkdir -p "$OUT" "$WORK" "$SLICES"
export PYTHONUNBUFFERED=1
FIRST=${TASKS%%-*}; LAST=${TASKS##*-}
POP=${POP:-$(( (LAST - FIRST + 1) * 10 ))}
if [ "${BENCH:-0}" = 1 ]; then
  timeout "${BENCH_TIMEOUT:-180}" python3 -m experiments.benchmark --suites=train \
    --data_dir="$DATA" --task_ids="$TASKS" --population_sizes="$POP" \
    --configs="${BENCH_CONFIGS:-vmap/lax/1,vmap/lax_bf16/1,vmap/im2col/1}" \
    --num_steps="${BENCH_STEPS:-5}" ${BENCH_FLAGS:-} --out="$OUT/bench_gpu_slices.json" \
    2>&1 | grep -E '^\||img/s' | tee "$OUT/bench_gpu_slices.log"
  echo "bench rc=${PIPESTATUS[0]}"
fi
timeout "${TRAIN_TIMEOUT:-530}" python3 -m experiments.train_population \
  --flagfile=experiments/flags/modelset500.flags --task_ids="$TASKS" --dataset=npz \
  --data_dir="$DATA" --workdir="$WORK/{slice}" --export_kernels= --summary= \
  --export_slice="$SLICES" --noprogress "$@" > "$OUT/train_$TASKS.log" 2>&1
rc=$?
tail -n 3 "$OUT/train_$TASKS.log"
if [ $rc = 124 ]; then
  echo "train rc=124: stopped at TRAIN_TIMEOUT; rerun this call while the machine is warm to resume"
else
  echo "train rc=$rc"
fi
tar czf "$OUT/slices.tgz" -C "$SLICES" . && echo "slices: $(ls "$SLICES" | tr '\n' ' ')"
exit $rc
