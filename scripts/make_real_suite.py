"""Write the real-content instruction suite (server.workloads.real_suite) as JSONL and print a sample.

    python scripts/make_real_suite.py -o results/real_suite --seed 0 --sample 2

Writes ``train.jsonl`` (with ``client``), ``heldout_seen.jsonl``, ``heldout_unseen.jsonl`` and
``manifest.json``; prints every task (kind, split, pool size, source) with sample examples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from server.workloads.real_suite import RealSuiteConfig, export_jsonl, real_suite
    from server.workloads.real_tasks import TASKS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--num-clients", type=int, default=20)
    p.add_argument("--num-unseen-tasks", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=1, help="examples to print per task")
    a = p.parse_args(argv)
    suite = real_suite(RealSuiteConfig(num_clients=a.num_clients, num_unseen_tasks=a.num_unseen_tasks, seed=a.seed))
    paths = export_jsonl(suite, a.output)
    manifest = suite.manifest()
    print(f"{a.output}: {sum(len(c.examples) for c in suite.train)} training records over {len(suite.train)} "
          f"clients; {len(suite.seen_tasks())} seen tasks ({sum(len(c.examples) for c in suite.heldout_seen)} held-out "
          f"examples), {len(suite.unseen_tasks())} unseen tasks ({sum(len(c.examples) for c in suite.heldout_unseen)} "
          f"examples); sources {manifest['sources']}")
    for t in manifest["tasks"]:
        print(f"\n[{t['split']}] {t['task']} ({t['kind']}, pool {t['pool']}): {t['source']}")
        print(f"  instruction: {t['instruction']}")
        for inp, out in TASKS[t["task"]].items()[:: max(1, t["pool"] // a.sample)][: a.sample]:
            print(f"  {inp!r} -> {out!r}")
    print("\n" + " ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
