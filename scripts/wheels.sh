# Sourced by the GPU scripts (scripts/pretrain_gpu.sh, benchmarks/gpu.sh), after they set REPO, PYTHON,
# LOG and `say`. The GPU machine has PyTorch but not diffusers: the wheels carried in WHEELS go into
# WORK/site, first on PYTHONPATH (the repository's src/ after them), without touching the system.
use_wheels() {  # use_wheels WHEELS WORK (WHEELS empty: the installed packages, silently)
  if [ -n "$1" ] && compgen -G "$1/*.whl" >/dev/null; then
    say "installing $(ls "$1"/*.whl | wc -l) wheels from $1"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2/site" \
      "$1"/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="$2/site${PYTHONPATH:+:$PYTHONPATH}"
  elif [ -n "$1" ]; then
    say "no wheels in $1: using the installed packages"
  fi
  export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}
