"""On-device greedy decoding, ms per new token: onnxruntime without cache (the whole sequence every
step), onnxruntime with a KV cache, the same int8-quantised (dynamic), and torch ``generate`` with
its cache; 32 new tokens after prompts of 16 and 200 tokens, on a tiny LLaMA of a few million
parameters, one thread everywhere. Also reports the int8 file size and logit differences:
cache decoding vs torch (max |logit| over every decoded position) and int8 vs float32.

    python benchmarks/bench_decode.py [--repeats 3] [--new 32]
    python benchmarks/bench_decode.py --model smollm2-135m --repeats 1   # a registered real model

``--quality N`` measures instead what int8 costs in quality (issue 20): a LoRA (``--quality-rank``)
is first trained centrally for ``--quality-train-steps`` steps on the real suite's pooled training
clients (0: the base model as it is) and merged; then the float32 KV-cache graph, its dynamic int8
quantisation and torch itself are scored on N held-out examples of the real suite (half from unseen
tasks, half held-out examples of seen tasks, evenly spaced): Rouge-L, exact match (greedy, first
line, ``--max-new`` tokens) and the teacher-forced response loss; ``--json`` writes the numbers.

    python benchmarks/bench_decode.py --model smollm2-135m --quality 96 --quality-train-steps 60 \
        --max-new 16 --json results/real/int8_quality.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompts", default="16,200")
    ap.add_argument("--model", default=None, help="a registered model name or folder (default: a tiny LLaMA)")
    ap.add_argument("--quality", type=int, default=0, help="score float32 vs int8 on this many held-out examples")
    ap.add_argument("--quality-train-steps", type=int, default=60)
    ap.add_argument("--quality-rank", type=int, default=8)
    ap.add_argument("--quality-lr", type=float, default=2e-3)
    ap.add_argument("--max-new", type=int, default=16, help="--quality: new tokens per answer")
    ap.add_argument("--threads", type=int, default=1, help="--quality: torch threads for the training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.quality:
        return quality(args)
    from edge_client.export import OnnxLM, export_onnx, greedy_torch, merged_model
    from edge_client.export_kv import OnnxKVLM, export_onnx_kv, greedy_torch_cache, quantize_int8, timed
    from edge_client.testing import tiny_model_and_tokenizer
    from server.bench.machine import cpu_model

    if args.model:
        from edge_client.trainer import load_model
        model, _ = load_model(args.model)
    else:
        model, _ = tiny_model_and_tokenizer(hidden=256, layers=4, heads=4)
    params = sum(p.numel() for p in model.parameters())
    tmp = tempfile.mkdtemp(prefix="bench-decode-")
    full = export_onnx(model, os.path.join(tmp, "full.onnx"))
    kv = export_onnx_kv(model, os.path.join(tmp, "kv.onnx"))
    q8 = quantize_int8(kv, os.path.join(tmp, "kv.int8.onnx"))
    ref = merged_model(model)
    ref.config.use_cache = True
    lm_full, lm_kv, lm_q8 = OnnxLM(full, threads=1), OnnxKVLM(kv, threads=1), OnnxKVLM(q8, threads=1)
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs visible, 1 thread (torch and "
          f"onnxruntime), {args.model or 'tiny LLaMA h256 l4'}, {params / 1e6:.2f} M parameters, {args.new} new tokens, greedy, "
          f"median of {args.repeats} (spread)")
    print(f"# sizes: float32 {os.path.getsize(kv) / 2**20:.1f} MiB, int8 {os.path.getsize(q8) / 2**20:.1f} MiB")
    rng = np.random.default_rng(0)
    print("| prompt | ort no cache | ort KV cache | ort KV int8 | torch generate (cache) | same tokens kv/int8 |")
    print("|---|---|---|---|---|---|")
    for plen in (int(p) for p in args.prompts.split(",")):
        prompt = [1] + rng.integers(3, model.config.vocab_size, plen - 1).tolist()
        cells, outs = [], {}
        for name, fn, obj in (("full", lm_full.greedy, lm_full), ("kv", lm_kv.greedy, lm_kv),
                              ("q8", lm_q8.greedy, lm_q8), ("torch", greedy_torch_cache, ref)):
            call = (lambda p, n, f=fn: f(p, n)) if name != "torch" else (lambda p, n: greedy_torch_cache(ref, p, n))
            med, spread, _ = timed(call, prompt, args.new, repeats=args.repeats)
            outs[name] = call(prompt, args.new)
            cells.append(f"{med * 1e3:.2f} ({spread * 1e3:.2f})")
        same = f"{outs['kv'] == outs['torch']}/{outs['q8'] == outs['torch']}"
        print(f"| {plen} | " + " | ".join(cells) + f" | {same} |", flush=True)
        # logits of every decoded position: cache decoding vs one full torch forward over the same tokens
        seq = prompt + outs["kv"]
        with torch.no_grad():
            full_logits = ref(input_ids=torch.tensor([seq]), use_cache=False).logits[0].numpy()
        logits, past = lm_kv.step(np.array([prompt]), lm_kv._empty_past(1), len(prompt))
        worst = float(np.abs(logits[0] - full_logits[: len(prompt)]).max())
        q_logits, _ = lm_q8.step(np.array([prompt]), lm_q8._empty_past(1), len(prompt))
        q_worst = float(np.abs(q_logits[0] - logits[0]).max())
        for k, tok in enumerate(outs["kv"][:-1]):
            logits, past = lm_kv.step(np.array([[tok]]), past, len(prompt) + k + 1)
            worst = max(worst, float(np.abs(logits[0, -1] - full_logits[len(prompt) + k]).max()))
        print(f"# prompt {plen}: max |logit| KV-cache decode vs torch {worst:.1e}; int8 vs float32 (prompt) "
              f"{q_worst:.2e} (logit scale {float(np.abs(full_logits).max()):.2f})")
    _ = greedy_torch
    return 0


def _spaced(items: list, k: int) -> list:
    """``k`` items evenly spaced over ``items`` (all of them when there are fewer)."""
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def quality(args) -> int:
    """float32 vs int8 (and torch) on held-out examples of the real suite; see the module docstring."""
    import time

    import torch

    from edge_client.export import merged_model
    from edge_client.export_kv import OnnxKVLM, export_onnx_kv, quantize_int8
    from edge_client.trainer import LocalTrainer, TrainConfig
    from edge_client.wire import RankSpec
    from server.bench.machine import cpu_model
    from server.workloads.evaluate import generate, heldout_loss, onnx_evaluate, score
    from server.workloads.real_suite import RealSuiteConfig, real_suite

    torch.set_num_threads(args.threads)
    if args.model:
        from edge_client.trainer import load_model
        model, tok = load_model(args.model)
    else:
        from edge_client.testing import tiny_model_and_tokenizer
        model, tok = tiny_model_and_tokenizer(hidden=64, layers=2, heads=4)
    real = real_suite(RealSuiteConfig(seed=args.seed))
    n_unseen = args.quality // 2
    sets = {"unseen": _spaced([r for c in real.heldout_unseen for r in c.examples], n_unseen),
            "seen": _spaced([r for c in real.heldout_seen for r in c.examples], args.quality - n_unseen)}
    examples = sets["unseen"] + sets["seen"]
    t0 = time.perf_counter()
    if args.quality_train_steps:
        tr = LocalTrainer(model, tok, config=TrainConfig(steps=args.quality_train_steps, batch_size=8,
                                                         lr=args.quality_lr, max_length=64),
                          spec=RankSpec(rank=args.quality_rank))
        tr.train([r for c in real.train for r in c.examples], seed=args.seed)
        with tr.current() as peft_model:
            model = merged_model(peft_model)
    model = merged_model(model)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-quality-")
    kv = export_onnx_kv(model, os.path.join(tmp, "kv.onnx"))
    q8 = quantize_int8(kv, os.path.join(tmp, "kv.int8.onnx"))
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs visible; {args.model or 'tiny LLaMA'}; "
          f"{'LoRA rank %d, %d steps (lr %g, batch 8) on the real suite, %.0f s' % (args.quality_rank, args.quality_train_steps, args.quality_lr, train_s) if args.quality_train_steps else 'base model'}; "
          f"{len(sets['unseen'])} unseen-task + {len(sets['seen'])} seen-task held-out examples; greedy, "
          f"{args.max_new} new tokens; 1 thread; sizes float32 {os.path.getsize(kv) / 2**20:.1f} MiB, "
          f"int8 {os.path.getsize(q8) / 2**20:.1f} MiB", flush=True)
    refs = [ex["output"] for ex in examples]
    results: dict[str, dict] = {}
    t = time.perf_counter()
    preds = generate(model, tok, examples, max_new_tokens=args.max_new)
    results["torch float32"] = {**score(preds, refs), "heldout_loss": heldout_loss(model, tok, examples),
                                "predictions": preds, "seconds": time.perf_counter() - t}
    for name, path in (("onnx float32 (KV cache)", kv), ("onnx int8 (dynamic, KV cache)", q8)):
        t = time.perf_counter()
        results[name] = {**onnx_evaluate(OnnxKVLM(path, threads=1), tok, examples, max_new_tokens=args.max_new),
                         "seconds": time.perf_counter() - t}
    base = results["onnx float32 (KV cache)"]["predictions"]
    print("| graph | Rouge-L all | exact all | loss all | Rouge-L unseen | Rouge-L seen | same answer as float32 "
          "ONNX | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        k = len(sets["unseen"])
        parts = {part: score(r["predictions"][sl], refs[sl])["rougeL"]
                 for part, sl in (("unseen", slice(0, k)), ("seen", slice(k, None))) if refs[sl]}
        r["rougeL_unseen"], r["rougeL_seen"] = parts.get("unseen"), parts.get("seen")
        r["same_as_onnx_float32"] = sum(a == b for a, b in zip(r["predictions"], base)) / len(base)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {r['rougeL']:.3f} | {r['exact_match']:.3f} | {r['heldout_loss']:.4f} | "
              f"{fmt(r['rougeL_unseen'])} | {fmt(r['rougeL_seen'])} | {r['same_as_onnx_float32']:.3f} | "
              f"{r['seconds']:.0f} |", flush=True)
    q, f = results["onnx int8 (dynamic, KV cache)"], results["onnx float32 (KV cache)"]
    print(f"# int8 - float32: Rouge-L {q['rougeL'] - f['rougeL']:+.3f}, exact {q['exact_match'] - f['exact_match']:+.3f}, "
          f"loss {q['heldout_loss'] - f['heldout_loss']:+.4f}")
    if args.json:
        doc = {"args": vars(args), "cpu": cpu_model(), "train_seconds": train_s, "examples": len(examples),
               "unseen_examples": len(sets["unseen"]), "seen_examples": len(sets["seen"]),
               "references": refs, "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
