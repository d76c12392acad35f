"""Rank-sensitivity curve on the rank suite (issue 12): held-out loss against LoRA rank,
trained centrally (one client holding every training client's data) on the base model.

    python scripts/rank_sensitivity.py --ranks 1,2,4,8,16,32 --steps 300 --out results/experiments/rank_sensitivity.json

Prints machine info and, per rank, the median over ``--repeats`` seeds of the held-out
response-token loss of unseen clients (the grid's primary metric), with the base model's loss.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4,8,16,32")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="seeds per rank (median reported)")
    p.add_argument("--num-families", type=int, default=4)
    p.add_argument("--num-clients", type=int, default=16, help="training clients pooled (as in the grid)")
    p.add_argument("--examples-per-client", type=int, default=48)
    p.add_argument("--num-heldout", type=int, default=4)
    p.add_argument("--heldout-examples", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from edge_client.trainer import LocalTrainer, TrainConfig
    from edge_client.wire import RankSpec
    from server.workloads.model import TARGET_MODULES, load_base
    from server.workloads.rank_suite import build_rank_suite

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch={torch.__version__} threads={args.threads}", flush=True)
    suite = build_rank_suite(num_clients=args.num_clients, num_heldout=args.num_heldout,
                             heldout_examples=args.heldout_examples, seed=args.seed,
                             num_families=args.num_families, examples_per_client=args.examples_per_client)
    train = [ex for c in suite.train for ex in c.examples]
    heldout = suite.heldout_examples()
    model, tok = load_base(None)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, target_modules=tuple(TARGET_MODULES))
    base_loss = LocalTrainer(model, tok, config=cfg).evaluate_loss(heldout)
    print(f"train examples {len(train)}, held-out examples {len(heldout)} "
          f"({len(suite.heldout)} unseen clients); base model held-out loss {base_loss:.4f}", flush=True)
    rows = []
    for r in (int(x) for x in args.ranks.split(",")):
        losses, secs = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            tr = LocalTrainer(model, tok, config=cfg, spec=RankSpec(rank=r))
            tr.train(train, seed=1000 * rep + args.seed)
            losses.append(tr.evaluate_loss(heldout))
            secs.append(time.perf_counter() - t0)
        rows.append({"rank": r, "heldout_loss": statistics.median(losses), "losses": losses,
                     "seconds": statistics.median(secs)})
        print(f"rank {r:>3}: held-out loss {rows[-1]['heldout_loss']:.4f}  ({rows[-1]['seconds']:.1f} s)", flush=True)
    doc = {"args": vars(args), "base_heldout_loss": base_loss, "rows": rows,
           "machine": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
