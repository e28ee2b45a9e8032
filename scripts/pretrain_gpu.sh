#!/usr/bin/env bash
# Pretrain a base model (`dualanodiff pretrain-base --preset cpu-v1`: the shipped base's last run) on a fresh GPU machine,
# start to finish inside a wall-clock budget (default 540 s), and leave the results under $OUT.
#
#   bash scripts/pretrain_gpu.sh --fetch-wheels   # once, with network access: the pinned wheels into .whl/ (git-ignored)
#   bash scripts/pretrain_gpu.sh --tiny           # on any CPU: the whole path at test size, seconds
#   bash scripts/pretrain_gpu.sh                  # on the GPU machine: with .whl copied along, PyTorch installed
#
# The machine needs PyTorch (with CUDA), numpy, scipy and pillow; everything else the pretraining imports
# (diffusers, transformers, tokenizers, ...) is installed from the wheels in $WHEELS, with --no-deps, into
# a private folder that goes first on PYTHONPATH. Without wheels the installed packages are used.
#
# Environment: OUT (results, default ./pretrain_out), BUDGET (seconds for the whole script, default 540),
# RESERVE (seconds kept for measuring, samples, export and packing; default 75), PROFILE=0 (no step profile
# in the log), PRESET (a pretrain-base preset, default cpu-v1), NAME (the results' file names, default PRESET),
# SKIP_BEFORE=1 (do not measure the shipped base, when a run beside this one does), INIT_FROM (a base directory
# that a warm-starting preset trains on from, instead of the shipped one), WORKERS (data processes,
# default all cores), PYTHON (default python3), WHEELS (default .whl; empty: the installed packages),
# WORK (scratch, default /tmp/dualanodiff-pretrain).
#
# $OUT receives two kinds of file, each at most 16 MiB (the device tool brings back at most 8 files):
#   NAME.tar.part-aa, -ab, ...  a tar in 15 MiB parts (cat NAME.tar.part-* | tar -x -C DIR) holding
#     tiny-base/                the diffusers directory, the package's layout, with
#       training.json           settings, data, steps, device, wall time, losses and held-out figures
#       samples.png             a row per family (normal and defect prompts), the held-out category, parts
#       reconstructions.png     VAE reconstructions: held-out images, the held-out category, flat grey
#     before.json               the same held-out figures of the base shipped in the package now (--base-model
#                               tiny), measured on the same images: the "before" beside training.json's "after"
#   NAME.log                    everything printed
set -euo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/pretrain_out}
BUDGET=${BUDGET:-540}
RESERVE=${RESERVE:-75}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/dualanodiff-pretrain}
PRESET=${PRESET:-cpu-v1}
NAME=${NAME:-$PRESET}
WHEELS=${WHEELS-$REPO/.whl}

# The project's pins (pyproject.toml / the tested environment) of everything the pretraining imports
# beyond PyTorch and its own dependencies, numpy, scipy and pillow.
PINNED=(
  diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0
  accelerate==1.15.0 peft==0.21.2 psutil==7.2.2 regex==2026.11.19 requests==2.34.2 urllib3==2.8.0
  certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0
  anyio==4.16.0 truststore==0.10.5 packaging==26.4 PyYAML==6.0.4 tqdm==4.70.1 protobuf==7.36.2
  filelock==4.3.1 fsspec==2026.9.0 typing_extensions==4.16.0
  rich==15.0.0 typer==0.29.2 shellingham==1.5.4 annotated-doc==0.0.7
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)

mode=gpu
case "${1:-}" in
  --tiny) mode=tiny ;;
  --fetch-wheels) mode=fetch ;;
  "") ;;
  *) echo "usage: $0 [--tiny | --fetch-wheels]" >&2; exit 2 ;;
esac

if [ "$mode" = fetch ]; then
  mkdir -p "$WHEELS"
  # the GPU machine runs Python 3.12 on x86-64 Linux
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${PINNED[@]}"
  echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
  exit 0
fi

mkdir -p "$OUT" "$WORK"
LOG="$OUT/$NAME.log"
: >"$LOG"
source "$REPO/scripts/wheels.sh"
say() { echo "[pretrain_gpu $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

use_wheels "$WHEELS" "$WORK"
# NVML for "is there a GPU?": no CUDA context before the data's worker processes are forked
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, diffusers, transformers, dualanodiff.pretrain
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}; {gpu}")
EOF

if [ "$mode" = tiny ]; then
  preset=tiny resolution=32 device=cpu workers=1
  BUDGET=${TINY_BUDGET:-120}
  RESERVE=30
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU visible: refusing to run here (use --tiny to test the path on a CPU)"
    exit 1
  fi
  preset=$PRESET resolution=128 device=cuda workers=${WORKERS:-$(nproc)}
fi
# The shipped base's figures first (seconds on a GPU), on the held-out images the new run will measure.
# Not fatal: the pretraining matters more than the comparison.
rm -rf "$WORK/tiny-base" "$WORK/before.json"
[ "${SKIP_BEFORE:-0}" = 1 ] ||
"$PYTHON" - "$preset" "$resolution" "$device" "$workers" "$WORK/before.json" <<'EOF' 2>&1 | tee -a "$LOG" ||
import json, sys
from pathlib import Path
from dualanodiff.pretrain import PRESETS, measure_base
preset, resolution, device, workers, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
figures = measure_base("tiny", resolution, 0, PRESETS[preset].options, device, workers)
Path(path).write_text(json.dumps({"base": "the shipped --base-model tiny", "heldout": figures}, indent=2) + "\n")
print(f"shipped base: VAE PSNR {figures['vae_psnr_db']:.2f} dB, denoising {figures['denoising_mse_by_timestep']}")
EOF
  say "could not measure the shipped base (see above); going on"
# Where a training step's time goes, into the log (seconds; not fatal): the 2026-11-26 GPU run stepped far
# slower than its model sizes need.
[ "${PROFILE:-1}" = 0 ] ||
"$PYTHON" - "$preset" "$resolution" "$device" <<'EOF' 2>&1 | tee -a "$LOG" || say "could not profile the step; going on"
import sys
from dualanodiff.pretrain import PRESETS, profile_unet_step
print(profile_unet_step(PRESETS[sys.argv[1]].options, int(sys.argv[2]), sys.argv[3]))
EOF
args=(--preset "$preset" --resolution "$resolution" --device "$device" --workers "$workers")
[ -z "${INIT_FROM:-}" ] || args+=(--init-from "$INIT_FROM")
left=$((BUDGET - ($(date +%s) - START) - RESERVE))
if [ "$left" -lt 10 ]; then
  say "only $left s left for training after setup; raise BUDGET"
  exit 1
fi
say "training for at most $left s (budget $BUDGET s, $RESERVE s kept for measuring, export and packing)"
"$PYTHON" -m dualanodiff pretrain-base --out "$WORK/tiny-base" --time-budget "$left" "${args[@]}" 2>&1 | tee -a "$LOG"

# Pack the run (no checkpoint) into parts the device tool brings back.
rm -f "$OUT/$NAME".tar.part-*
(cd "$WORK" && ls before.json 2>/dev/null || true) | tar -C "$WORK" --exclude=checkpoint -cf - tiny-base -T - |
  split -b 15M - "$OUT/$NAME.tar.part-"
say "weights: $(du -b "$WORK"/tiny-base/*/*.safetensors | awk '{s+=$1} END {printf "%.1f MiB", s/1048576}') in" \
  "$(ls "$WORK"/tiny-base/*/*.safetensors | wc -l) files; largest $(du -b "$WORK"/tiny-base/*/*.safetensors | sort -n | tail -1 | awk '{printf "%.1f MiB", $1/1048576}')"
say "done: $(ls "$OUT/$NAME".* | wc -l) files in $OUT; unpack with: cat $NAME.tar.part-* | tar -x -C DIR"
