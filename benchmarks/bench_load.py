"""Paper-scale load: 1613 simulated clients, 80 sampled per round, through the embedded runtime
or through Flower's Simulation Engine (Ray).

    python benchmarks/bench_load.py                        # embedded: 1613 clients, 80 per round, 5 rounds
    python benchmarks/bench_load.py --clients 200 --per-round 20 --rounds 3   # quick look
    python benchmarks/bench_load.py --runtime flower-sim   # 1613 Ray-simulated SuperNodes, 80 per round
    python benchmarks/bench_load.py --json out.json

``--runtime flower-sim`` starts a ``flower-superlink --simulation`` on a free loopback port
(``FLWR_HOME`` in a temporary folder, no runtime dependency installation) and ``flwr run``s this
project's ServerApp/ClientApp with ``--federation-config num_supernodes=N`` and
``client_resources_num_cpus=1`` (``init_args_num_cpus`` = ``--ray-cpus``, default 2: two
ClientApp actors at a time on this 2-core box). Each virtual SuperNode is the simulated device
``partition-id`` of the embedded federation (``client-task=simulated``); the ServerApp samples
``clients-per-round`` of them each round with the embedded runtime's seeded rule. Its peak RSS
is that of the ServerApp process (``flwr-simulation``: ServerApp + the engine's driver; the
ClientApps run in Ray actor processes), and the per-round time covers sending, the sampled
nodes' training, aggregation and evaluation; ``clients_s`` there is send + train + aggregate.

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
sys.path.insert(0, str(ROOT / "benchmarks"))


def machine() -> str:
    import torch

    from server.bench.machine import cpu_model

    return (f"{cpu_model()}; {os.cpu_count()} logical CPUs; torch {torch.__version__} threads "
            f"{torch.get_num_threads()}; Python {platform.python_version()}")


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):8.3f} ({min(values):.3f}-{max(values):.3f})"


def run_embedded(args) -> dict:
    from server.runtimes.config import RunConfig
    from server.runtimes.simulate import run_simulation

    cfg = RunConfig(strategy=args.strategy, rounds=args.rounds, num_clients=args.clients,
                           clients_per_round=args.per_round, num_heldout=args.heldout, seed=args.seed,
                           local_steps=args.local_steps, batch_size=args.batch_size, threads=args.threads,
                           eval_max_new_tokens=args.eval_tokens, progress=False, client_timeout_s=None)
    t0 = time.perf_counter()
    doc = run_simulation(cfg)
    doc["bench_wall_s"] = time.perf_counter() - t0
    return doc


def run_flower_sim(args) -> dict:
    import tempfile

    from flower_local import flower

    settings = {"strategy": args.strategy, "num-server-rounds": args.rounds, "clients-per-round": args.per_round,
                "seed": args.seed, "num-heldout": args.heldout, "local-steps": args.local_steps,
                "batch-size": args.batch_size, "threads": args.threads, "eval-max-new-tokens": args.eval_tokens,
                "min-nodes": args.clients, "node-wait-s": 600.0, "round-timeout-s": 1800.0, "evaluate": True,
                "client-task": "simulated"}
    federation = {"num_supernodes": args.clients, "client_resources_num_cpus": 1, "init_args_num_cpus": args.ray_cpus}
    with tempfile.TemporaryDirectory(prefix="flexlora-flower-sim-") as tmp:
        root = Path(tmp)
        out = root / "out"
        t0 = time.perf_counter()
        with flower(root, simulation=True, threads=args.threads) as fl:
            proc = fl.run({**settings, "output-dir": str(out)}, federation=federation, timeout=args.timeout)
        wall = time.perf_counter() - t0
        results = out / "flower-results.json"
        log_tail = (root / "flwr-run.log").read_text(errors="replace")[-3000:]
        if not results.exists():
            raise RuntimeError(f"flwr run (rc {proc.returncode}) wrote no results; its log ends:\n{log_tail}")
        doc = json.loads(results.read_text())
    if doc["status"] != "ok":
        print(f"Flower run {doc['status']}: {doc.get('error')}\n{log_tail}", file=sys.stderr)
    for r in doc["rounds"]:
        r["eval_s"] = r["round_s"] - r["train_s"]
    doc["bench_wall_s"] = wall
    doc.setdefault("peak_rss_bytes", 0)
    doc["config"] = {"run_config": settings, "federation": federation}
    return doc


def _round_s(r: dict) -> float:
    return r["round_s"] if "round_s" in r else r["train_s"] + r["aggregation_s"] + r["eval_s"]


def table(doc: dict) -> str:
    lines = [f"{'round':>5} {'clients':>7} {'rejected':>8} {'agg_s':>8} {'clients_s':>9} {'eval_s':>7} {'round_s':>8}"]
    for r in doc["rounds"]:
        lines.append(f"{r['round']:>5} {r['clients']:>7} {len(r['rejected']):>8} {r['aggregation_s']:8.3f} "
                     f"{r['train_s']:9.2f} {r['eval_s']:7.2f} {_round_s(r):8.2f}")
    rest = doc["rounds"][1:] or doc["rounds"]
    if rest:
        lines.append(f"median (min-max) over rounds {rest[0]['round']}..{rest[-1]['round']}: "
                     f"aggregation {spread([r['aggregation_s'] for r in rest])} s, "
                     f"round {spread([_round_s(r) for r in rest])} s")
    who = "ServerApp process" if doc.get("runtime") == "flower" else "server + in-process clients"
    lines.append(f"rounds completed {doc['rounds_completed']}, peak RSS {doc['peak_rss_bytes'] / 2**20:.0f} MiB "
                 f"({who}), wall {doc['bench_wall_s']:.1f} s (setup included)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from server.workloads.catalog import load_workloads

    paper = load_workloads()["rounds"]["paper"]
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
    ap.add_argument("--runtime", choices=("embedded", "flower-sim"), default="embedded")
    ap.add_argument("--ray-cpus", type=int, default=2, help="flower-sim: CPUs Ray may use (1 per ClientApp actor)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="flower-sim: seconds `flwr run` may take")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"{args.runtime} runtime: {args.clients} clients, {args.per_round} per round, {args.rounds} rounds, "
          f"strategy {args.strategy}, {args.local_steps} local step(s) of batch {args.batch_size}", flush=True)
    doc = run_embedded(args) if args.runtime == "embedded" else run_flower_sim(args)
    print(table(doc))
    if args.json:
        Path(args.json).write_text(json.dumps({k: doc[k] for k in ("rounds", "rounds_completed", "peak_rss_bytes",
                                                                    "bench_wall_s", "config")}, indent=1))
    return 0 if doc["rounds_completed"] == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
