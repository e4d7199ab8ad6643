#!/usr/bin/env bash
# Several machines: run this on every node (same CONFIG and arguments everywhere).
# usage: NNODES=N NODE_RANK=R MASTER_ADDR=ADDR launch/torchrun_multinode.sh CONFIG [dtrain train args...]
# environment:
#   NNODES, NODE_RANK   number of nodes, and this node's index (0 = the node at MASTER_ADDR); NNODES=MIN:MAX
#                       (c10d) makes the job elastic: it re-forms with the nodes that are left when one is lost,
#                       and takes in a node that joins, resuming from the last checkpoint (docs/reliability.md)
#   MAX_RESTARTS        restarts of the workers after a failure (torchrun --max-restarts, default 0; a node
#                       joining or leaving an elastic job re-forms it without using one)
#   MASTER_ADDR         address of node 0, reachable from every node
#   MODE                c10d (default): c10d rendezvous hosted by node 0's agent, nodes may start in any order
#                       static: fixed --node-rank/--master-addr/--master-port, no rendezvous
#   PORT                rendezvous port (c10d, default 29400) or master port (static, default 29500)
#   NPROC               processes per node (default 1)
#   JOB_ID              c10d rendezvous id, the same on every node (default dtrain)
#   RDZV_CONF           more c10d rendezvous settings, e.g. last_call_timeout=5,join_timeout=120 (seconds)
#   LOCAL_ADDR          this node's address as the others see it; needed when the hostname does not
#                       resolve to it (it becomes the workers' MASTER_ADDR)
#   IFACE               network interface for gloo (sets GLOO_SOCKET_IFNAME), e.g. eth0
# e.g. two nodes, on node 0 and node 1 (R = 0, 1):
#   NNODES=2 NODE_RANK=R MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh configs/quickstart.yaml \
#     --set comm.strategy=rankdad run.dir=/shared/runs/rankdad
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] && [ -n "${NNODES:-}" ] && [ -n "${NODE_RANK:-}" ] && [ -n "${MASTER_ADDR:-}" ] || usage
CONFIG=$1
shift
MODE=${MODE:-c10d}
if [ -n "${IFACE:-}" ]; then export GLOO_SOCKET_IFNAME=$IFACE; fi
# A fresh store for every round of the rendezvous. torchrun's shared store outlives the workers, and dtrain can
# keep one round's keys apart from the next only by the restart count, which a node leaving or joining an elastic
# job does not advance (and a joining node starts at 0): the new round would read the old round's addresses.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
args=(--nnodes "$NNODES" --nproc-per-node "${NPROC:-1}" --max-restarts "${MAX_RESTARTS:-0}")
case "$MODE" in
  c10d)
    # is_host explicitly: torchrun's own test (is MASTER_ADDR one of my names?) fails behind NAT, in
    # namespaces and containers, and then no node hosts the rendezvous store.
    args+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${PORT:-29400}" --rdzv-id "${JOB_ID:-dtrain}"
           --rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)${RDZV_CONF:+,$RDZV_CONF}")
    ;;
  static)
    args+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${PORT:-29500}") ;;
  *) echo "launch: MODE=$MODE: expected c10d or static" >&2; exit 2 ;;
esac
if [ -n "${LOCAL_ADDR:-}" ]; then args+=(--local-addr "$LOCAL_ADDR"); fi
exec "$(find_tool torchrun)" "${args[@]}" -m dtrain train --config "$CONFIG" "$@"
