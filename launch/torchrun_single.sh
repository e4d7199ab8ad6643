#!/usr/bin/env bash
# One machine, NPROC processes: torchrun --standalone (its own rendezvous on a free local port).
# usage: launch/torchrun_single.sh NPROC CONFIG [dtrain train args...]
# e.g.:  launch/torchrun_single.sh 2 configs/quickstart.yaml --set comm.strategy=rankdad run.dir=runs/rankdad
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 2 ] || usage
NPROC=$1 CONFIG=$2
shift 2
exec "$(find_tool torchrun)" --standalone --nproc-per-node "$NPROC" -m dtrain train --config "$CONFIG" "$@"
