#!/usr/bin/env bash
# Reproduces this folder: the full grid (5 arms x 4 rank distributions x 3 seeds = 60 cells)
# as two processes sharing the grid (one per core, one torch thread each), then the report.
# Finished cells in cells/ are reused, so the script resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/experiments
ARGS=(--out "$OUT" --clients 8 --rounds 5 --local-steps 7 --heldout-examples 64)
start=$(date +%s)
OMP_NUM_THREADS=1 python -m server.runtimes.experiments run "${ARGS[@]}" --shard 0/2 --no-report &
OMP_NUM_THREADS=1 python -m server.runtimes.experiments run "${ARGS[@]}" --shard 1/2 --no-report &
wait
python -m server.runtimes.experiments report --out "$OUT" \
  --record-command "results/experiments/run.sh  (= flexlora experiment run ${ARGS[*]} --shard K/2, K=0,1; then flexlora experiment report --out $OUT)" \
  --record-wall-s "$(( $(date +%s) - start ))"
