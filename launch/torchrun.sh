#!/usr/bin/env bash
# torchrun instead of `accelerate launch`: N ranks per node, each running the mtu CLI (or a .py script).
# mtu reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) through Accelerate
# and checks the world size; on CPU the ranks use gloo (torchrun really starts N processes).
#
#   launch/torchrun.sh 4 unlearn --method iamu --request requests/full.yaml --from runs/synth-indoor/original
#   launch/torchrun.sh 2 bench/signal_engines.py ...                 # a .py first argument: run that script
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 8 train   # multi-node: the same line on every node
#
# The line it runs (one node):  torchrun --standalone --nproc_per_node N -m mtu_dist.cli ARGS
# TORCHRUN selects the binary (default: torchrun on PATH, e.g. .venv/bin/torchrun).
set -euo pipefail
torchrun_bin=${TORCHRUN:-torchrun}
if ! command -v "$torchrun_bin" >/dev/null; then
  echo "launch/torchrun.sh: '$torchrun_bin' not found on PATH: activate the project's venv (. .venv/bin/activate)" \
       "or set TORCHRUN=/path/to/torchrun" >&2
  exit 127
fi
nproc=${1:?usage: launch/torchrun.sh NPROC_PER_NODE (MTU_ARGS... | SCRIPT.py ARGS...)}
shift
if [[ "${1:-}" == *.py ]]; then program=("$@"); else program=(-m mtu_dist.cli "$@"); fi
if [[ "${NNODES:-1}" -gt 1 ]]; then
  rendezvous=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
              --master_port "${MASTER_PORT:-29500}")
else
  rendezvous=(--standalone)  # a local rendezvous on a free port
fi
exec "$torchrun_bin" "${rendezvous[@]}" --nproc_per_node "$nproc" "${program[@]}"
