"""Paper-scale load: 1613 simulated clients, 80 sampled per round, through the embedded runtime.

    python benchmarks/bench_load.py                        # 1613 clients, 80 per round, 5 rounds
    python benchmarks/bench_load.py --clients 200 --per-round 20 --rounds 3   # quick look
    python benchmarks/bench_load.py --json out.json

The federation is the paper's shape (workloads.json ``rounds.paper``: 1613 clients, 5% = 80
per round) on the shipped tiny model with cheap local training (1 step, batch 2 by default),
so the figures measure the server side and the runtime's per-round overhead, not training.
Printed per round: clients aggregated, rejected replies, time in server aggregation (the
strategy's ``add`` + ``finalize``), client time (local training + wire encode/decode, run in
this process), evaluation time and the whole round's wall time; then the median and spread
(min-max) over rounds 2.. (round 1 is the warm-up: first native calls, first adapter) and the
process's peak RSS. In the embedded runtime the clients train inside the server's process,
so the peak RSS is an upper bound on what the server alone needs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} threads "
            f"{torch.get_num_threads()}; Python {platform.python_version()}")


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):8.3f} ({min(values):.3f}-{max(values):.3f})"


def run_embedded(args) -> dict:
    from server.simulation.runtime import SimulationConfig, run_simulation

    cfg = SimulationConfig(strategy=args.strategy, rounds=args.rounds, num_clients=args.clients,
                           clients_per_round=args.per_round, num_heldout=args.heldout, seed=args.seed,
                           local_steps=args.local_steps, batch_size=args.batch_size, threads=args.threads,
                           eval_max_new_tokens=args.eval_tokens, progress=False, client_timeout_s=None)
    t0 = time.perf_counter()
    doc = run_simulation(cfg)
    doc["bench_wall_s"] = time.perf_counter() - t0
    return doc


def table(doc: dict) -> str:
    lines = [f"{'round':>5} {'clients':>7} {'rejected':>8} {'agg_s':>8} {'clients_s':>9} {'eval_s':>7} {'round_s':>8}"]
    for r in doc["rounds"]:
        round_s = r["train_s"] + r["aggregation_s"] + r["eval_s"]
        lines.append(f"{r['round']:>5} {r['clients']:>7} {len(r['rejected']):>8} {r['aggregation_s']:8.3f} "
                     f"{r['train_s']:9.2f} {r['eval_s']:7.2f} {round_s:8.2f}")
    rest = doc["rounds"][1:] or doc["rounds"]
    lines.append(f"median (min-max) over rounds {rest[0]['round']}..{rest[-1]['round']}: "
                 f"aggregation {spread([r['aggregation_s'] for r in rest])} s, "
                 f"round {spread([r['train_s'] + r['aggregation_s'] + r['eval_s'] for r in rest])} s")
    lines.append(f"rounds completed {doc['rounds_completed']}, peak RSS {doc['peak_rss_bytes'] / 2**20:.0f} MiB, "
                 f"wall {doc['bench_wall_s']:.1f} s (setup included)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paper = json.loads((ROOT / "benchmarks" / "workloads.json").read_text())["rounds"]["paper"]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=paper["clients_total"])
    ap.add_argument("--per-round", type=int, default=paper["clients_per_round"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--strategy", default="flexlora")
    ap.add_argument("--heldout", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results document here")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"embedded runtime: {args.clients} clients, {args.per_round} per round, {args.rounds} rounds, "
          f"strategy {args.strategy}, {args.local_steps} local step(s) of batch {args.batch_size}", flush=True)
    doc = run_embedded(args)
    print(table(doc))
    if args.json:
        Path(args.json).write_text(json.dumps({k: doc[k] for k in ("rounds", "rounds_completed", "peak_rss_bytes",
                                                                    "bench_wall_s", "config")}, indent=1))
    return 0 if doc["rounds_completed"] == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
