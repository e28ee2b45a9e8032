#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md (issue 17) on a fresh GPU machine, start to finish within BUDGET
# seconds (default 480), left under $OUT as they are measured: training step time and peak memory of the
# four steps with and without gradient checkpointing, the two FLOP cuts, generation pairs/s at 512 px and
# torch.compile, all at SD-1.5 scale with random weights (benchmarks/gpu_bench.py says what each part does).
#
#   bash scripts/pretrain_gpu.sh --fetch-wheels   # once, with network access: the pinned wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu.sh --dry-run              # on any CPU: every part at test size, seconds each
#   bash benchmarks/gpu.sh                        # on the GPU machine: with .whl copied along, PyTorch installed
#   python benchmarks/gpu_bench.py --record OUT/rows.jsonl   # afterwards, in the repository: the rows into RESULTS.md
#
# As scripts/pretrain_gpu.sh does, the GPU run installs the wheels in $WHEELS (diffusers, transformers, peft,
# ...) with --no-deps into a private folder first on PYTHONPATH; without wheels the installed packages are
# used. The dry run always uses the installed packages. Each part (train, generate, compile) is a process
# of its own under `timeout`; a part stopped at its cap keeps the rows it wrote.
#
# Environment: OUT (default ./gpu_bench_out), BUDGET (seconds, default 480), TRAIN_CAP (default 190),
# GENERATE_CAP (default 115; compile gets what is left), TRAIN_GROUPS (the train part's groups, in order),
# GENERATE_CELLS (the generate part's SCHEDULER:STEPS:BATCH cells, in order; default all),
# PYTHON (default python3), WHEELS (default .whl; empty: the installed packages),
# WORK (scratch, default /tmp/dualanodiff-gpu-bench), TINY=1 (the same as --dry-run).
# $OUT receives rows.md, rows.jsonl and log.txt.
set -euo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu_bench_out}
BUDGET=${BUDGET:-480}
TRAIN_CAP=${TRAIN_CAP:-190}
TRAIN_GROUPS=${TRAIN_GROUPS:-steps,steps with checkpointing,cuts,cuts with checkpointing}
GENERATE_CELLS=${GENERATE_CELLS:-}
GENERATE_CAP=${GENERATE_CAP:-115}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-$REPO/.whl}
WORK=${WORK:-/tmp/dualanodiff-gpu-bench}

dry=${TINY:-0}
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
: >"$LOG"
rm -f "$OUT/rows.jsonl" "$OUT/rows.md"
source "$REPO/scripts/wheels.sh"
say() { echo "[gpu.sh $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

flags=()
if [ "$dry" = 1 ]; then
  flags=(--dry-run)
  say "dry run: test size on the CPU, installed packages"
  use_wheels "" "$WORK"
else
  use_wheels "$WHEELS" "$WORK"
fi

if ! "$PYTHON" - "$dry" <<'EOF' 2>&1 | tee -a "$LOG"; then
import sys, torch, diffusers, transformers, peft
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}; {gpu}")
sys.exit(0 if sys.argv[1] == "1" or torch.cuda.is_available() else 1)
EOF
  say "the packages do not import, or no CUDA GPU is visible (use --dry-run to test the path on a CPU)"
  exit 1
fi

run_part() {  # part, cap in seconds: the part stops measuring 20 s before its cap, `timeout` ends it at the cap
  local part=$1 cap=$2 status=0
  if [ "$cap" -lt 30 ]; then
    say "$part: skipped, only $cap s left of the budget"
    return
  fi
  say "$part: at most $cap s"
  timeout -k 10 "$cap" "$PYTHON" "$REPO/benchmarks/gpu_bench.py" --part "$part" --out "$OUT" --train-groups "$TRAIN_GROUPS" \
    --generate-cells "$GENERATE_CELLS" \
    --deadline "$(($(date +%s) + cap - 20))" ${flags[@]+"${flags[@]}"} 2>&1 | tee -a "$LOG" || status=$?
  [ "$status" = 0 ] || say "$part: ended with status $status (124: stopped at its cap); the rows it wrote are kept"
}

left() { echo $((BUDGET - ($(date +%s) - START))); }
run_part train "$(( $(left) < TRAIN_CAP ? $(left) : TRAIN_CAP ))"
run_part generate "$(( $(left) < GENERATE_CAP ? $(left) : GENERATE_CAP ))"
run_part compile "$(( $(left) - 5 ))"
say "done: $(grep -c '"section"' "$OUT/rows.jsonl" 2>/dev/null || echo 0) rows in $OUT/rows.md; add them to RESULTS.md with:" \
  "python benchmarks/gpu_bench.py --record $OUT/rows.jsonl"
