"""Benchmark FlexLoRA aggregation: ours (auto/exact/randomized/dense) vs the reference and
torch dense + svd_lowrank, on a workload from benchmarks/workloads.json.

    python benchmarks/bench_aggregation.py --scale cpu_small

Prints the machine, then per rank mix: median time (and spread) over repeats, speedup
against the reference, truncation error relative to the Eckart-Young optimum
(||dW - U S Vt||_F / ||dW - optimum||_F, worst module), peak RSS growth, and GFLOP/s
(route FLOP count / time) against this machine's sgemm peak measured in the same run.

Floor: per route, the FLOPs it needs (server.core.linalg.plan; float32 and float64 parts) and
the time those FLOPs would take at the GEMM rates measured in the same run:
floor_s = flops_f32 / sgemm_rate + flops_f64 / dgemm_rate (the exact route's Grams and
R x R steps run in float64, whose GEMM rate is about half of float32's); `x floor` is
median / floor_s. `floor32_s` = all FLOPs at the sgemm rate is printed beside it.
Also: lowrank_svd_batched vs a Python loop, and streaming peak RSS for N vs 4N clients.
Writes JSON and a markdown table (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
WORKLOADS = ROOT.parent / "server" / "assets" / "workloads.json"
ATTN, FFN = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- workload
def module_shapes(model):
    h, f, kv = model["hidden"], model["ffn"], model["kv_dim"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def client_types(dist, n):
    """Largest-remainder assignment of n clients to client types (ties: file order)."""
    names = list(dist)
    quota = [dist[k] * n for k in names]
    counts = [int(q) for q in quota]
    order = sorted(range(len(names)), key=lambda i: -(quota[i] - counts[i]))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return [name for name, c in zip(names, counts) for _ in range(c)]


def make_round(wl, scale, mix, seed=0, layers=None):
    sc = wl["bench_scales"][scale]
    model = wl["models"][sc["model"]]
    shapes = module_shapes(model)
    types = client_types(wl["rank_distributions"][mix], sc["clients_per_round"])
    rng = np.random.default_rng(seed)
    n_examples = rng.integers(50, 500, len(types))
    p = n_examples / n_examples.sum()
    alpha = float(wl["lora_alpha"])
    modules = []
    for layer in range(layers or sc["layers"]):
        for target in wl["lora_targets"]:
            d_out, d_in = shapes[target]
            Bs, As, ws = [], [], []
            for k, t in enumerate(types):
                r = wl["client_types"][t]["attn" if target in ATTN else "ffn"]
                # trained-LoRA-like factors: a decaying spectrum per client
                decay = (1.0 / np.sqrt(1.0 + np.arange(r))).astype(np.float32)
                Bs.append((rng.standard_normal((d_out, r), np.float32) * decay * 0.01))
                As.append(rng.standard_normal((r, d_in), np.float32) / np.float32(np.sqrt(d_in)))
                ws.append(float(p[k] * alpha / r))
            modules.append((f"layers.{layer}.{target}", Bs, As, ws))
    return modules, types


# ----------------------------------------------------------------------------- measuring
from _measure import PeakRSS, machine, sgemm_peak, timed  # noqa: E402


# ----------------------------------------------------------------------------- methods
def run_ours(modules, rank, method, threads):
    from server.core import linalg
    return linalg.lowrank_svd_batched([(B, A) for _, B, A, _ in modules],
                                      [w for *_, w in modules], rank, method=method,
                                      threads=threads)


def run_torch(modules, rank):
    import torch
    out = []
    for _, Bs, As, ws in modules:
        B = torch.cat([torch.from_numpy(b) for b in Bs], 1)
        A = torch.cat([torch.from_numpy(a) * w for a, w in zip(As, ws)], 0)
        U, S, V = torch.svd_lowrank(B @ A, q=rank + 10, niter=2)
        out.append((U[:, :rank].numpy(), S[:rank].numpy(), V[:, :rank].T.numpy()))
    return out


def run_reference(modules, rank, keep=None):
    """The reference; ``keep`` collects (dW, optimum residual) from its full SVD, so the
    optimum costs no second full SVD (it inflates the reference's RSS by the dW's kept)."""
    import torch

    from server.core.oracles import reference_delta
    out = []
    for _, Bs, As, ws in modules:
        dW = reference_delta(Bs, As, ws)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        r = min(rank, S.shape[0])
        out.append((U[:, :r].numpy(), S[:r].numpy(), Vh[:r].numpy()))
        if keep is not None:
            keep.append((dW, float(np.sqrt(np.sum(S[rank:].double().numpy() ** 2)))))
    return out


def optimum_tails(modules, rank):
    """(dW, ||dW - optimum||_F) per module from a full SVD (untimed)."""
    import torch

    from server.core.oracles import reference_delta
    out = []
    for _, Bs, As, ws in modules:
        dW = reference_delta(Bs, As, ws)
        S = torch.linalg.svdvals(dW).double().numpy()
        out.append((dW, float(np.sqrt(np.sum(S[rank:] ** 2)))))
    return out


def record(mixres, method, times, rss, err, fl, rates):
    fl_total, fl64 = fl
    med = statistics.median(times)
    floor = floor_seconds(fl_total, fl64, rates)
    mixres[method] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                      "repeats": len(times), "error_ratio": err, "peak_rss_mb": rss,
                      "gflops": fl_total / med / 1e9, "flops": fl_total, "flops_f64": fl64,
                      "floor_s": floor, "floor32_s": fl_total / (rates[0] * 1e9),
                      "x_floor": med / floor}
    print(f"  {method:<10} median {med:8.3f}s  [{min(times):.3f}, {max(times):.3f}]"
          f"  err/opt {err:.6f}  rss +{rss:7.1f} MB  {fl_total / med / 1e9:6.1f} GFLOP/s"
          f"  {fl_total / 1e9:7.1f} GFLOP ({fl64 / 1e9:.1f} f64)  floor {floor:.3f}s"
          f"  x{med / floor:.2f} floor", flush=True)


def floor_seconds(fl, fl64, rates):
    return (fl - fl64) / (rates[0] * 1e9) + fl64 / (rates[1] * 1e9)


def refloor(results, rates):
    """Recompute every floor and x floor of ``results`` at ``rates`` (sgemm, dgemm GFLOP/s)."""
    for mixres in results["mixes"].values():
        for r in mixres.values():
            r["floor_s"] = floor_seconds(r["flops"], r["flops_f64"], rates)
            r["floor32_s"] = r["flops"] / (rates[0] * 1e9)
            r["x_floor"] = r["median_s"] / r["floor_s"]
    for shape_rows in results.get("per_shape", {}).values():
        for row in shape_rows:
            for k in ("auto", "exact", "torch"):
                row[k]["x_floor"] = row[k]["median_s"] / floor_seconds(row[k]["flops"], row[k]["flops_f64"], rates)


def error_ratio(tails, svds):
    import torch
    worst = 0.0
    for (dW, tail), (U, S, Vt) in zip(tails, svds):
        approx = torch.from_numpy(np.ascontiguousarray(U * S)) @ torch.from_numpy(np.ascontiguousarray(Vt))
        err = float(torch.linalg.norm((dW - approx).double()))
        worst = max(worst, err / tail if tail > 0 else (0.0 if err == 0 else float("inf")))
    return worst


def flops(modules, rank, route):
    """(total FLOPs, of which float64) of a route over the modules, from the cost model."""
    from server.core import linalg
    total = f64 = 0.0
    for _, Bs, As, _ in modules:
        m, n, R = Bs[0].shape[0], As[0].shape[1], sum(b.shape[1] for b in Bs)
        p = linalg.plan(m, n, R, rank)
        if route == "auto":
            total += p.flops[p.method]
            f64 += p.flops_f64.get(p.method, 0.0)
        elif route in p.flops:
            q = linalg.plan(m, n, R, rank, method=route)
            total += q.flops[route]
            f64 += q.flops_f64.get(route, 0.0)
        elif route == "sketch":
            total += sketch_flops(m, n, R, rank)
        elif route == "torch":
            total += linalg.plan(m, n, R, rank, method="dense").flops["dense"]
        else:  # reference: per-client products + a full SVD (4mn^2 + 8n^3, n = min)
            s, b = min(m, n), max(m, n)
            total += 2.0 * m * n * R + 4.0 * b * s * s + 8.0 * s**3
    return total, f64


def sketch_flops(m, n, R, rank):
    """One-pass sketch (server.core.linalg.StreamingSketch at the default sizes, sparse sign
    test maps with zeta = min(l, 8) nonzeros per column): per client the maps applied to the
    factors, A Omega, Psi B, Phi B, A Xi^T (4 r zeta (m + n)), then B (A Omega), (Psi B) A,
    (Phi B)(A Xi^T) (2 r (m k + k n + s^2)); finalize: two Householder QRs (4 d k^2),
    Phi Q and Xi P (2 zeta k (m + n)), QRs of s x k (4 s k^2 each), Q1^T Z Q2
    (2 k s^2 + 2 k^2 s), SVD of k x k (22 k^3), U and V (2 (m + n) k rank)."""
    from server.core import linalg
    k, s = linalg.sketch_sizes(rank, m, n)
    zeta = min(k, 8)
    upd = 2 * R * ((m + n) * k + s * s) + 4 * R * min(s, 8) * (m + n)
    fin = 4 * (m + n) * k * k + 2 * zeta * k * (m + n) + 8 * s * k * k + 2 * k * s * s + 2 * k * k * s \
        + 22 * k**3 + 2 * (m + n) * k * rank
    return upd + fin


def dgemm_peak(threads):
    """float64 GEMM rate (NumPy's BLAS, 2048^3, best of 3), for the float64 part of floors."""
    from threadpoolctl import threadpool_limits
    n = 2048
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    with threadpool_limits(threads):
        a @ b
        best = min(_t(lambda: a @ b) for _ in range(3))
    return 2.0 * n**3 / best / 1e9


def _t(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- sections
def bench_batched(threads, repeats, warmup):
    from server.core import linalg
    rng = np.random.default_rng(1)
    layers, weights = [], []
    for _ in range(96):
        ranks = [4, 8, 8, 16]
        layers.append(([rng.standard_normal((256, r), np.float32) for r in ranks],
                       [rng.standard_normal((r, 256), np.float32) for r in ranks]))
        weights.append([0.25] * 4)
    def batched():
        return linalg.lowrank_svd_batched(layers, weights, 16, threads=threads)
    def loop():
        return [linalg.lowrank_svd(B, A, w, 16, threads=threads)
                        for (B, A), w in zip(layers, weights)]
    def loop1():
        return [linalg.lowrank_svd(B, A, w, 16, threads=1)
                         for (B, A), w in zip(layers, weights)]
    _, tb, _ = timed(batched, repeats, warmup)
    _, tl, _ = timed(loop, repeats, warmup)
    _, t1, _ = timed(loop1, repeats, warmup)
    # same thread budget for both: the batched call runs modules in parallel with 1 BLAS
    # thread each, the loop runs one module at a time with `threads` BLAS threads
    return {"modules": len(layers), "shape": "256x256, ranks 4+8+8+16, rank 16",
            "threads": threads,
            "batched_s": statistics.median(tb), "loop_s": statistics.median(tl),
            "loop_1thread_s": statistics.median(t1),
            "speedup": statistics.median(tl) / statistics.median(tb),
            "speedup_vs_1thread_loop": statistics.median(t1) / statistics.median(tb)}


def stream_child(n_clients, threads):
    """Child process: stream n_clients (dense route, one layer of llama-1.3b modules, ranks
    200) through the Aggregator, generating each client on the fly; print peak RSS."""
    from server.core.aggregation import Aggregator
    wl = json.loads(WORKLOADS.read_text())
    shapes = module_shapes(wl["models"]["llama-1.3b"])
    agg = Aggregator(200, method="dense", threads=threads)
    rng = np.random.default_rng(0)
    for k in range(n_clients):
        f = {}
        for t in ("q_proj", "down_proj"):
            d_out, d_in = shapes[t]
            f[f"m.{t}.lora_B.weight"] = rng.standard_normal((d_out, 200), np.float32) * 0.01
            f[f"m.{t}.lora_A.weight"] = rng.standard_normal((200, d_in), np.float32)
        agg.add(f, num_examples=10 + k, alpha=16.0)
        del f
    agg.finalize()
    # VmHWM is this process's own high-water mark (ru_maxrss survives exec from the parent)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm / 1024}))


def bench_streaming(n, threads):
    res = {}
    for count in (n, 4 * n):
        out = subprocess.run([sys.executable, __file__, "--_stream", str(count),
                              "--threads", str(threads)], capture_output=True, text=True,
                             check=True)
        res[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"clients": [n, 4 * n], "peak_rss_mb": [res[n], res[4 * n]],
            "growth": res[4 * n] / res[n] - 1.0}


def first_of_each_shape(modules, tails):
    """(module, its optimum tail, d_out, d_in) for the first module of each distinct shape."""
    seen = set()
    for mod, tail in zip(modules, tails):
        m, n = mod[1][0].shape[0], mod[2][0].shape[1]
        if (m, n) not in seen:
            seen.add((m, n))
            yield mod, tail, m, n


def bench_per_shape(modules, tails, rank, threads, repeats, warmup, rates):
    """auto and exact against torch on one module of each distinct shape (first layer),
    round-robin like the main table: the issue's per-shape targets."""
    rows = []
    for mod, tail, m, n in first_of_each_shape(modules, tails):
        fns = {"auto": lambda: run_ours([mod], rank, "auto", threads),
               "exact": lambda: run_ours([mod], rank, "exact", threads),
               "torch": lambda: run_torch([mod], rank)}
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times, outs = {k: [] for k in fns}, {}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                outs[k] = fn()
                times[k].append(time.perf_counter() - t0)
        row = {"module": mod[0], "shape": f"{m}x{n}", "R": sum(b.shape[1] for b in mod[1])}
        for k in fns:
            fl, fl64 = flops([mod], rank, "dense" if k == "torch" else k)
            med = statistics.median(times[k])
            floor = floor_seconds(fl, fl64, rates)
            row[k] = {"median_s": med, "error_ratio": error_ratio([tail], outs[k]),
                      "x_floor": med / floor, "flops": fl, "flops_f64": fl64}
        for k in ("auto", "exact"):
            row[k]["speedup_vs_torch"] = row["torch"]["median_s"] / row[k]["median_s"]
        print(f"  {row['shape']:>10} R={row['R']:<5} " + "  ".join(
            f"{k} {row[k]['median_s'] * 1e3:7.1f} ms err/opt {row[k]['error_ratio']:.6f} x{row[k]['x_floor']:.2f} floor"
            + (f" {row[k]['speedup_vs_torch']:.2f}x torch" if k != "torch" else "") for k in fns), flush=True)
        rows.append(row)
    return rows


def bench_sketch_sizes(modules, tails, rank, threads, sizes, target=1.05):
    """err/opt of method="sketch" against the sketch size k (core s = 2k + 1) on one module
    of each shape: the default k = 2 rank + 1 and the smallest k of `sizes` reaching
    `target`."""
    from server.core import linalg
    rows = []
    for mod, tail, m, n in first_of_each_shape(modules, tails):
        R = sum(b.shape[1] for b in mod[1])
        default_k = linalg.sketch_sizes(rank, m, n)[0]
        row = {"module": mod[0], "shape": f"{m}x{n}", "R": R, "errors": {}}
        for k in sorted({default_k, *[x for x in sizes if x <= min(m, n)]}):
            t0 = time.perf_counter()
            out = linalg.lowrank_svd_batched([(mod[1], mod[2])], [mod[3]], rank, method="sketch",
                                             sketch_size=k, threads=threads)
            dt = time.perf_counter() - t0
            row["errors"][k] = {"err_over_opt": error_ratio([tail], out), "seconds": dt,
                                "state_mb": linalg.StreamingSketch.projected_bytes(m, n, rank, k) / 2**20}
        row["default_k"] = default_k
        row["default_err"] = row["errors"][default_k]["err_over_opt"]
        ok = [k for k, e in sorted(row["errors"].items()) if e["err_over_opt"] <= target]
        row["k_for_target"] = ok[0] if ok else None
        print(f"  sketch {row['shape']:>10} R={R:<5} " + "  ".join(
            f"k={k}: {e['err_over_opt']:.4f}" for k, e in sorted(row["errors"].items()))
            + f"  -> smallest k with err/opt <= {target}: {row['k_for_target']}", flush=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="cpu_small")
    ap.add_argument("--mixes", default="heavy_tail_light,heavy_tail_strong")
    ap.add_argument("--rank", type=int, default=200, help="aggregation max_rank")
    ap.add_argument("--methods", default="auto,exact,randomized,dense,sketch,torch,reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-repeats", type=int, default=1,
                    help="the reference takes minutes; one timed run by default")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reference-layers", type=int, default=None,
                    help="time the reference on only the first N layers and scale its time "
                         "by modules/timed modules (said in the output); default: all")
    ap.add_argument("--layers", type=int, default=None, help="override the scale's layers")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(ROOT.parent / "results" / "bench_aggregation"))
    ap.add_argument("--skip-extras", action="store_true", help="skip batched and streaming")
    ap.add_argument("--skip-shapes", action="store_true",
                    help="skip the per-shape table (auto/exact vs torch on one module per shape)")
    ap.add_argument("--sketch-sizes", default="",
                    help="comma-separated sketch sizes k for the sketch accuracy table (e.g. 401,600,800,1200,1600)")
    ap.add_argument("--_stream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._stream:
        return stream_child(args._stream, args.threads)

    import torch
    torch.set_num_threads(args.threads)
    wl = json.loads(WORKLOADS.read_text())
    info = machine(args.threads)
    peak = sgemm_peak(args.threads)
    dpeak = dgemm_peak(args.threads)
    info["sgemm_peak_gflops"] = peak
    info["dgemm_peak_gflops"] = dpeak
    info["loadavg_start"] = os.getloadavg()
    rates = (peak, dpeak)
    print("# machine:", json.dumps(info))
    print(f"# sgemm peak (2048^3, ours/OpenBLAS, {args.threads} threads): {peak:.1f} GFLOP/s; "
          f"dgemm (NumPy's BLAS): {dpeak:.1f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    methods = args.methods.split(",")
    rows, results = [], {"machine": info, "args": vars(args), "mixes": {}}
    for mix in args.mixes.split(","):
        modules, types = make_round(wl, args.scale, mix, layers=args.layers)
        Rs = sorted({sum(b.shape[1] for b in m[1]) for m in modules})
        print(f"\n## {mix}: {len(modules)} modules, {len(types)} clients, R per module {Rs}",
              flush=True)
        tails, mixres = [], {}
        ref_mods = modules
        if args.reference_layers is not None:
            ref_mods = modules[: args.reference_layers * len(wl["lora_targets"])]
        runners = {}
        for method in methods:
            if method == "torch":
                runners[method] = lambda: run_torch(modules, args.rank)
            elif method != "reference":
                runners[method] = (lambda m: lambda: run_ours(modules, args.rank, m, args.threads))(method)
        if "reference" in methods:
            # the reference runs first: its full SVDs give the optimum errors are measured by
            keep = []
            out, times, rss = timed(lambda: run_reference(ref_mods, args.rank, keep=keep),
                                    args.reference_repeats, 0, collect=keep)
            tails = keep[: len(ref_mods)] + optimum_tails(modules[len(ref_mods):], args.rank)
            scale = len(modules) / len(ref_mods)
            if scale != 1:
                print(f"  reference timed on {len(ref_mods)} of {len(modules)} modules (whole "
                      f"layers), time scaled by {scale:.2f}", flush=True)
            record(mixres, "reference", [t * scale for t in times], rss,
                   error_ratio(tails, out), flops(modules, args.rank, "reference"), rates)
        else:
            tails = optimum_tails(modules, args.rank)
        # the other methods are timed round-robin (one repeat of each in turn), so load from
        # other processes drifts over all of them alike; medians and ratios come from one run
        for fn in runners.values():
            for _ in range(args.warmup):
                fn()
        times = {m: [] for m in runners}
        rss = {m: 0.0 for m in runners}
        outs = {}
        for _ in range(args.repeats):
            for method, fn in runners.items():
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    outs[method] = fn()
                    times[method].append(time.perf_counter() - t0)
                rss[method] = max(rss[method], mem.growth_mb)
        for method in runners:
            record(mixres, method, times[method], rss[method], error_ratio(tails, outs[method]),
                   flops(modules, args.rank, method), rates)
            if method == "auto":
                from server.core import linalg
                mixres[method]["routes"] = sorted({linalg.plan(b[0].shape[0], a[0].shape[1], sum(x.shape[1] for x in b), args.rank).method for _, b, a, _ in modules})
        ref = mixres.get("reference", {}).get("median_s")
        for method, r in mixres.items():
            r["speedup_vs_reference"] = ref / r["median_s"] if ref else None
            if "torch" in mixres:
                r["speedup_vs_torch"] = mixres["torch"]["median_s"] / r["median_s"]
            rows.append((mix, method, r))
        results["mixes"][mix] = mixres
        if args.sketch_sizes:
            print("  sketch sizes (core s = 2k + 1):", flush=True)
            results.setdefault("sketch_sizes", {})[mix] = bench_sketch_sizes(
                modules, tails, args.rank, args.threads, [int(x) for x in args.sketch_sizes.split(",")])
        if not args.skip_shapes:
            print("  per shape (one module each):", flush=True)
            mixres_shapes = bench_per_shape(modules, tails, args.rank, args.threads, args.repeats,
                                            args.warmup, rates)
            results.setdefault("per_shape", {})[mix] = mixres_shapes
    extras = {}
    if not args.skip_extras:
        extras["batched"] = bench_batched(args.threads, args.repeats, args.warmup)
        print(f"\n## batched: {json.dumps(extras['batched'])}", flush=True)
        extras["streaming"] = bench_streaming(5, args.threads)
        print(f"## streaming (dense route): {json.dumps(extras['streaming'])}", flush=True)
    results["extras"] = extras
    info["loadavg_end"] = os.getloadavg()
    # The GEMM rates again at the end: one measurement at the start can catch a noisy moment of a
    # shared machine; the floor uses the best rate seen in the run.
    end_rates = (sgemm_peak(args.threads), dgemm_peak(args.threads))
    info["sgemm_peak_gflops_end"], info["dgemm_peak_gflops_end"] = end_rates
    rates = (max(rates[0], end_rates[0]), max(rates[1], end_rates[1]))
    info["sgemm_peak_gflops"], info["dgemm_peak_gflops"] = rates
    print(f"# sgemm peak at the end {end_rates[0]:.1f} GFLOP/s, dgemm {end_rates[1]:.1f}; floors use the best: "
          f"{rates[0]:.1f} / {rates[1]:.1f}", flush=True)
    refloor(results, rates)
    md = markdown(rows, extras, info, args, results.get("per_shape", {}), results.get("sketch_sizes", {}))
    print("\n" + md)
    print(acceptance(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str))
    Path(args.out + ".md").write_text(md + "\n" + acceptance(results) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


def markdown(rows, extras, info, args, per_shape=None, sketch_rows=None):
    lines = [f"Machine: {info['cpu']}, {info['threads']} threads; sgemm peak "
             f"{info['sgemm_peak_gflops']:.1f} GFLOP/s. Scale `{args.scale}`, max_rank {args.rank}, "
             f"median of {args.repeats} (reference: {args.reference_repeats}); methods timed "
             f"round-robin in one run." + (f" Reference timed on {args.reference_layers} "
             f"layer(s), scaled to all." if args.reference_layers else ""), "",
             f"dgemm {info['dgemm_peak_gflops']:.1f} GFLOP/s; load average {info['loadavg_start'][0]:.2f} at the "
             f"start, {info['loadavg_end'][0]:.2f} at the end. Floor = FLOPs at the measured GEMM rates "
             f"(float32 part at sgemm, float64 part at dgemm); x floor = median / floor.", "",
             "| mix | method | median s | spread s | vs reference | vs torch | err / optimum | peak RSS +MB | GFLOP | of which f64 | floor s | x floor | GFLOP/s | % sgemm peak |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mix, method, r in rows:
        def f(x, fmt):
            return "-" if x is None else format(x, fmt)
        name = method + (f" ({'/'.join(r['routes'])})" if "routes" in r else "")
        lines.append(f"| {mix} | {name} | {r['median_s']:.3f} | {r['max_s'] - r['min_s']:.3f} | "
                     f"{f(r.get('speedup_vs_reference'), '.1f')}x | {f(r.get('speedup_vs_torch'), '.2f')}x | "
                     f"{r['error_ratio']:.6f} | {r['peak_rss_mb']:.0f} | {r['flops'] / 1e9:.1f} | "
                     f"{r['flops_f64'] / 1e9:.1f} | {r['floor_s']:.3f} | {r['x_floor']:.2f} | {r['gflops']:.1f} | "
                     f"{100 * r['gflops'] / info['sgemm_peak_gflops']:.0f}% |")
    if per_shape:
        lines += ["", "Per shape (one module of each shape, first layer; floor as above):", "",
                  "| mix | shape | R | auto ms | auto vs torch | auto err/opt | auto x floor | exact ms | exact vs torch | exact err/opt | exact x floor | torch ms | torch err/opt |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for mix, rws in per_shape.items():
            for r in rws:
                a, e, t = r["auto"], r["exact"], r["torch"]
                lines.append(f"| {mix} | {r['shape']} | {r['R']} | {1e3 * a['median_s']:.1f} | {a['speedup_vs_torch']:.2f}x | "
                             f"{a['error_ratio']:.6f} | {a['x_floor']:.2f} | {1e3 * e['median_s']:.1f} | "
                             f"{e['speedup_vs_torch']:.2f}x | {e['error_ratio']:.6f} | {e['x_floor']:.2f} | "
                             f"{1e3 * t['median_s']:.1f} | {t['error_ratio']:.6f} |")
    if args.sketch_sizes and sketch_rows:
        lines += ["", "Sketch route: err/opt against the sketch size k (core s = 2k + 1), one module per shape:", "",
                  "| mix | shape | R | default k | err/opt at default | smallest k with err/opt <= 1.05 | all (k: err/opt) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for mix, rws in sketch_rows.items():
            for r in rws:
                allk = ", ".join(f"{k}: {e['err_over_opt']:.4f}" for k, e in sorted(r["errors"].items()))
                lines.append(f"| {mix} | {r['shape']} | {r['R']} | {r['default_k']} | {r['default_err']:.4f} | "
                             f"{r['k_for_target'] or '> tried'} | {allk} |")
    if "batched" in extras:
        b = extras["batched"]
        lines += ["", f"lowrank_svd_batched over {b['modules']} modules ({b['shape']}), "
                  f"{b.get('threads')} threads for both: "
                  f"{b['batched_s']:.3f}s vs Python loop {b['loop_s']:.3f}s = {b['speedup']:.2f}x "
                  f"(loop at 1 BLAS thread: {b['loop_1thread_s']:.3f}s = "
                  f"{b['speedup_vs_1thread_loop']:.2f}x)"]
    if "streaming" in extras:
        s = extras["streaming"]
        lines += [f"Streaming (dense route): peak RSS {s['peak_rss_mb'][0]:.0f} MB for "
                  f"{s['clients'][0]} clients, {s['peak_rss_mb'][1]:.0f} MB for {s['clients'][1]} "
                  f"(+{100 * s['growth']:.1f}%)"]
    return "\n".join(lines)


def acceptance(res):
    out = ["", "Acceptance (issue 2):"]
    m = res["mixes"]
    def line(ok, text):
        out.append(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    if "heavy_tail_light" in m and {"auto", "reference", "torch"} <= set(m["heavy_tail_light"]):
        a = m["heavy_tail_light"]["auto"]
        line(a["speedup_vs_reference"] >= 10, f"light: auto {a['speedup_vs_reference']:.1f}x vs reference (>= 10x)")
        line(a["speedup_vs_torch"] >= 2, f"light: auto {a['speedup_vs_torch']:.2f}x vs torch (>= 2x)")
        line(a["error_ratio"] <= 1 + 1e-4, f"light: error/optimum {a['error_ratio']:.7f} (<= 1+1e-4)")
    if "heavy_tail_strong" in m and {"auto", "reference", "torch"} <= set(m["heavy_tail_strong"]):
        a = m["heavy_tail_strong"]["auto"]
        line(a["speedup_vs_reference"] >= 2.5, f"strong: auto {a['speedup_vs_reference']:.1f}x vs reference (>= 2.5x)")
        line(a["speedup_vs_torch"] >= 1.0, f"strong: auto {a['speedup_vs_torch']:.2f}x vs torch (>= 1x)")
        line(a["error_ratio"] <= 1.01, f"strong: error/optimum {a['error_ratio']:.5f} (<= 1.01)")
    out.append("Acceptance (issue 15, this machine):")
    for mix, mixres in m.items():
        if "exact" in mixres and mix == "heavy_tail_light":
            x = mixres["exact"]["x_floor"]
            line(x <= 2.0, f"{mix}: exact {x:.2f}x its floor (<= 2x)")
        if mix == "heavy_tail_strong" and "torch" in mixres:
            t = mixres["torch"]
            for meth in ("auto", "randomized", "dense"):
                if meth in mixres:
                    r = mixres[meth]
                    ok = r["speedup_vs_torch"] >= 1.2 and r["error_ratio"] <= t["error_ratio"]
                    line(ok, f"{mix}: {meth} {r['speedup_vs_torch']:.2f}x torch (>= 1.2x) at err/opt "
                         f"{r['error_ratio']:.5f} (torch {t['error_ratio']:.5f}, must be <=)")
    for mix, rws in res.get("per_shape", {}).items():
        if mix != "heavy_tail_light":
            continue
        for r in rws:
            a = r["auto"]
            line(a["speedup_vs_torch"] >= 2.5 and a["error_ratio"] <= 1 + 1e-4,
                 f"{mix} {r['shape']}: auto {a['speedup_vs_torch']:.2f}x torch (>= 2.5x), "
                 f"err/opt {a['error_ratio']:.7f} (<= 1+1e-4)")
    ex = res.get("extras", {})
    if "batched" in ex:
        line(ex["batched"]["speedup"] >= 1.3, f"batched {ex['batched']['speedup']:.2f}x vs loop (>= 1.3x)")
    if "streaming" in ex:
        line(ex["streaming"]["growth"] <= 0.2, f"streaming 4x clients: peak RSS +{100 * ex['streaming']['growth']:.1f}% (<= 20%)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
