#!/usr/bin/env bash
# One call on a lent GPU device: environment, demo on CUDA, `pytest -m gpu`, `bench gpu`.
#
#   OUT=/path/to/returned/folder bash benchmarks/harness/gpu_first_contact.sh    # from the repository root
#
# The device image is not our venv: no network, so neither `pip install -e .` nor ./dev can
# set up there. The code runs from the working tree through a namespace of symlinks on
# PYTHONPATH (promptmux.serving -> serving/, ...), with `python3 -m promptmux.serving.cli.main`
# in place of the `promptmux` entry point. Each step has its own timeout; together they stay
# under about 8 minutes, so run the script with a limit near 570 s. Every log lands under
# $OUT: summary.txt (one `rc=... seconds` line per step), <step>.log, bench/gpu.md.
#
# Environment: OUT (required), PYTHON (default python3), GPU_BENCH_ARGS (extra `bench gpu`
# flags, e.g. "--batch-sizes 1,64").
set -u
: "${OUT:?set OUT to the folder whose files come back from the device}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # the compiled kernels, never the interpreter (Triton 3.6's fails some tests)
PY="${PYTHON:-python3}"

NS=$(mktemp -d)
mkdir -p "$NS/promptmux" "$OUT/bench"
for d in serving kernels prompts benchmarks; do ln -sfn "$PWD/$d" "$NS/promptmux/$d"; done
export PYTHONPATH="$NS" TRITON_CACHE_DIR="$NS/triton"
PM="$PY -m promptmux.serving.cli.main"
W=hello42

# step LOG LIMIT_S CMD...: append CMD's output to $OUT/LOG.log, one summary line per step.
step() {
  local log=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "### $*" >>"$OUT/$log.log"
  timeout -k 3 "$limit" "$@" >>"$OUT/$log.log" 2>&1
  rc=$?
  echo "rc=$rc $((SECONDS - start))s $*" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c "nvidia-smi; $PY -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())'"
# Expected: 24olleh HELLO42 hello42 khoor42 ello42h 24OLLEH
step demo 60 $PM generate --device cuda --dtype bfloat16 --store "$NS/store" \
  reverse=$W upper=$W copy=$W caesar=$W rotate=$W reverse-upper=$W
# -m gpu selects only the CUDA tests; -k keeps any Triton-interpreter test out as well.
step gpu_tests 150 $PY -m pytest -p no:cacheprovider -q -rfEs -m gpu -k "not interpreter"
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of flags
step bench 240 $PM bench gpu --mode static --output "$OUT/bench" ${GPU_BENCH_ARGS:-}

tail -n 8 "$OUT"/*.log
