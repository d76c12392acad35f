"""err/opt against the memory budget: what each aggregation route needs to hold to reach an
accuracy, on the synthetic rank mixes of server/assets/workloads.json (issue 22, item 2).

    python benchmarks/bench_budget.py                                   # all four mixes, ~10 min on 2 cores
    python benchmarks/bench_budget.py --mixes heavy_tail_strong --shapes 2048x2048

One module of each distinct shape of the scale's model (`cpu_small`: llama-1.3b, 2048x2048,
5504x2048, 2048x5504; 20 clients with ranks from the mix, max_rank 200), generated as in
bench_aggregation.py. Per route, the bytes the streaming Aggregator holds for that module at
the end of the round (server.core.linalg.route_state_bytes): `exact` and `randomized` keep the
clients' factors, R (d_out + d_in) floats; `dense` one d_out x d_in accumulator; `sketch`
k (d_out + d_in) + s^2 floats, with (k, s) what the budget buys
(server.core.linalg.sketch_sizes_for_budget: Aggregator(max_state_bytes=B) sizes its sketches
so). err/opt = ||dW - U S Vt||_F / ||dW - optimum||_F, dW and the optimum's tail from a float64
SVD. For every route: the smallest budget with err/opt <= --target (1.05). The sketch's is found
by bisection on k between the budget fractions of the curve that bracket it. Times are medians
of --repeats runs of the route on that one module (threads: --threads).
Writes results/bench_budget.{json,md}.

    python benchmarks/bench_budget.py --updates DIR --out results/bench_budget_real

measures on real client updates instead (a folder from ``benchmarks/collect_updates.py``): the
replies of one round (``--round``, default the last) go through the server's own
``Aggregator.add_update`` (its weights n_k s_k, alpha patterns and rsLoRA as the server applies
them), and every module of ``--layers`` (default: the first, middle and last layer) is measured
at the rank the server truncates it to for its largest client (the largest client rank of that
module). The tables then give per module shape the worst module (the largest smallest-budget,
the largest err/opt) and the sketch curve's median and worst err/opt per budget fraction.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from server.bench.machine import short_info  # noqa: E402
from server.bench.rounds import first_of_each_shape, make_round  # noqa: E402
from server.workloads.catalog import load_workloads  # noqa: E402

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)


def err_over_opt(dW, tail, usv):
    U, S, Vt = usv
    err = np.linalg.norm(dW - (U.astype(np.float64) * S) @ Vt.astype(np.float64))
    return float(err / tail) if tail > 0 else (1.0 if err == 0 else float("inf"))


def tail_of(dW, rank):
    s = np.linalg.svd(dW, compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def run(mod, rank, threads, repeats, **kw):
    from server.core import linalg
    _, Bs, As, ws = mod
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = linalg.lowrank_svd(Bs, As, ws, rank, threads=threads, **kw)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def sketch_point(mod, dW, tail, rank, threads, repeats, k, s):
    from server.core import linalg
    m, n = dW.shape
    out, t = run(mod, rank, threads, repeats, method="sketch", sketch_size=k, core_size=s)
    return {"k": k, "s": s, "state_bytes": linalg.sketch_state_bytes(m, n, k, s),
            "err_over_opt": err_over_opt(dW, tail, out), "seconds": t}


def bench_module(mod, rank, threads, repeats, target, fractions):
    from server.core import linalg
    from server.core.oracles import reference_delta
    _, Bs, As, ws = mod
    dW = reference_delta(Bs, As, ws).double().numpy()
    m, n = dW.shape
    R = sum(b.shape[1] for b in Bs)
    tail = tail_of(dW, rank)
    states = linalg.route_state_bytes(m, n, R, rank)
    row = {"module": mod[0], "shape": f"{m}x{n}", "R": R, "dense_bytes": states["dense"], "routes": {}}
    for method, key in (("exact", "factors"), ("randomized", "factors"), ("dense", "dense")):
        out, t = run(mod, rank, threads, repeats, method=method)
        e = err_over_opt(dW, tail, out)
        row["routes"][method] = {"state_bytes": states[key], "err_over_opt": e, "seconds": t,
                                 "budget_for_target": states[key] if e <= target else None}
    curve = []
    for f in fractions:
        try:
            (k, s), = linalg.sketch_sizes_for_budget(rank, [(m, n)], int(f * states["dense"]))
        except ValueError:
            continue
        if curve and curve[-1]["k"] == k:
            continue
        curve.append({"fraction_of_dense": f, **sketch_point(mod, dW, tail, rank, threads, repeats, k, s)})
    ok = [p for p in curve if p["err_over_opt"] <= target]
    best = None
    if ok:  # bisection on k between the last failing and the first passing point
        hi = ok[0]
        fails = [p for p in curve if p["k"] < hi["k"] and p["err_over_opt"] > target]
        lo_k = fails[-1]["k"] if fails else rank - 1
        best = hi
        while hi["k"] - lo_k > max(4, hi["k"] // 50):
            mid = (lo_k + hi["k"]) // 2
            p = sketch_point(mod, dW, tail, rank, threads, 1, mid, 2 * mid + 1)
            if p["err_over_opt"] <= target:
                hi = best = p
            else:
                lo_k = mid
    row["routes"]["sketch"] = {"curve": curve, "budget_for_target": best["state_bytes"] if best else None,
                               "k_for_target": best["k"] if best else None}
    return row


def update_cost(shapes, client_ranks, rank, repeats, threads):
    """Seconds to add one client (rank r) to a module's sketch at the default sizes
    (k = 2 rank + 1, s = 2 k + 1), median of `repeats` after one warm-up; uses only the
    StreamingSketch API, so the same function times an older core for comparison."""
    from server.core import linalg
    rng = np.random.default_rng(0)
    out = []
    for m, n in shapes:
        for r in client_ranks:
            B = rng.standard_normal((m, r), np.float32)
            A = rng.standard_normal((r, n), np.float32)
            sk = linalg.StreamingSketch(m, n, rank)
            sk.add([B], [A], [1.0], threads=threads)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sk.add([B], [A], [1.0], threads=threads)
                times.append(time.perf_counter() - t0)
            out.append({"shape": f"{m}x{n}", "r": r, "k": sk.k, "s": sk.s, "median_s": statistics.median(times),
                        "min_s": min(times), "max_s": max(times)})
            print(f"update {m}x{n} r={r} k={sk.k} s={sk.s}: median {out[-1]['median_s'] * 1e3:.1f} ms "
                  f"[{min(times) * 1e3:.1f}, {max(times) * 1e3:.1f}] over {repeats}", flush=True)
    return out


def real_modules(folder, round_, layers):
    """``(rows of (module tuple, rank)), info``: one round's updates from ``folder`` (written by
    benchmarks/collect_updates.py), aggregated by the server's Aggregator (exact route: every
    client's factors and weight kept), the modules of the chosen layers."""
    import re

    from edge_client.wire import decode_update
    from server.core.aggregation import Aggregator
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    rounds = sorted({f["round"] for f in manifest["files"]})
    if not rounds:
        raise SystemExit(f"{folder}: the manifest lists no updates")
    round_ = rounds[-1] if round_ is None else round_
    files = [f for f in manifest["files"] if f["round"] == round_]
    if not files:
        raise SystemExit(f"{folder}: no updates from round {round_} (rounds: {rounds})")
    agg = Aggregator(10**6, method="exact")
    ranks: dict[str, list[int]] = {}
    for f in files:
        u = decode_update((folder / f["path"]).read_bytes())
        agg.add_update(u)
        for key, b in u.factors.items():
            if key.endswith(".lora_B.weight"):
                ranks.setdefault(key[: -len(".lora_B.weight")], []).append(int(b.shape[1]))
    layer_of = {m: int(re.search(r"layers\.(\d+)\.", m).group(1)) for m in agg.modules}
    n_layers = max(layer_of.values()) + 1
    want = sorted({0, n_layers // 2, n_layers - 1}) if layers is None else [int(x) for x in layers.split(",")]
    rows, skipped = [], []
    for m in agg.modules:
        if layer_of[m] not in want:
            continue
        st = agg._modules[m]
        rank = min(max(ranks[m]), st.d_out, st.d_in)
        if rank >= min(st.d_out, st.d_in):   # no truncation: every route is exact, err/opt is 0/0
            skipped.append(f"{m} ({st.d_out}x{st.d_in}, rank {rank})")
            continue
        rows.append(((m, list(st.Bs), list(st.As), list(st.ws)), rank))
    info = {"folder": str(folder), "round": round_, "clients": len(files), "layers": want,
            "model": manifest.get("model"), "command": manifest.get("command"),
            "client_ranks": sorted(f["rank"] for f in files),
            "skipped_untruncated": skipped}
    return rows, info


def real_markdown(info, args, rows, real):
    import collections
    lines = [f"Machine: {info['cpu']}, {args.threads or info['cores']} threads. Real client updates: "
             f"{real['model']}, round {real['round']} of `{real['command']}`: {real['clients']} clients, ranks "
             f"{real['client_ranks']}; layers {real['layers']}; each module truncated at its largest client rank; "
             f"target err/opt <= {args.target}."
             + (f" Not measured: {len(real['skipped_untruncated'])} modules whose rank is their full dimension "
                "(nothing is truncated)." if real.get("skipped_untruncated") else ""), "",
             "Smallest budget (MB of aggregator state per module) that reaches the target, worst module of each "
             "shape (exact and randomized keep the factors, dense one accumulator, sketch what the budget buys):", "",
             "| shape | modules | rank | R | dense MB | exact MB (worst err/opt) | randomized MB (worst err/opt) "
             "| dense MB (worst err/opt) | sketch MB (k) | cheapest |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by_shape = collections.defaultdict(list)
    for r in rows:
        by_shape[r["shape"]].append(r)
    for shape, rs in by_shape.items():
        def worst(route):
            budgets = [x["routes"][route]["budget_for_target"] for x in rs]
            e = max(x["routes"][route]["err_over_opt"] for x in rs)
            return (None if any(b is None for b in budgets) else max(budgets)), e
        cells, cands = [], {}
        for route in ("exact", "randomized", "dense"):
            b, e = worst(route)
            cells.append(f"{mb(b)} ({e:.4f})")
            if b is not None:
                cands[route] = b
        sk = [x["routes"]["sketch"]["budget_for_target"] for x in rs]
        skb = None if any(b is None for b in sk) else max(sk)
        if skb is not None:
            cands["sketch"] = skb
        kk = max((x["routes"]["sketch"]["k_for_target"] or 0) for x in rs)
        cheapest = min(cands, key=cands.get) if cands else "-"
        lines.append(f"| {shape} | {len(rs)} | {rs[0]['rank']} | {max(x['R'] for x in rs)} | {mb(rs[0]['dense_bytes'])} | "
                     + " | ".join(cells) + f" | {mb(skb)} ({kk if skb is not None else '-'}) | {cheapest} |")
    lines += ["", "Sketch route on the real updates: err/opt against the budget (fraction of the dense state), "
              "median and worst over the shape's modules:", "",
              "| shape | fraction: k, median err/opt, worst err/opt |", "| --- | --- |"]
    for shape, rs in by_shape.items():
        fr = collections.defaultdict(list)
        ks = {}
        for x in rs:
            for p in x["routes"]["sketch"]["curve"]:
                fr[p["fraction_of_dense"]].append(p["err_over_opt"])
                ks[p["fraction_of_dense"]] = p["k"]
        pts = ", ".join(f"{f:g}: k={ks[f]} {statistics.median(v):.3f} / {max(v):.3f}" for f, v in sorted(fr.items()))
        lines.append(f"| {shape} | {pts} |")
    return "\n".join(lines) + "\n"


def mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def markdown(info, args, rows):
    lines = [f"Machine: {info['cpu']}, {args.threads or info['cores']} threads; scale `{args.scale}`, max_rank "
             f"{args.rank}, target err/opt <= {args.target}; times are medians of {args.repeats}.", "",
             "Smallest budget (MB of aggregator state for the module) that reaches the target, per route:", "",
             "| mix | shape | R | dense MB | exact MB (err/opt) | randomized MB (err/opt) | dense MB (err/opt) "
             "| sketch MB (k) | cheapest |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for mix, mrows in rows.items():
        for r in mrows:
            rt = r["routes"]
            cands = {k: v["budget_for_target"] for k, v in rt.items() if v["budget_for_target"] is not None}
            cheapest = min(cands, key=cands.get) if cands else "-"
            cells = [f"{mb(rt[k]['budget_for_target'])} ({rt[k]['err_over_opt']:.4f})" for k in ("exact", "randomized", "dense")]
            lines.append(f"| {mix} | {r['shape']} | {r['R']} | {mb(r['dense_bytes'])} | " + " | ".join(cells) +
                         f" | {mb(rt['sketch']['budget_for_target'])} ({rt['sketch']['k_for_target']}) | {cheapest} |")
    lines += ["", "Sketch route: err/opt against the budget (k, s = 2k + 1 as sketch_sizes_for_budget buys them):", "",
              "| mix | shape | budget / dense state: k, err/opt, seconds |", "| --- | --- | --- |"]
    for mix, mrows in rows.items():
        for r in mrows:
            pts = ", ".join(f"{p['fraction_of_dense']:g}: k={p['k']} {p['err_over_opt']:.3f} {p['seconds']:.1f}s"
                            for p in r["routes"]["sketch"]["curve"])
            lines.append(f"| {mix} | {r['shape']} | {pts} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="cpu_small")
    ap.add_argument("--mixes", default="heavy_tail_light,heavy_tail_strong,uniform,normal")
    ap.add_argument("--shapes", default=None, help="comma list like 2048x2048 (default: every shape)")
    ap.add_argument("--rank", type=int, default=200)
    ap.add_argument("--target", type=float, default=1.05)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                    help="sketch budgets as fractions of the module's dense state")
    ap.add_argument("--out", default=str(ROOT.parent / "results" / "bench_budget"))
    ap.add_argument("--update-cost", type=int, default=0, metavar="REPEATS",
                    help="only time one client's sketch update at the default sizes (median of REPEATS) and exit")
    ap.add_argument("--updates", default=None, metavar="DIR",
                    help="measure on real client updates (a folder from benchmarks/collect_updates.py)")
    ap.add_argument("--round", type=int, default=None, help="with --updates: the round (default: the last)")
    ap.add_argument("--layers", default=None, help="with --updates: comma list of layers (default: first, middle, last)")
    args = ap.parse_args(argv)
    wl = load_workloads()
    info = short_info(args.threads or os.cpu_count())
    print("machine: " + json.dumps(info), flush=True)
    if args.update_cost:
        update_cost([(2048, 2048), (5504, 2048)], [8, 200], args.rank, args.update_cost, args.threads)
        return 0
    fractions = [float(x) for x in args.fractions.split(",")]
    if args.updates:
        mods, real = real_modules(args.updates, args.round, args.layers)
        print("real updates: " + json.dumps(real), flush=True)
        rows = []
        for mod, rank in mods:
            r = bench_module(mod, rank, args.threads, args.repeats, args.target, fractions)
            r["rank"] = rank
            rt = r["routes"]
            print(f"{mod[0]} {r['shape']} rank {rank} R={r['R']}: " + ", ".join(
                f"{k} err/opt {rt[k]['err_over_opt']:.4f}" for k in ("exact", "randomized", "dense"))
                + "; sketch " + ", ".join(f"k={p['k']} {p['err_over_opt']:.3f}" for p in rt["sketch"]["curve"])
                + f" -> {mb(rt['sketch']['budget_for_target'])} MB (k={rt['sketch']['k_for_target']})", flush=True)
            rows.append(r)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args), "real": real,
                                                        "rows": rows}, indent=2))
        md = real_markdown(info, args, rows, real)
        out.with_suffix(".md").write_text(md)
        print(md)
        return 0
    wanted = None if args.shapes is None else set(args.shapes.split(","))
    rows = {}
    for mix in args.mixes.split(","):
        modules, _ = make_round(wl, args.scale, mix, layers=1)
        rows[mix] = []
        for mod, _tail, m, n in first_of_each_shape(modules, [None] * len(modules)):
            if wanted is not None and f"{m}x{n}" not in wanted:
                continue
            r = bench_module(mod, args.rank, args.threads, args.repeats, args.target, fractions)
            rt = r["routes"]
            print(f"[{mix}] {r['shape']} R={r['R']}: " + ", ".join(
                f"{k} {mb(rt[k]['state_bytes'])} MB err/opt {rt[k]['err_over_opt']:.4f} {rt[k]['seconds']:.1f}s"
                for k in ("exact", "randomized", "dense")) + "; sketch " + ", ".join(
                f"k={p['k']} {mb(p['state_bytes'])} MB {p['err_over_opt']:.3f}" for p in rt["sketch"]["curve"])
                + f" -> smallest for {args.target}: {mb(rt['sketch']['budget_for_target'])} MB "
                f"(k={rt['sketch']['k_for_target']})", flush=True)
            rows[mix].append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2))
    md = markdown(info, args, rows)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
