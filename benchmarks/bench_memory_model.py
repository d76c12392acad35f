"""Memory model vs reality: predicted peak memory (edge_client.memory.estimate) against the measured peak
RSS of real LoRA training steps (edge_client.trainer.LocalTrainer), each point in a fresh subprocess.

Then the policy check: with a simulated budget equal to the measured need of rank r, choose_rank must
pick r or the next lower allowed rank, never above.

    python benchmarks/bench_memory_model.py            # 3 models x 3 ranks x 2 seq lens
    python benchmarks/bench_memory_model.py --quick    # 1 model, for a smoke run
    python benchmarks/bench_memory_model.py --models smollm2-135m --ranks 8,64,200 --modes float32,bfloat16
                                                       # a registered real model (edge_client.models)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LLaMA-shaped (ffn = 2.6875 x hidden). The vocabulary is kept small so that, as in real LLaMA models,
# the transformer layers (where LoRA lives) dominate the weights and the rank visibly changes the need.
MODELS = {
    "llama-h512-l8": dict(hidden=512, layers=8, heads=8, ffn=1376),
    "llama-h768-l8": dict(hidden=768, layers=8, heads=12, ffn=2064),
    "llama-h1024-l8": dict(hidden=1024, layers=8, heads=16, ffn=2752),
}
VOCAB = 4096
BATCH = 2


def _config(name):
    if name not in MODELS:   # a registered real model (or a local folder)
        from edge_client.models import load_config
        return load_config(name)
    from edge_client.testing import tiny_llama_config
    m = MODELS[name]
    return tiny_llama_config(vocab_size=VOCAB, hidden=m["hidden"], layers=m["layers"], heads=m["heads"],
                             ffn=m["ffn"], max_positions=2048)


def child(args) -> None:
    """Train `steps` real steps at exactly seq_len tokens per example; print peak RSS as JSON."""
    import resource

    import torch
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from edge_client.testing import synthetic_records, tiny_llama_config, train_tokenizer  # noqa: F401
    from edge_client.trainer import LocalTrainer, TrainConfig

    torch.manual_seed(0)
    if args.model in MODELS:
        tok = train_tokenizer()
        model = AutoModelForCausalLM.from_config(_config(args.model), dtype=getattr(torch, args.dtype))
    else:
        from edge_client.trainer import load_model
        model, tok = load_model(args.model, dtype=args.dtype)
    words = "one two three four five six seven eight nine ten".split()
    long_output = " ".join(words[i % 10] for i in range(4 * args.seq_len))
    records = [{"instruction": "Count.", "input": "", "output": long_output}] * (BATCH * args.steps)
    from edge_client.wire import RankSpec

    cfg = TrainConfig(target_modules=tuple(TARGETS), batch_size=BATCH, max_length=args.seq_len,
                      steps=args.steps, lr=1e-4, gradient_checkpointing=args.gradient_checkpointing)
    trainer = LocalTrainer(model, tok, config=cfg, spec=RankSpec(rank=args.rank), base_model_id="bench")
    t = time.perf_counter()
    update = trainer.train(records)
    step_s = (time.perf_counter() - t) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "step_s": step_s, "steps": update.metrics["steps"]}))


def measure(model, rank, seq_len, steps, threads, dtype="float32", gradient_checkpointing=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--rank", str(rank),
           "--seq-len", str(seq_len), "--steps", str(steps), "--threads", str(threads), "--dtype", dtype]
    cmd += ["--gradient-checkpointing"] if gradient_checkpointing else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", default="8,64,256")
    ap.add_argument("--seq-lens", default="64,256")
    ap.add_argument("--margin", type=float, default=0.05, help="policy safety margin for the check")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float32", help="base weight dtype of a child")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--modes", default="float32", help="comma list of float32, bfloat16, float16, "
                    "float32+gc, bfloat16+gc (gc: gradient checkpointing)")
    ap.add_argument("--models", default=None, help="comma list of model names (default: all)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    import psutil
    import torch

    from edge_client.memory import estimate
    from edge_client.rank_policy import choose_rank
    from edge_client.resources import DeviceProfile
    from server.bench.machine import cpu_model

    ranks = [int(r) for r in args.ranks.split(",")]
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    models = list(MODELS)[:1] if args.quick else (args.models.split(",") if args.models else list(MODELS))
    modes = [(m.split("+")[0], m.endswith("+gc")) for m in args.modes.split(",")]
    print(f"machine: {cpu_model()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB, torch {torch.__version__}, threads {args.threads}")
    print(f"batch {BATCH}, vocab {VOCAB}, targets {','.join(TARGETS)}, AdamW, modes {args.modes}, "
          f"{args.steps} steps per point, peak = ru_maxrss of a fresh process (one run per point: "
          f"memory is deterministic, unlike time)")
    hdr = f"{'mode':>12s} {'model':>14s} {'rank':>5s} {'seq':>5s} {'predicted MiB':>14s} {'measured MiB':>13s} {'error':>7s} {'step s':>7s}"
    print(hdr)
    rows = []
    for model in models:
        cfg = _config(model)
        for dtype, gc in modes:
          for seq in seq_lens:
            for rank in ranks:
                est = estimate(cfg, TARGETS, rank, batch=BATCH, seq_len=seq, dtype=dtype, gradient_checkpointing=gc)
                m = measure(model, rank, seq, args.steps, args.threads, dtype, gc)
                err = est.total / m["peak_rss"] - 1
                mode = dtype + ("+gc" if gc else "")
                rows.append({"model": model, "rank": rank, "seq_len": seq, "mode": mode, "predicted": est.total,
                             "measured": m["peak_rss"], "error": err, "step_s": m["step_s"],
                             "breakdown": est.to_dict()})
                print(f"{mode:>12s} {model:>14s} {rank:5d} {seq:5d} {est.total / 2**20:14.0f} "
                      f"{m['peak_rss'] / 2**20:13.0f} {err:+7.1%} {m['step_s']:7.2f}", flush=True)
    errors = [abs(r["error"]) for r in rows]
    within = sum(e <= 0.20 for e in errors)
    print(f"\n{within}/{len(rows)} points within +-20%; max |error| {max(errors):.1%}, "
          f"median |error| {sorted(errors)[len(errors) // 2]:.1%}")

    print(f"\npolicy check: budget = measured peak of rank r (no reserve, {args.margin:.0%} margin)")
    ok = True
    for model in models:
        cfg = _config(model)
        for seq in seq_lens:
            for i, rank in enumerate(ranks):
                measured = next(r["measured"] for r in rows if (r["model"], r["rank"], r["seq_len"]) == (model, rank, seq))
                try:
                    pick = choose_rank(DeviceProfile.simulated(memory_bytes=int(measured)), cfg, ranks, targets=TARGETS,
                                       batch=BATCH, seq_len=seq, system_reserve_bytes=0,
                                       safety_margin=args.margin).rank
                except ValueError:
                    pick = None
                allowed = {rank, ranks[i - 1] if i else None}
                good = pick in allowed
                ok &= good
                print(f"  {model:>14s} seq {seq:4d} r={rank:4d}: picked {pick}  {'ok' if good else 'WRONG'}")
    print(f"policy check: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if ok and within == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
