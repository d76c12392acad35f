"""Can the real suite teach unseen tasks at all? Central training on every seen task's data, then
greedy generation on the unseen tasks before and after (issue 20, item 6).

One LoRA adapter (rank ``--rank``, every projection unless ``--targets``) is trained for
``--steps`` optimizer steps on the pooled training examples of ``real_suite`` (the same clients a
federation would hold, pooled), then the held-out unseen tasks are scored per task: Rouge-L and
exact match of the first generated line (as the federation's evaluator) and the teacher-forced
loss. This is the upper bound a federation of the same data and budget can aim at; run it before
looking for a federated recipe with a Rouge-L gain on unseen tasks.

    python scripts/unseen_probe.py --model smollm2-135m --seed 0 --steps 80 --lr 1e-3 \\
        --out results/real/unseen_probe_s0.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--unseen-tasks", type=int, default=6)
    ap.add_argument("--unseen", default="", help="comma-separated task names to hold out (instead of the seed's draw)")
    ap.add_argument("--unseen-examples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--targets", default="auto", help="comma-separated module names, or auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from edge_client.models import resolve_model
    from edge_client.trainer import LocalTrainer, TrainConfig
    from edge_client.wire.messages import RankSpec
    from server.workloads.evaluate import score
    from server.workloads.real_suite import RealSuiteConfig, real_suite

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    unseen = tuple(t.strip() for t in args.unseen.split(",") if t.strip())
    suite = real_suite(RealSuiteConfig(num_clients=args.clients, num_unseen_tasks=len(unseen) or args.unseen_tasks,
                                       unseen=unseen,
                                       unseen_examples=args.unseen_examples, seed=args.seed))
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                      target_modules=targets)
    trainer = LocalTrainer.from_pretrained(resolve_model(args.model), config=cfg, spec=RankSpec(rank=args.rank))
    held = [ex for c in suite.heldout_unseen for ex in c.examples]

    def evaluate(tag: str) -> dict:
        preds = [p.split("\n")[0].strip() for p in trainer.generate(held, max_new_tokens=args.max_new_tokens)]
        by_task = collections.defaultdict(list)
        for ex, p in zip(held, preds):
            by_task[ex["category"]].append((ex, p))
        tasks = {}
        for task, pairs in sorted(by_task.items()):
            sc = score([p for _, p in pairs], [ex["output"] for ex, _ in pairs])
            tasks[task] = {**sc, "samples": [[ex["input"], ex["output"], p] for ex, p in pairs[:2]]}
            print(f"{tag:6s} {task:18s} rougeL {sc['rougeL']:.3f} exact {sc['exact_match']:.3f}  "
                  + "; ".join(f"{ex['input'][:15]!r} -> {p[:25]!r} (ref {ex['output'][:20]!r})"
                              for ex, p in pairs[:2]), flush=True)
        overall = {**score(preds, [ex["output"] for ex in held]), "loss": trainer.evaluate_loss(held)}
        print(f"{tag:6s} {'all unseen':18s} rougeL {overall['rougeL']:.3f} exact {overall['exact_match']:.3f} "
              f"loss {overall['loss']:.3f}", flush=True)
        return {"overall": overall, "tasks": tasks}

    base = evaluate("base")
    update = trainer.train([ex for c in suite.train for ex in c.examples], round=0)
    print(f"trained {args.steps} steps: {update.metrics}", flush=True)
    after = evaluate("after")
    doc = {"args": vars(args) | {"out": str(args.out) if args.out else None}, "unseen": suite.unseen_tasks(),
           "base": base, "after": after, "train": update.metrics, "wall_s": time.perf_counter() - t0}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
