#!/usr/bin/env bash
# The main job: the quickstart config on 2 local processes, once with fp32 all-reduce and once with
# rank-dAD, then the bandwidth-vs-accuracy report. Everything lands in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
OUT=runs/quickstart
export DS_ACCELERATOR=cpu
for strategy in allreduce rankdad; do
  echo "== training: 2 processes, comm.strategy=$strategy"
  "$BIN/torchrun" --standalone --nproc-per-node 2 -m dtrain train --config configs/quickstart.yaml \
    --set comm.strategy=$strategy run.dir=$OUT/$strategy
done
echo "== report"
"$BIN/dtrain" report $OUT/allreduce $OUT/rankdad --out $OUT/report
echo "== done: run directories in $OUT/, report in $OUT/report/report.md"
