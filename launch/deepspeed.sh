#!/usr/bin/env bash
# The DeepSpeed launcher with dtrain's DeepSpeed engine (train.engine=deepspeed is set here).
# usage: [NUM_GPUS=K] [HOSTFILE=F NUM_NODES=N MASTER_ADDR=A] [MASTER_PORT=P] \
#          launch/deepspeed.sh CONFIG [dtrain train args...]
# environment:
#   NUM_GPUS     processes per node (--num_gpus; on a CPU machine: CPU processes), default 2
#   HOSTFILE     multi-node: a DeepSpeed hostfile (see launch/hostfile.example); the launcher starts every
#                node over ssh/pdsh from this one (passwordless ssh needed) and NUM_NODES picks how many
#   MASTER_ADDR  multi-node: address of the first node in the hostfile
#   MASTER_PORT  default: a free local port (single node) or 29500 (multi-node)
# e.g.:  launch/deepspeed.sh configs/quickstart.yaml --set comm.strategy=dad run.dir=runs/ds-dad
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || usage
CONFIG=$1
shift
PY=$(find_tool python)
# no GPU: the launcher and the workers must use DeepSpeed's CPU accelerator (gloo)
if [ -z "${DS_ACCELERATOR:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export DS_ACCELERATOR=cpu
fi
args=(--num_gpus "${NUM_GPUS:-2}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
         --master_port "${MASTER_PORT:-29500}")
else
  args+=(--master_port "${MASTER_PORT:-$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}")
fi
# --module: each worker runs `python -m dtrain --local_rank=N train ...` (the CLI accepts --local_rank anywhere)
exec "$(find_tool deepspeed)" "${args[@]}" --module dtrain train --config "$CONFIG" --set train.engine=deepspeed "$@"
