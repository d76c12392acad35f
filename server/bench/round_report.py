"""The report of ``benchmarks/bench_aggregation.py``: its markdown tables and the acceptance lines
of issues 2 and 15, both from the run's results dict (or its JSON read back)."""

from __future__ import annotations

from types import SimpleNamespace

from server.bench.report import fmt, markdown_table


def markdown(results: dict) -> str:
    """The tables of a run's results (``main``'s dict, or its JSON read back)."""
    info, args, extras = results["machine"], SimpleNamespace(**results["args"]), results.get("extras", {})
    per_shape, sketch_rows = results.get("per_shape", {}), results.get("sketch_sizes", {})
    rows = [(mix, method, r) for mix, mixres in results["mixes"].items() for method, r in mixres.items()]
    lines = [f"Machine: {info['cpu']}, {info['threads']} threads; sgemm peak "
             f"{info['sgemm_peak_gflops']:.1f} GFLOP/s. Scale `{args.scale}`, max_rank {args.rank}, "
             f"median of {args.repeats} (reference: {args.reference_repeats}); methods timed "
             f"round-robin in one run." + (f" Reference timed on {args.reference_layers} "
             f"layer(s), scaled to all." if args.reference_layers else ""), "",
             f"dgemm {info['dgemm_peak_gflops']:.1f} GFLOP/s; load average {info['loadavg_start'][0]:.2f} at the "
             f"start, {info['loadavg_end'][0]:.2f} at the end. Floor = FLOPs at the measured GEMM rates "
             f"(float32 part at sgemm, float64 part at dgemm); x floor = median / floor.", ""]
    lines += markdown_table(
        ["mix", "method", "median s", "spread s", "vs reference", "vs torch", "err / optimum", "peak RSS +MB",
         "GFLOP", "of which f64", "floor s", "x floor", "GFLOP/s", "% sgemm peak"],
        [[mix, method + (f" ({'/'.join(r['routes'])})" if "routes" in r else ""), f"{r['median_s']:.3f}",
          f"{r['max_s'] - r['min_s']:.3f}", f"{fmt(r.get('speedup_vs_reference'), '.1f')}x",
          f"{fmt(r.get('speedup_vs_torch'), '.2f')}x", f"{r['error_ratio']:.6f}", f"{r['peak_rss_mb']:.0f}",
          f"{r['flops'] / 1e9:.1f}", f"{r['flops_f64'] / 1e9:.1f}", f"{r['floor_s']:.3f}", f"{r['x_floor']:.2f}",
          f"{r['gflops']:.1f}", f"{100 * r['gflops'] / info['sgemm_peak_gflops']:.0f}%"] for mix, method, r in rows],
        align="ll" + "r" * 12)
    if per_shape:
        lines += ["", "Per shape (one module of each shape, first layer; floor as above):", ""]
        lines += markdown_table(
            ["mix", "shape", "R", "auto ms", "auto vs torch", "auto err/opt", "auto x floor", "exact ms",
             "exact vs torch", "exact err/opt", "exact x floor", "torch ms", "torch err/opt"],
            [[mix, r["shape"], r["R"]] + [
                cell for k in ("auto", "exact") for cell in (
                    f"{1e3 * r[k]['median_s']:.1f}", f"{r[k]['speedup_vs_torch']:.2f}x",
                    f"{r[k]['error_ratio']:.6f}", f"{r[k]['x_floor']:.2f}")]
             + [f"{1e3 * r['torch']['median_s']:.1f}", f"{r['torch']['error_ratio']:.6f}"]
             for mix, rws in per_shape.items() for r in rws],
            align="ll" + "r" * 11)
    if args.sketch_sizes and sketch_rows:
        lines += ["", "Sketch route: err/opt against the sketch size k (core s = 2k + 1), one module per shape:", ""]
        lines += markdown_table(
            ["mix", "shape", "R", "default k", "err/opt at default", "smallest k with err/opt <= 1.05",
             "all (k: err/opt)"],
            [[mix, r["shape"], r["R"], r["default_k"], f"{r['default_err']:.4f}", r["k_for_target"] or "> tried",
              ", ".join(f"{k}: {e['err_over_opt']:.4f}" for k, e in sorted(r["errors"].items(), key=lambda ke: int(ke[0])))]
             for mix, rws in sketch_rows.items() for r in rws],
            align="llrrrr")
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
    # issue 2's targets for auto: x reference, x torch, err/opt bound (and as printed), digits printed
    for mix, word, vs_ref, vs_torch, bound, text, digits in (
            ("heavy_tail_light", "light", 10, 2, 1 + 1e-4, "1+1e-4", 7),
            ("heavy_tail_strong", "strong", 2.5, 1, 1.01, "1.01", 5)):
        if mix in m and {"auto", "reference", "torch"} <= set(m[mix]):
            a = m[mix]["auto"]
            line(a["speedup_vs_reference"] >= vs_ref,
                 f"{word}: auto {a['speedup_vs_reference']:.1f}x vs reference (>= {vs_ref}x)")
            line(a["speedup_vs_torch"] >= vs_torch, f"{word}: auto {a['speedup_vs_torch']:.2f}x vs torch (>= {vs_torch}x)")
            line(a["error_ratio"] <= bound, f"{word}: error/optimum {a['error_ratio']:.{digits}f} (<= {text})")
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

