"""Rank-sensitivity curve (issues 12 and 20): held-out loss against LoRA rank, trained centrally
(one client holding every training client's data) on the base model.

    python scripts/rank_sensitivity.py --ranks 1,2,4,8,16,32 --steps 300 --out results/experiments/rank_sensitivity.json
    python scripts/rank_sensitivity.py --model smollm2-135m --suite real --ranks 1,4,16,64 --steps 150 \
        --lr 2e-4 --batch-size 4 --threads 2 --out results/real/rank_sensitivity.json

``--suite rank`` (the tiny model's rank suite), ``real`` (the real-facts multi-task suite:
losses on the training examples, on held-out examples of seen tasks and on unseen tasks) or
``facts`` (the memorisation variant, ``real_suite.facts_suite``: ``--facts-per-task`` fixed facts of
each knowledge task in ``--facts-tasks`` trained for ``--epochs`` epochs; loss, teacher-forced token
accuracy and exact match on the trained facts, on held-out facts of the same tasks and on unseen tasks).
``--rslora`` scales by alpha/sqrt(r); ``--rank-lr 1=4e-3,8=2e-3`` sets a learning rate per rank;
``--targets q_proj,v_proj`` trains a smaller adapter (fewer parameters per rank).

    python scripts/rank_sensitivity.py --model smollm2-135m --suite facts --ranks 1,8,64 --epochs 8 \
        --lr 1e-3 --rslora --batch-size 8 --max-length 48 --out results/real/rank_facts.json

Prints machine info and, per rank, the median over ``--repeats`` seeds of the held-out
response-token loss of unseen clients (the grid's primary metric), with the base model's loss.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (rank/real suites; facts: --epochs)")
    p.add_argument("--epochs", type=int, default=8, help="facts suite: passes over the trained facts")
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
    p.add_argument("--model", default=None, help="base model (default: the shipped tiny model), e.g. smollm2-135m")
    p.add_argument("--suite", choices=("rank", "real", "facts"), default="rank")
    p.add_argument("--facts-tasks", default=None, help="facts suite: comma-separated knowledge tasks "
                   "(default: real_suite.FACTS_TASKS)")
    p.add_argument("--facts-per-task", type=int, default=24)
    p.add_argument("--facts-heldout", type=int, default=16, help="facts suite: held-out facts per task")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    p.add_argument("--rank-lr", default="", help="per-rank learning rates, e.g. 1=4e-3,8=2e-3 (others: --lr)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=None, help="comma-separated LoRA target modules (default: all 7 "
                   "projections), e.g. q_proj,v_proj: a smaller adapter per rank")
    p.add_argument("--train-eval", type=int, default=256, help="real suite: training examples scored for the fit")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from edge_client.trainer import LocalTrainer, TrainConfig
    from edge_client.wire import RankSpec
    from server.workloads.model import TARGET_MODULES, load_base
    from server.workloads.rank_suite import build_rank_suite

    torch.set_num_threads(args.threads)
    from server.bench.machine import cpu_model
    print(f"machine: {cpu_model()} cpus={os.cpu_count()} "
          f"torch={torch.__version__} threads={args.threads}", flush=True)
    rank_lr = {int(k): float(v) for k, v in (x.split("=") for x in args.rank_lr.split(",") if x.strip())}
    model, tok = load_base(args.model)
    cfg = TrainConfig(steps=None if args.suite == "facts" else args.steps, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, rslora=args.rslora,
                      max_length=args.max_length,
                      target_modules=tuple(t for t in args.targets.split(",") if t) if args.targets else tuple(TARGET_MODULES))
    scores = args.suite == "facts"     # loss, token accuracy and exact match per set
    if args.suite == "facts":
        from server.workloads.real_suite import FACTS_TASKS, FactsSuiteConfig, facts_suite
        tasks = tuple(t for t in args.facts_tasks.split(",") if t) if args.facts_tasks else FACTS_TASKS
        facts = facts_suite(FactsSuiteConfig(tasks=tasks, facts_per_task=args.facts_per_task,
                                             heldout_per_task=args.facts_heldout, num_unseen_tasks=args.num_heldout,
                                             unseen_examples=args.heldout_examples, seed=args.seed))
        train = facts.train
        sets = {"heldout_loss": facts.heldout_unseen, "seen_loss": facts.heldout_seen, "train_loss": train}
    elif args.suite == "real":
        from server.workloads.real_suite import RealSuiteConfig, real_suite
        real = real_suite(RealSuiteConfig(num_clients=args.num_clients, num_unseen_tasks=args.num_heldout,
                                          unseen_examples=args.heldout_examples, seed=args.seed))
        train = [ex for c in real.train for ex in c.examples]
        sets = {"heldout_loss": [ex for c in real.heldout_unseen for ex in c.examples],
                "seen_loss": [ex for c in real.heldout_seen for ex in c.examples],
                "train_loss": train[:: max(1, len(train) // args.train_eval)][: args.train_eval]}
    else:
        suite = build_rank_suite(num_clients=args.num_clients, num_heldout=args.num_heldout,
                                 heldout_examples=args.heldout_examples, seed=args.seed,
                                 num_families=args.num_families, examples_per_client=args.examples_per_client)
        train = [ex for c in suite.train for ex in c.examples]
        sets = {"heldout_loss": suite.heldout_examples()}

    def measure(tr) -> dict[str, float]:
        out = {}
        for k, v in sets.items():
            if scores:
                a = tr.evaluate_answers(v)
                out[k], out[k.replace("_loss", "_token_acc")], out[k.replace("_loss", "_exact")] = (
                    a["loss"], a["token_accuracy"], a["exact"])
            else:
                out[k] = tr.evaluate_loss(v)
        return out

    base_losses = measure(LocalTrainer(model, tok, config=cfg))
    base_loss = base_losses["heldout_loss"]
    print(f"train examples {len(train)}, " + ", ".join(f"{k} over {len(v)}" for k, v in sets.items())
          + "; base model " + ", ".join(f"{k} {v:.4f}" for k, v in base_losses.items()), flush=True)
    rows = []
    for r in (int(x) for x in args.ranks.split(",")):
        lr = rank_lr.get(r, args.lr)
        rcfg = dataclasses.replace(cfg, lr=lr)
        per: dict[str, list[float]] = {}
        secs = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            tr = LocalTrainer(model, tok, config=rcfg, spec=RankSpec(rank=r))
            upd = tr.train(train, seed=1000 * rep + args.seed)
            secs.append(time.perf_counter() - t0)
            for k, v in measure(tr).items():
                per.setdefault(k, []).append(v)
        rows.append({"rank": r, "lr": lr, "steps": int(upd.metrics["steps"]),
                     **{k: statistics.median(v) for k, v in per.items()},
                     "losses": per["heldout_loss"], "train_seconds": statistics.median(secs)})
        print(f"rank {r:>3} lr {lr:g}: " + ", ".join(f"{k} {rows[-1][k]:.4f}" for k in per)
              + f"  ({rows[-1]['steps']} steps, {rows[-1]['train_seconds']:.1f} s)", flush=True)
    doc = {"args": vars(args), "base_heldout_loss": base_loss, "base_losses": base_losses, "rows": rows,
           "machine": {"cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
                       "torch": torch.__version__}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
