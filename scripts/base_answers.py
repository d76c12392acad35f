"""What the base model answers on every task of the real suite, before any training (issue 20, item 6).

Four examples per task (drawn with ``random.Random(--seed)``), greedy first lines scored as the
federation's evaluator scores them (Rouge-L with non-ASCII characters as tokens, exact match).
It tells which unseen tasks a federation of the other tasks can improve on: a task the base model
answers verbosely but knowingly (e.g. ``unicode_script``: "The letter ... is a Cyrillic letter")
can gain from learning the suite's short-answer style; a look-up it cannot answer (``http_reason``,
``unicode_char``) cannot.

    python scripts/base_answers.py --model smollm2-135m > results/real/base_answers.txt
"""

from __future__ import annotations

import argparse
import random


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_client.models import resolve_model
    from server.workloads.evaluate import generate, score
    from server.workloads.real_tasks import TASKS

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    rng = random.Random(args.seed)
    examples = [{"instruction": t.instruction, "input": a, "output": b, "category": name}
                for name, t in TASKS.items() for a, b in rng.sample(t.items(), args.examples)]
    preds = generate(model, tok, examples, max_new_tokens=args.max_new_tokens)
    print(f"base model {args.model}: {args.examples} examples a task (seed {args.seed}), greedy first line")
    print(f"{'task':18s} {'kind':14s} {'rougeL':>6s} {'exact':>5s}  reference -> answer (first 3)")
    for name, task in TASKS.items():
        idx = [i for i, ex in enumerate(examples) if ex["category"] == name]
        s = score([preds[i] for i in idx], [examples[i]["output"] for i in idx])
        shown = " || ".join(f"{examples[i]['output']!r} -> {preds[i]!r}" for i in idx[:3])
        print(f"{name:18s} {task.kind:14s} {s['rougeL']:6.2f} {s['exact_match']:5.2f}  {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
