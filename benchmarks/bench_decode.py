"""On-device greedy decoding, ms per new token: onnxruntime without cache (the whole sequence every
step), onnxruntime with a KV cache, the same int8-quantised (dynamic), and torch ``generate`` with
its cache; 32 new tokens after prompts of 16 and 200 tokens, on a tiny LLaMA of a few million
parameters, one thread everywhere. Also reports the int8 file size and logit differences:
cache decoding vs torch (max |logit| over every decoded position) and int8 vs float32.

    python benchmarks/bench_decode.py [--repeats 3] [--new 32]
    python benchmarks/bench_decode.py --model smollm2-135m --repeats 1   # a registered real model
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompts", default="16,200")
    ap.add_argument("--model", default=None, help="a registered model name or folder (default: a tiny LLaMA)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
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


if __name__ == "__main__":
    sys.exit(main())
