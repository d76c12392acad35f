"""Aggregation past one machine, planned and checked (issue 22): how a round's modules spread over
Ray workers (``server.core.sharded``), each worker's end-of-round state, and the bytes moved.

    python benchmarks/plan_sharded.py --plan llama-2-70b --clients 80 --rank 200 --workers 4 8 16
    python benchmarks/plan_sharded.py --measure --workers 2 3 --layers 2 --clients 8   # scaled-down check

``--plan`` projects with the aggregator's own assignment rule (``plan_shards``) and state model
(``linalg.route_state_bytes``, the ``auto`` route: factors up to the break-even rank, then one
dense float32 accumulator per module). ``--measure`` runs the same rule on a local Ray cluster
(``ShardedAggregator``, one actor per worker) at a scale this machine holds, and prints the
projection beside what each worker reports (aggregator state bytes, resident memory), the time
per client and of finalize, and whether the result equals the one-process aggregator's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.bench.machine import cpu_model  # noqa: E402
from server.core.sharded import plan_shards  # noqa: E402
from server.workloads.catalog import load_workloads  # noqa: E402

# Llama 2 70B (Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models", 2023, and its
# published config): hidden 8192, FFN 28672, 80 layers, grouped-query attention with 8 KV heads
# of 128 (k/v projections 8192 -> 1024). Not in workloads.json, which holds the paper's models.
LLAMA_70B = {"hidden": 8192, "ffn": 28672, "layers": 80, "kv_dim": 1024}
GIB = 2**30


def module_shapes(model: dict, layers: int | None = None) -> dict[str, tuple[int, int]]:
    h, f, kv = model["hidden"], model["ffn"], model["kv_dim"]
    per_layer = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                 "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    n = model["layers"] if layers is None else layers
    return {f"layers.{i:02d}.{m}": s for i in range(n) for m, s in per_layer.items()}


def plan(args) -> list[dict]:
    model = LLAMA_70B if args.plan == "llama-2-70b" else load_workloads()["models"][args.plan]
    shapes = module_shapes(model)
    total_rank = args.clients * args.rank
    rows = []
    one = plan_shards(shapes, 1, total_rank=total_rank, rank=args.rank)["shards"][0]
    print(f"{args.plan}: {len(shapes)} modules; {args.clients} clients at rank {args.rank} (R = {total_rank}); "
          f"one process holds {one['state_bytes'] / GIB:.1f} GiB at the end of the round")
    print(f"{'workers':>7} {'max GiB/worker':>14} {'min GiB/worker':>14} {'modules/worker':>14} "
          f"{'in GiB/worker/round':>19} {'in GiB total':>12} {'out GiB total':>13}")
    for w in args.workers:
        p = plan_shards(shapes, w, total_rank=total_rank, rank=args.rank)["shards"]
        state = [s["state_bytes"] for s in p]
        inbound = [s["in_bytes_per_client"] * args.clients for s in p]
        row = {"workers": w, "max_state_gib": max(state) / GIB, "min_state_gib": min(state) / GIB,
               "modules": [s["modules"] for s in p], "max_in_gib": max(inbound) / GIB,
               "in_total_gib": sum(inbound) / GIB, "out_total_gib": sum(s["out_bytes"] for s in p) / GIB}
        rows.append(row)
        print(f"{w:>7} {row['max_state_gib']:>14.1f} {row['min_state_gib']:>14.1f} "
              f"{min(row['modules']):>6}-{max(row['modules']):<7} {row['max_in_gib']:>19.1f} "
              f"{row['in_total_gib']:>12.1f} {row['out_total_gib']:>13.1f}")
    return rows


def measure(args) -> list[dict]:
    import ray

    from server.core.aggregation import Aggregator
    from server.core.sharded import ShardedAggregator

    model = load_workloads()["models"][args.model]
    shapes = module_shapes(model, args.layers)
    rng = np.random.default_rng(0)
    ranks = [args.rank if k % 2 else max(1, args.rank // 4) for k in range(args.clients)]
    clients = []
    for k, r in enumerate(ranks):
        f = {}
        for m, (d_out, d_in) in shapes.items():
            f[f"{m}.lora_B.weight"] = (rng.standard_normal((d_out, r)) * 0.01).astype(np.float32)
            f[f"{m}.lora_A.weight"] = rng.standard_normal((r, d_in)).astype(np.float32)
        clients.append((f, 100 + k, r))
    ray.init(num_cpus=max(args.workers) + 1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    t0 = time.perf_counter()
    one = Aggregator(args.max_rank, threads=1, seed=0)
    for f, n, r in clients:
        one.add(f, num_examples=n, alpha=16.0, rank=r)
    ref = one.finalize()
    t_one = time.perf_counter() - t0
    rows = []
    for w in args.workers:
        proj = plan_shards(shapes, w, total_rank=sum(ranks), rank=args.rank)["shards"]
        with ShardedAggregator(args.max_rank, shards=w, threads=1, seed=0) as agg:
            t0 = time.perf_counter()
            for f, n, r in clients:
                agg.add(f, num_examples=n, alpha=16.0, rank=r)
            t_add = time.perf_counter() - t0
            info = agg.shard_info()
            t0 = time.perf_counter()
            got = agg.finalize()
            t_fin = time.perf_counter() - t0
        same = all(np.array_equal(x, y) for m in ref.modules for x, y in zip(ref.modules[m], got.modules[m]))
        row = {"workers": w, "add_s_per_client": t_add / len(clients), "finalize_s": t_fin, "one_process_s": t_one,
               "identical": same,
               "per_worker": [{"shard": i["shard"], "modules": i["modules"], "state_bytes": i["state_bytes"],
                               "projected_state_bytes": proj[i["shard"]]["state_bytes"],
                               "rss_bytes": i["rss_bytes"]} for i in info]}
        rows.append(row)
        print(f"workers {w}: identical to one process: {same}; add {row['add_s_per_client'] * 1e3:.0f} ms/client, "
              f"finalize {t_fin:.2f} s (one process, add + finalize: {t_one:.2f} s)")
        for p in row["per_worker"]:
            ratio = p["state_bytes"] / max(1, p["projected_state_bytes"])
            print(f"  shard {p['shard']}: {p['modules']} modules, state {p['state_bytes'] / 2**20:.1f} MiB "
                  f"(projected {p['projected_state_bytes'] / 2**20:.1f} MiB, x{ratio:.3f}), "
                  f"RSS {p['rss_bytes'] / 2**20:.0f} MiB")
    ray.shutdown()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default=None, help="project a round of this model: llama-2-70b or a workloads.json model")
    p.add_argument("--measure", action="store_true", help="run the scaled-down check on a local Ray cluster")
    p.add_argument("--model", default="llama-1.3b", help="--measure: workloads.json model (default %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="--measure: layers of it (default %(default)s)")
    p.add_argument("--clients", type=int, default=80)
    p.add_argument("--rank", type=int, default=200)
    p.add_argument("--max-rank", type=int, default=200, help="--measure: the global adapter's rank")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if not args.plan and not args.measure:
        p.error("give --plan MODEL and/or --measure")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
    out = {"cpu": cpu_model(), "args": vars(args)}
    if args.plan:
        out["plan"] = plan(args)
    if args.measure:
        out["measure"] = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
