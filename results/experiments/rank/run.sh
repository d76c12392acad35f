#!/bin/sh
# The rank-suite grid of issue 12 (84 cells; ~41 min wall as 2 shards on the shared 2-core CPU),
# its report, and the central rank-sensitivity curve. Run from the repository root.
set -e
for k in 0 1; do
  OMP_NUM_THREADS=1 python -m server.runtimes.experiments run --config results/experiments/rank_grid.json \
      --out results/experiments/rank --shard $k/2 --no-report --no-progress &
done
wait
python scripts/rank_grid_report.py results/experiments/rank
OMP_NUM_THREADS=1 python scripts/rank_sensitivity.py --ranks 1,2,4,8,16,32 --steps 200 \
    --out results/experiments/rank/rank_sensitivity.json
python scripts/official_convention_check.py
