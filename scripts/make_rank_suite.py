"""Write the rank suite (server.workloads.rank_suite) as client JSONL for ``flexlora experiment --data``.

    python scripts/make_rank_suite.py -o results/experiments/rank_suite.jsonl --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from server.workloads.rank_suite import RankSuiteConfig, rank_suite_records
    from server.workloads.suite import write_jsonl

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--num-families", type=int, default=4)
    p.add_argument("--clients-per-family", type=int, default=5)
    p.add_argument("--examples-per-client", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    recs = rank_suite_records(RankSuiteConfig(num_families=a.num_families, clients_per_family=a.clients_per_family,
                                              examples_per_client=a.examples_per_client, seed=a.seed))
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(a.output, recs)
    print(f"{a.output}: {len(recs)} records, {a.num_families * a.clients_per_family} clients")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
