"""err/opt against the memory budget for one layer of a model's round (issue 22, item 3): the
curve behind ``bench_round.py``'s whole-model run.

    python benchmarks/bench_round_curve.py --model llama-2-7b --clients 80 --mix heavy_tail_strong \
        --budgets-gib 3,4,6,8,10,12,16,20,26

A whole-model budget of B GiB is run as one layer (layer 0: its 7 modules, the factors
``bench_round.py`` generates for layer 0, the same sketch maps) under B / layers: the
aggregator sizes its sketches with one common k over the modules it sees
(``linalg.sketch_sizes_for_budget``), so one layer under B / layers buys the k the whole model
buys under B, and layer 0's err/opt is the whole round's (``bench_round.py`` checks layer-0
modules of the whole model the same way). The clients arrive in bench_round's order, with its
numbers of examples. The dense dW of every module and its optimum (float64 tail of a full SVD)
are computed once, on the side, and every budget's ``finalize`` is checked against them.
Budgets at or above the dense state go to the dense route (``auto``). Each budget also reports
the layer's add time per client (median), scaled to the whole model.

Writes results/bench_round_curve.{json,md}.
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
sys.path.insert(0, str(ROOT))

from bench_round import client_factors, round_clients  # noqa: E402

from server.bench.accuracy import optimum_residual  # noqa: E402
from server.bench.machine import short_info  # noqa: E402


def reference(wl, model, types, n_examples, seed, threads):
    """Per module of layer 0: the dense dW (float64) and the optimum's residual at each rank."""
    import torch

    from server.core import linalg
    alpha = float(wl["lora_alpha"])
    side = {}
    for c, t in enumerate(types):
        f = client_factors(wl, model, t, c, 1, seed)
        for key, B in f.items():
            if not key.endswith(".lora_B.weight"):
                continue
            m = key[: -len(".lora_B.weight")]
            A = f[m + ".lora_A.weight"]
            if m not in side:
                side[m] = np.zeros((B.shape[0], A.shape[1]), np.float32)
            linalg.weighted_sum([B], [A], [float(n_examples[c]) * alpha / B.shape[1]], out=side[m])
    total = float(np.sum(n_examples))
    torch.set_num_threads(threads)
    out = {}
    for m, acc in side.items():
        dW = torch.from_numpy(acc / np.float32(total)).double()
        out[m] = (dW, torch.linalg.svdvals(dW).numpy())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--clients", type=int, default=80)
    ap.add_argument("--mix", default="heavy_tail_strong")
    ap.add_argument("--max-rank", type=int, default=200)
    ap.add_argument("--budgets-gib", default="3,4,6,8,10,12,16,20,26",
                    help="whole-model budgets (GiB of aggregator state)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(ROOT.parent / "results" / "bench_round_curve"))
    args = ap.parse_args(argv)

    import torch

    from server.core.aggregation import Aggregator
    from server.workloads.catalog import load_workloads
    wl = load_workloads()
    layers = wl["models"][args.model]["layers"]
    alpha = float(wl["lora_alpha"])
    info = short_info(args.threads)
    info["loadavg_start"] = os.getloadavg()
    print("# machine: " + json.dumps(info), flush=True)
    types, n_examples = round_clients(wl, args.mix, args.clients, args.seed)
    t0 = time.perf_counter()
    ref = reference(wl, args.model, types, n_examples, args.seed, args.threads)
    print(f"# dense reference of layer 0 ({len(ref)} modules, {args.clients} clients): "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    points = []
    for gib in [float(x) for x in args.budgets_gib.split(",")]:
        budget = int(gib * 2**30 / layers)
        agg = Aggregator(args.max_rank, method="auto", threads=args.threads, max_state_bytes=budget,
                         seed=args.seed)
        adds = []
        for c, t in enumerate(types):
            f = client_factors(wl, args.model, t, c, 1, args.seed)
            t1 = time.perf_counter()
            agg.add(f, num_examples=int(n_examples[c]), alpha=alpha, client_id=f"c{c}")
            adds.append(time.perf_counter() - t1)
            del f
        routes = sorted(set(agg.routes_planned().values()))
        ks = sorted({st.sketch.k for st in agg._modules.values() if st.sketch is not None})
        state = agg.state_bytes()
        t1 = time.perf_counter()
        g = agg.finalize()
        fin = time.perf_counter() - t1
        errs = {}
        for m, (dW, s) in ref.items():
            U, S, Vt = g.modules[m]
            err = float(torch.linalg.norm(dW - torch.from_numpy(U * S).double() @ torch.from_numpy(Vt).double()))
            errs[m.split("layers.0.")[1]] = err / optimum_residual(s, args.max_rank)
        p = {"budget_gib": gib, "model_state_gib": state * layers / 2**30, "routes": routes,
             "sketch_k": ks[0] if len(ks) == 1 else (ks or None), "err_over_opt": errs,
             "max_err_over_opt": max(errs.values()), "add_median_s_model": statistics.median(adds) * layers,
             "add_s_model": sum(adds) * layers, "finalize_s_model": fin * layers, "load": os.getloadavg()[0]}
        points.append(p)
        print(f"budget {gib:g} GiB: state {p['model_state_gib']:.2f} GiB, routes {routes}, k {p['sketch_k']}, "
              f"worst err/opt {p['max_err_over_opt']:.4f} ({', '.join(f'{k} {v:.3f}' for k, v in errs.items())}); "
              f"whole model: add {p['add_median_s_model']:.1f} s per client (median), {p['add_s_model']:.0f} s "
              f"for the round, finalize {p['finalize_s_model']:.0f} s; load {p['load']:.2f}", flush=True)
        del agg, g
    names = list(points[0]["err_over_opt"]) if points else []
    md = [f"`python benchmarks/bench_round_curve.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
          f"{info['cpu']} ({info['cores']} cores, {args.threads} threads), load {info['loadavg_start'][0]:.2f} at start: "
          f"{args.model}, {args.clients} clients ({args.mix}), max_rank {args.max_rank}; layer 0 run under budget / "
          f"{layers}; state, add and finalize times scaled to the {layers} layers", "",
          "| budget GiB | state GiB | route | k | " + " | ".join(n.split(".")[1] for n in names)
          + " | worst err/opt | add s per client (median) | add s, round | finalize s |",
          "| ---: | ---: | --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: | ---: |"]
    for p in points:
        md.append(f"| {p['budget_gib']:g} | {p['model_state_gib']:.2f} | {'/'.join(p['routes'])} | {p['sketch_k'] or '-'} | "
                  + " | ".join(f"{p['err_over_opt'][n]:.3f}" for n in names)
                  + f" | {p['max_err_over_opt']:.3f} | {p['add_median_s_model']:.1f} | {p['add_s_model']:.0f} "
                  f"| {p['finalize_s_model']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"machine": info, "args": vars(args), "points": points},
                                                   indent=2, default=str))
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
