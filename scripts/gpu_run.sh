#!/usr/bin/env bash
# One GPU run's work in one device call (about 9.5 minutes): base pretrainings side by side on the
# one GPU (by default preset cpu-v1, the shipped base's last run), then the SD-1.5-scale benchmark rows alone
# on the GPU.
#
#   bash scripts/pretrain_gpu.sh --fetch-wheels   # once, with network access: the pinned wheels into .whl/ (git-ignored)
#   bash scripts/gpu_run.sh --tiny                # on any CPU: the whole path at test size
#   bash scripts/gpu_run.sh                       # on the GPU machine, with .whl/ copied along (under 10 minutes)
#
# Environment: OUT (default ./gpu_run_out), PRESETS (the pretrainings, side by side; default "cpu-v1"),
# PRETRAIN_BUDGET (seconds for the pretrainings, default 350), BENCH_BUDGET (seconds for the benchmark, default
# 190), TRAIN_CAP / GENERATE_CAP (the benchmark's parts, default 80 / 60), TRAIN_GROUPS (benchmarks/gpu.sh),
# PYTHON, WHEELS (default .whl), WORK.
# $OUT receives (at most 8 files, as the device tool brings back): PRESET.tar.part-* for each preset
# (see scripts/pretrain_gpu.sh), rows.jsonl (python benchmarks/gpu_bench.py --record OUT/rows.jsonl) and
# log.txt (the parts' logs, one after the other).
set -euo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu_run_out}
PRESETS=${PRESETS:-cpu-v1}
PRETRAIN_BUDGET=${PRETRAIN_BUDGET:-350}
BENCH_BUDGET=${BENCH_BUDGET:-190}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.whl}
WORK=${WORK:-/tmp/dualanodiff-gpu-run}
tiny=0
case "${1:-}" in
  --tiny) tiny=1 ;;
  "") ;;
  *) echo "usage: $0 [--tiny]" >&2; exit 2 ;;
esac

mkdir -p "$OUT" "$WORK"
LOG="$WORK/run.log"
: >"$LOG"
source "$REPO/scripts/wheels.sh"
say() { echo "[gpu_run $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }
[ "$tiny" = 0 ] || WHEELS=""  # the test size uses the installed packages
use_wheels "$WHEELS" "$WORK"  # once: the parts below use what it put on PYTHONPATH
export PYTHON OUT

pretrain_flags=() bench_flags=()
[ "$tiny" = 0 ] || pretrain_flags=(--tiny) bench_flags=(--dry-run)
read -ra presets <<<"$PRESETS"
share=$(( ($(nproc) + ${#presets[@]} - 1) / ${#presets[@]} ))
say "pretraining ${presets[*]} side by side, $PRETRAIN_BUDGET s"
status=0 pids=() skip_before=0
for preset in "${presets[@]}"; do  # the first measures the shipped base, the others share its images
  PRESET=$preset BUDGET=$PRETRAIN_BUDGET RESERVE=90 WORKERS=$share SKIP_BEFORE=$skip_before WHEELS= \
    WORK=$WORK/$preset bash "$REPO/scripts/pretrain_gpu.sh" ${pretrain_flags[@]+"${pretrain_flags[@]}"} \
    >/dev/null 2>&1 &
  pids+=($!) skip_before=1
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
say "pretraining done (status $status); benchmark, $BENCH_BUDGET s"
# the benchmark's rows.md repeats rows.jsonl: only rows.jsonl and the log come back
OUT=$WORK/bench BUDGET=$BENCH_BUDGET TRAIN_CAP=${TRAIN_CAP:-80} GENERATE_CAP=${GENERATE_CAP:-60} WHEELS= \
  bash "$REPO/benchmarks/gpu.sh" ${bench_flags[@]+"${bench_flags[@]}"} >/dev/null 2>&1 || status=$?
cp "$WORK/bench/rows.jsonl" "$OUT/" 2>/dev/null || say "the benchmark wrote no rows"
logs=("$LOG")
for preset in "${presets[@]}"; do logs+=("$OUT/$preset.log"); done
for part in "${logs[@]}" "$WORK/bench/log.txt"; do
  [ -f "$part" ] && { echo "===== $(basename "$part")"; cat "$part"; }
done >"$OUT/log.txt.tmp"
for preset in "${presets[@]}"; do rm -f "$OUT/$preset.log"; done
mv "$OUT/log.txt.tmp" "$OUT/log.txt"
say "done in $(($(date +%s) - START)) s (status $status): $(ls "$OUT" | wc -l) files in $OUT" | tee -a "$OUT/log.txt"
exit "$status"
