#!/usr/bin/env bash
# The benchmark suite (bench/suite.py) on a CUDA machine with the ResNet backbone (configs/resnet_gpu.yaml):
# every figure with its absolute step times (ms) and the peak CUDA memory of its section
# (torch.cuda.max_memory_allocated). The 2-rank figures use NCCL and need 2 GPUs; with one they are
# reported as skipped. Results: bench/results/suite_gpu.json (rewritten after every section), and one line of
# JSON at the end with every figure. Refuses (exit 2) when no CUDA device is visible. On an air-gapped node,
# launch/offline/install.sh --venv DIR WHEELS --run installs from a wheel folder and then runs this.
#
#   bench/gpu.sh                              # full suite
#   bench/gpu.sh --quick                      # smoke run
#   bench/gpu.sh --set model.resnet_depth=18  # further arguments go to bench/suite.py
#   bench/gpu.sh --dry-run                    # no GPU: the same ResNet path on the CPU, tiny sizes
#                                             # (ResNet-18, 1 loader worker), to check the script itself;
#                                             # without the iamu section (its CPU step timings say
#                                             # nothing about a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=configs/resnet_gpu.yaml

if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec "$PY" bench/suite.py --device cpu --quick --config "$CONFIG" --set model.resnet_depth=18 \
    --set data.workers=1 --skip iamu --methods neggrad_plus --out bench/results/suite_gpu_dryrun.json --print-json "$@"
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: no CUDA device visible (torch.cuda.is_available() is False): run it on a CUDA machine," \
       "or use 'bench/gpu.sh --dry-run' / '.venv/bin/python bench/suite.py --device cpu' here" >&2
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" bench/suite.py --device cuda --config "$CONFIG" --out bench/results/suite_gpu.json --print-json "$@"
