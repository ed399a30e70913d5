#!/usr/bin/env bash
# One call on a lent GPU device for the decode-step work: the step loop on `random:t5-xl` in bf16
# at 64 and 128 slots against TensorRT-LLM's published Flan-T5-XL figures (one H100, bf16,
# greedy, inputs of 260-440 tokens, 128 new tokens: 4,184 tok/s at 64 rows, 4,768 at 128), under
# CUDA graphs and eagerly, beside the static path (Hugging Face generate).
#
#   OUT=/path/to/returned/folder bash benchmarks/harness/gpu_decode.sh   # from the repository root
#
# Like gpu_first_contact.sh (read its header): the device image is not our venv, the code runs
# from the working tree through a namespace of symlinks, every log lands under $OUT, and the
# steps stay under about 8 minutes together (run it with a limit near 570 s). The image has no
# Ray, so the gRPC + Ray Serve host path cannot run there (carry Ray's wheel to measure it).
set -u
: "${OUT:?set OUT to the folder whose files come back from the device}"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
NS=$(mktemp -d)
mkdir -p "$NS/promptmux" "$OUT"
for d in serving kernels prompts benchmarks; do ln -sfn "$PWD/$d" "$NS/promptmux/$d"; done
export PYTHONPATH="$NS" TRITON_CACHE_DIR="$NS/triton"
PM="$PY -m promptmux.serving.cli.main"

step() {
  local log=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "### $*" >>"$OUT/$log.log"
  timeout -k 3 "$limit" "$@" >>"$OUT/$log.log" 2>&1
  rc=$?
  echo "rc=$rc $((SECONDS - start))s $*" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total --format=csv; $PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'"
# The TensorRT-LLM shape: ~350 input tokens (a 20-row soft prompt + 330 byte tokens), 128 new.
XL="--model random:t5-xl --dtype bfloat16 --prompt-length 20 --input-length 330 --new-tokens 128 --repeats 2"
step xl_graphs 180 $PM bench gpu --mode continuous $XL --batch-sizes 64,128 --output "$OUT/t5-xl-cuda-graphs"
step xl_eager 120 $PM bench gpu --mode continuous --decode-graphs none $XL --batch-sizes 64 --output "$OUT/t5-xl-eager"
step xl_static 100 $PM bench gpu --mode static $XL --batch-sizes 64 --output "$OUT/t5-xl-static"
step gpu_tests 120 $PY -m pytest -p no:cacheprovider -q -rfEs -m gpu -k "not interpreter"
tail -n 12 "$OUT"/*.log
