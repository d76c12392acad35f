"""GPU benchmark of FlexLoRA aggregation: streamed CudaAggregator vs the reference algorithm
on the same GPU in torch (per-client ``B @ A`` summed into dW, ``torch.linalg.svd``).

    python benchmarks/bench_gpu.py --scale paper_round --scale gpu_round --json out.json

Workloads come from server/assets/workloads.json (model shapes, rank mix, clients per round).
Clients stream from pinned host memory: a pool of ``--pool`` distinct clients per client type
is generated once and the round cycles through it (80 distinct 7B clients would not fit in
host memory); each client's factors are copied to the device while the previous client's
GEMMs run. Reported per scale: median and spread of the round time (all clients added,
every module truncated at the largest client rank), speedup over the reference, the
truncation error relative to the Eckart-Young optimum on ``--opt-modules`` modules
(||dW - U S Vt||_F / ||dW - optimum||_F, dW and optimum in float64), and the fraction of the
round spent moving client factors to the device (a copy-only pass over the same bytes, timed
alone, divided by the round time). The reference is timed on ``--ref-layers`` layers and
scaled by the layer count (layers are identical in shape and independent); it says so.
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

import numpy as np

from server.bench.cases import client_types, lora_module_shapes, target_group
from server.bench.machine import cpu_model
from server.workloads.catalog import load_workloads


def machine(torch, cuda):
    ok, info = cuda.available()
    return {"gpu": torch.cuda.get_device_name(), "backend": info if ok else f"unavailable: {info}",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def make_pool(torch, wl, scale, mix, pool, layers, seed=0):
    """Distinct pinned clients per client type, and the round's client sequence over them."""
    sc = wl["bench_scales"][scale]
    shapes = lora_module_shapes(wl["models"][sc["model"]])
    types = client_types(wl["rank_distributions"][mix], sc["clients_per_round"])
    gen = torch.Generator(device="cuda").manual_seed(seed)
    members, seq, used = {}, [], {}
    for t in types:
        j = used.get(t, 0) % pool
        used[t] = used.get(t, 0) + 1
        if (t, j) not in members:
            factors = {}
            for layer in range(layers):
                for target in wl["lora_targets"]:
                    d_out, d_in = shapes[target]
                    r = wl["client_types"][t][target_group(target)]
                    decay = 1.0 / torch.sqrt(1.0 + torch.arange(r, device="cuda"))
                    B = torch.randn(d_out, r, device="cuda", generator=gen) * decay * 0.01
                    A = torch.randn(r, d_in, device="cuda", generator=gen) / d_in ** 0.5
                    name = f"layers.{layer}.{target}"
                    factors[name + ".lora_B.weight"] = B.cpu().pin_memory()
                    factors[name + ".lora_A.weight"] = A.cpu().pin_memory()
            members[(t, j)] = (factors, wl["client_types"][t])
        seq.append((t, j))
    rng = np.random.default_rng(seed)
    n_examples = rng.integers(50, 500, len(seq)).tolist()
    return members, seq, n_examples


def timed(torch, fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def ours(torch, members, seq, n_examples, max_rank, alpha, tf32):
    from server.core.cuda_aggregation import CudaAggregator
    agg = CudaAggregator(max_rank, method="auto", tf32=tf32)
    for key, n in zip(seq, n_examples):
        agg.add(members[key][0], num_examples=int(n), alpha=alpha)
    return agg.finalize_device(), agg


def copy_only(torch, members, seq):
    """The bytes the round moves, host -> device, on one stream, nothing else."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for key in seq:
            dev = [t.to("cuda", non_blocking=True) for t in members[key][0].values()]
            del dev
    stream.synchronize()


def exact_delta(torch, members, seq, n_examples, module, alpha, dtype):
    total = float(sum(n_examples))
    dW = None
    for key, n in zip(seq, n_examples):
        f = members[key][0]
        B = f[module + ".lora_B.weight"].to("cuda", dtype)
        A = f[module + ".lora_A.weight"].to("cuda", dtype)
        term = (B @ A) * (n / total * alpha / A.shape[0])
        dW = term if dW is None else dW + term
    return dW


def reference(torch, members, seq, n_examples, modules, max_rank, alpha):
    out = {}
    for module in modules:
        dW = exact_delta(torch, members, seq, n_examples, module, alpha, torch.float32)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        out[module] = (U[:, :max_rank], S[:max_rank], Vh[:max_rank])
    return out


def error_ratio(torch, dW64, usv):
    U, S, Vt = (t.double() for t in usv)
    s = torch.linalg.svdvals(dW64)
    opt = torch.sqrt(torch.sum(s[U.shape[1]:] ** 2))
    err = torch.linalg.norm(dW64 - (U * S) @ Vt)
    return float(err / opt)


def run_scale(torch, cuda, wl, scale, args):
    sc = wl["bench_scales"][scale]
    layers = args.layers or sc["layers"]
    alpha = float(wl["lora_alpha"])
    t0 = time.perf_counter()
    members, seq, n_examples = make_pool(torch, wl, scale, args.mix, args.pool, layers)
    gen_s = time.perf_counter() - t0
    max_rank = max(max(v.values()) for _, v in members.values())
    nbytes = sum(sum(t.numel() * 4 for t in members[k][0].values()) for k in seq)
    print(f"[{scale}] {layers} layers x {len(wl['lora_targets'])} modules, {len(seq)} clients "
          f"({len(members)} distinct), {nbytes / 1e9:.1f} GB streamed, pool built in {gen_s:.1f} s",
          flush=True)
    res = {"scale": scale, "layers": layers, "clients": len(seq), "distinct_clients": len(members),
           "mix": args.mix, "max_rank": max_rank, "bytes_streamed": nbytes}
    times, (svds, agg) = timed(torch, lambda: ours(torch, members, seq, n_examples, max_rank,
                                                   alpha, False), args.repeats, args.warmup)
    res["ours_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                     "runs": times}
    res["routes"] = sorted(set(agg.routes.values()))
    ctimes, _ = timed(torch, lambda: copy_only(torch, members, seq), 1, 0)
    res["h2d_s"] = ctimes[0]
    res["h2d_GBps"] = nbytes / ctimes[0] / 1e9
    res["h2d_fraction"] = ctimes[0] / res["ours_s"]["median"]
    print(f"  ours (fp32): median {res['ours_s']['median']:.2f} s [{min(times):.2f}, "
          f"{max(times):.2f}] over {len(times)}; host->device alone {ctimes[0]:.2f} s "
          f"({res['h2d_GBps']:.1f} GB/s) = {res['h2d_fraction']:.0%} of the round", flush=True)
    if args.tf32:
        ttimes, (svds_tf32, _) = timed(torch, lambda: ours(torch, members, seq, n_examples,
                                                           max_rank, alpha, True), 1, 0)
        res["ours_tf32_s"] = ttimes[0]
        print(f"  ours (tf32): {ttimes[0]:.2f} s", flush=True)
    ref_layers = min(args.ref_layers, layers)
    ref_modules = [f"layers.{l}.{t}" for l in range(ref_layers) for t in wl["lora_targets"]]
    rtimes, ref = timed(torch, lambda: reference(torch, members, seq, n_examples, ref_modules,
                                                 max_rank, alpha), 1, 0)
    res["reference_measured_s"] = rtimes[0]
    res["reference_layers_measured"] = ref_layers
    res["reference_s"] = rtimes[0] * layers / ref_layers
    res["speedup"] = res["reference_s"] / res["ours_s"]["median"]
    print(f"  reference (torch per-client B@A + linalg.svd): {rtimes[0]:.2f} s for {ref_layers} "
          f"layer(s), {res['reference_s']:.1f} s scaled to {layers}; speedup "
          f"{res['speedup']:.1f}x", flush=True)
    errs = {}
    for module in [f"layers.0.{t}" for t in wl["lora_targets"]][: args.opt_modules]:
        dW64 = exact_delta(torch, members, seq, n_examples, module, alpha, torch.float64)
        errs[module] = {"ours": error_ratio(torch, dW64, svds[module])}
        if module in ref:
            errs[module]["reference"] = error_ratio(torch, dW64, ref[module])
        if args.tf32:
            errs[module]["ours_tf32"] = error_ratio(torch, dW64, svds_tf32[module])
        del dW64
    res["error_vs_optimum"] = errs
    for module, e in errs.items():
        print(f"  error / optimum {module}: " + ", ".join(f"{k} {v:.4f}" for k, v in e.items()),
              flush=True)
    members = svds = agg = ref = None  # free the pool and results before the next scale
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", action="append", help="bench_scales entry (repeatable); "
                   "default paper_round and gpu_round")
    p.add_argument("--mix", default="heavy_tail_strong")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--pool", type=int, default=4, help="distinct clients per client type")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ref-layers", type=int, default=1)
    p.add_argument("--opt-modules", type=int, default=7)
    p.add_argument("--tf32", action="store_true", help="also time TF32 GEMMs and report error")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    from server.core import cuda
    ok, why = cuda.available()
    if not ok:
        print(f"bench_gpu: CUDA backend unavailable: {why}", file=sys.stderr)
        return 2
    wl = load_workloads()
    info = machine(torch, cuda)
    print("machine: " + json.dumps(info), flush=True)
    results = {"machine": info, "scales": []}
    for scale in args.scale or ["paper_round", "gpu_round"]:
        if scale not in wl["bench_scales"]:
            p.error(f"--scale must be one of {sorted(wl['bench_scales'])}, got {scale!r}")
        results["scales"].append(run_scale(torch, cuda, wl, scale, args))
        if args.json:  # written after every scale, so a timeout keeps what finished
            Path(args.json).write_text(json.dumps(results, indent=2))
    for r in results["scales"]:
        worst = max(e["ours"] for e in r["error_vs_optimum"].values()) if r["error_vs_optimum"] else float("nan")
        print(f"SUMMARY {r['scale']}: ours {r['ours_s']['median']:.2f} s, reference "
              f"{r['reference_s']:.1f} s, speedup {r['speedup']:.1f}x, worst error/optimum "
              f"{worst:.4f}, host->device {r['h2d_fraction']:.0%} of the round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
