"""Benchmark FlexLoRA aggregation: ours (auto/exact/randomized/dense) vs the reference and
torch dense + svd_lowrank, on a workload from server/assets/workloads.json.

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
Writes JSON and a markdown table (--out). The generic pieces (machine, GEMM rates, timing,
peak memory, FLOP formulas, err/opt, markdown tables) are server/bench's; the round itself
(factors, routes, their FLOPs) is server/bench/rounds.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import numpy as np

from server.bench import flops as F
from server.bench import machine, measure, rounds
from server.bench.cases import lora_module_shapes
from server.bench.round_report import acceptance, markdown
from server.bench.rounds import error_ratio, first_of_each_shape, route_flops, run_ours, run_torch
from server.workloads.catalog import load_workloads

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- recording
def record(mixres, method, times, rss, err, fl, rates):
    fl_total, fl64 = fl
    t = measure.Timing(samples=list(times))
    med = t.median
    floor = F.floor_seconds(fl_total, fl64, *rates)
    mixres[method] = {"median_s": med, "min_s": t.best, "max_s": max(times),
                      "repeats": len(times), "error_ratio": err, "peak_rss_mb": rss,
                      "gflops": fl_total / med / 1e9, "flops": fl_total, "flops_f64": fl64,
                      "floor_s": floor, "floor32_s": fl_total / (rates[0] * 1e9),
                      "x_floor": med / floor}
    print(f"  {method:<10} median {med:8.3f}s  [{t.best:.3f}, {max(times):.3f}]"
          f"  err/opt {err:.6f}  rss +{rss:7.1f} MB  {fl_total / med / 1e9:6.1f} GFLOP/s"
          f"  {fl_total / 1e9:7.1f} GFLOP ({fl64 / 1e9:.1f} f64)  floor {floor:.3f}s"
          f"  x{med / floor:.2f} floor", flush=True)


def refloor(results, rates):
    """Recompute every floor and x floor of ``results`` at ``rates`` (sgemm, dgemm GFLOP/s)."""
    for mixres in results["mixes"].values():
        for r in mixres.values():
            r["floor_s"] = F.floor_seconds(r["flops"], r["flops_f64"], *rates)
            r["floor32_s"] = r["flops"] / (rates[0] * 1e9)
            r["x_floor"] = r["median_s"] / r["floor_s"]
    for shape_rows in results.get("per_shape", {}).values():
        for row in shape_rows:
            for k in ("auto", "exact", "torch"):
                row[k]["x_floor"] = row[k]["median_s"] / F.floor_seconds(row[k]["flops"], row[k]["flops_f64"], *rates)


# ----------------------------------------------------------------------------- sections
def bench_mix(modules, methods, args, rates, per_layer):
    """Every method on the whole round; the reference first (its full SVDs give the optimum
    errors are measured by). ``per_layer``: modules in a layer (for --reference-layers)."""
    mixres = {}
    ref_mods = modules
    if args.reference_layers is not None:
        ref_mods = modules[: args.reference_layers * per_layer]
    if "reference" in methods:
        timing, outs, peak = measure.time_round_robin(
            {"reference": lambda: rounds.run_reference(ref_mods, args.rank)},
            repeats=args.reference_repeats, warmup=0, memory=True)
        svds, spectra = outs["reference"]
        tails = rounds.optimum_tails(modules, args.rank, spectra)
        scale = len(modules) / len(ref_mods)
        if scale != 1:
            print(f"  reference timed on {len(ref_mods)} of {len(modules)} modules (whole "
                  f"layers), time scaled by {scale:.2f}", flush=True)
        record(mixres, "reference", [t * scale for t in timing["reference"].samples],
               peak["reference"] / 2**20, error_ratio(tails, svds),
               route_flops(modules, args.rank, "reference"), rates)
    else:
        tails = rounds.optimum_tails(modules, args.rank)
    runners = {}
    for method in methods:
        if method == "torch":
            runners[method] = lambda: run_torch(modules, args.rank)
        elif method != "reference":
            runners[method] = (lambda m: lambda: run_ours(modules, args.rank, m, args.threads))(method)
    # the other methods are timed round-robin (one repeat of each in turn), so load from
    # other processes drifts over all of them alike; medians and ratios come from one run
    timings, outs, peaks = measure.time_round_robin(runners, repeats=args.repeats, warmup=args.warmup,
                                                    memory=True)
    for method in runners:
        record(mixres, method, timings[method].samples, peaks[method] / 2**20,
               error_ratio(tails, outs[method]), route_flops(modules, args.rank, method), rates)
        if method == "auto":
            mixres[method]["routes"] = rounds.auto_routes(modules, args.rank)
    ref = mixres.get("reference", {}).get("median_s")
    for r in mixres.values():
        r["speedup_vs_reference"] = ref / r["median_s"] if ref else None
        if "torch" in mixres:
            r["speedup_vs_torch"] = mixres["torch"]["median_s"] / r["median_s"]
    return mixres, tails


def bench_batched(threads, repeats, warmup):
    from server.core import linalg
    rng = np.random.default_rng(1)
    layers, weights = [], []
    for _ in range(96):
        ranks = [4, 8, 8, 16]
        layers.append(([rng.standard_normal((256, r), np.float32) for r in ranks],
                       [rng.standard_normal((r, 256), np.float32) for r in ranks]))
        weights.append([0.25] * 4)
    # same thread budget for both: the batched call runs modules in parallel with 1 BLAS
    # thread each, the loop runs one module at a time with `threads` BLAS threads
    t, _, _ = measure.time_round_robin({
        "batched": lambda: linalg.lowrank_svd_batched(layers, weights, 16, threads=threads),
        "loop": lambda: [linalg.lowrank_svd(B, A, w, 16, threads=threads) for (B, A), w in zip(layers, weights)],
        "loop1": lambda: [linalg.lowrank_svd(B, A, w, 16, threads=1) for (B, A), w in zip(layers, weights)],
    }, repeats=repeats, warmup=warmup)
    tb, tl, t1 = t["batched"].median, t["loop"].median, t["loop1"].median
    return {"modules": len(layers), "shape": "256x256, ranks 4+8+8+16, rank 16",
            "threads": threads, "batched_s": tb, "loop_s": tl, "loop_1thread_s": t1,
            "speedup": tl / tb, "speedup_vs_1thread_loop": t1 / tb}


def stream_child(n_clients, threads):
    """Child process: stream n_clients (dense route, one layer of llama-1.3b modules, ranks
    200) through the Aggregator, generating each client on the fly; print peak RSS."""
    from server.core.aggregation import Aggregator
    shapes = lora_module_shapes(load_workloads()["models"]["llama-1.3b"])
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
    print(json.dumps({"peak_rss_mb": measure.vm_hwm_mb()}))


def bench_streaming(n, threads):
    res = {}
    for count in (n, 4 * n):
        out = subprocess.run([*measure.python_command(), __file__, "--_stream", str(count),
                              "--threads", str(threads)], capture_output=True, text=True,
                             check=True)
        res[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"clients": [n, 4 * n], "peak_rss_mb": [res[n], res[4 * n]],
            "growth": res[4 * n] / res[n] - 1.0}


def bench_per_shape(modules, tails, rank, threads, repeats, warmup, rates):
    """auto and exact against torch on one module of each distinct shape (first layer),
    round-robin like the main table: the issue's per-shape targets."""
    rows = []
    for mod, tail, m, n in first_of_each_shape(modules, tails):
        fns = {"auto": lambda: run_ours([mod], rank, "auto", threads),
               "exact": lambda: run_ours([mod], rank, "exact", threads),
               "torch": lambda: run_torch([mod], rank)}
        timings, outs, _ = measure.time_round_robin(fns, repeats=repeats, warmup=warmup)
        row = {"module": mod[0], "shape": f"{m}x{n}", "R": rounds.dims(mod)[2]}
        for k in fns:
            fl, fl64 = route_flops([mod], rank, "dense" if k == "torch" else k)
            med = timings[k].median
            row[k] = {"median_s": med, "error_ratio": error_ratio([tail], outs[k]),
                      "x_floor": med / F.floor_seconds(fl, fl64, *rates), "flops": fl, "flops_f64": fl64}
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
        R = rounds.dims(mod)[2]
        default_k = linalg.sketch_sizes(rank, m, n)[0]
        row = {"module": mod[0], "shape": f"{m}x{n}", "R": R, "errors": {}}
        for k in sorted({default_k, *[x for x in sizes if x <= min(m, n)]}):
            timing, outs, _ = measure.time_round_robin({"sketch": lambda: linalg.lowrank_svd_batched(
                [(mod[1], mod[2])], [mod[3]], rank, method="sketch", sketch_size=k, threads=threads)},
                repeats=1, warmup=0)
            row["errors"][k] = {"err_over_opt": error_ratio([tail], outs["sketch"]), "seconds": timing["sketch"].median,
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
    wl = load_workloads()
    info = machine.short_info(args.threads)
    rates = (machine.core_sgemm_gflops(args.threads), machine.dgemm_gflops(args.threads))
    info["sgemm_peak_gflops"], info["dgemm_peak_gflops"] = rates
    info["loadavg_start"] = os.getloadavg()
    print("# machine:", json.dumps(info))
    print(f"# sgemm peak (2048^3, ours/OpenBLAS, {args.threads} threads): {rates[0]:.1f} GFLOP/s; "
          f"dgemm (NumPy's BLAS): {rates[1]:.1f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    results = {"machine": info, "args": vars(args), "mixes": {}}
    for mix in args.mixes.split(","):
        modules, types = rounds.make_round(wl, args.scale, mix, layers=args.layers)
        Rs = sorted({rounds.dims(m)[2] for m in modules})
        print(f"\n## {mix}: {len(modules)} modules, {len(types)} clients, R per module {Rs}",
              flush=True)
        mixres, tails = bench_mix(modules, args.methods.split(","), args, rates, len(wl["lora_targets"]))
        results["mixes"][mix] = mixres
        if args.sketch_sizes:
            print("  sketch sizes (core s = 2k + 1):", flush=True)
            results.setdefault("sketch_sizes", {})[mix] = bench_sketch_sizes(
                modules, tails, args.rank, args.threads, [int(x) for x in args.sketch_sizes.split(",")])
        if not args.skip_shapes:
            print("  per shape (one module each):", flush=True)
            results.setdefault("per_shape", {})[mix] = bench_per_shape(
                modules, tails, args.rank, args.threads, args.repeats, args.warmup, rates)
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
    end_rates = (machine.core_sgemm_gflops(args.threads), machine.dgemm_gflops(args.threads))
    info["sgemm_peak_gflops_end"], info["dgemm_peak_gflops_end"] = end_rates
    rates = (max(rates[0], end_rates[0]), max(rates[1], end_rates[1]))
    info["sgemm_peak_gflops"], info["dgemm_peak_gflops"] = rates
    print(f"# sgemm peak at the end {end_rates[0]:.1f} GFLOP/s, dgemm {end_rates[1]:.1f}; floors use the best: "
          f"{rates[0]:.1f} / {rates[1]:.1f}", flush=True)
    refloor(results, rates)
    md = markdown(results)
    print("\n" + md)
    print(acceptance(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=2, default=str))
    Path(args.out + ".md").write_text(md + "\n" + acceptance(results) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
