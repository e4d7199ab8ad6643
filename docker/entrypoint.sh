#!/bin/sh
# Container entrypoint: optional upload cap on this node's network interface, then the command.
#   DTRAIN_RATE   e.g. 100mbit: tc tbf on DTRAIN_IFACE egress (needs `cap_add: [NET_ADMIN]`); empty: no cap
#   DTRAIN_BURST  tbf bucket (default 64kb)
#   DTRAIN_IFACE  interface to shape (default eth0)
set -eu
if [ -n "${DTRAIN_RATE:-}" ]; then
  iface=${DTRAIN_IFACE:-eth0}
  if ! tc qdisc replace dev "$iface" root tbf rate "$DTRAIN_RATE" burst "${DTRAIN_BURST:-64kb}" latency 400ms; then
    echo "dtrain-entrypoint: cannot shape $iface to $DTRAIN_RATE (add cap_add: [NET_ADMIN])" >&2
    exit 2
  fi
  echo "dtrain-entrypoint: $iface egress capped at $DTRAIN_RATE" >&2
fi
exec "$@"
