"""A whole federated round of a 7B-class model through the streaming Aggregator, in bounded
memory on a CPU server (issue 15).

    python benchmarks/bench_round.py --model llama-2-7b --clients 80 --mix heavy_tail_strong

Every client's factors (all layers x 7 LoRA modules, ranks from the mix's client types of
server/assets/workloads.json) are generated when the client "arrives" and dropped after
``Aggregator.add``, one client at a time, as a server would receive them. The aggregator
runs ``method="auto"`` under ``--max-state-bytes`` (default 12 GiB): the dense
accumulators of a 7B round (~26 GB in fp32) do not fit, so auto takes the one-pass sketch
route. Then ``finalize`` and ``GlobalAdapter.client_factors`` for every rank type.

Prints: the machine and load, the projected state of each route for the chosen model and
for every model in workloads.json (70B included), wall time per phase, peak RSS (VmHWM of
this process), and err/opt (``||dW - U S Vt||_F / ||dW - optimum||_F``) of ``--check``
modules whose dense dW is accumulated on the side (in float32, untimed) and whose optimum
comes from a full SVD. ``--clients-run N`` streams only the first N clients and projects
the round's time from the per-client median (the state is allocated by the first client, so
peak RSS is already the round's); the output says so. Writes results/bench_round.{json,md}.
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

from server.bench.accuracy import optimum_residual
from server.bench.cases import client_types, lora_module_shapes, target_group
from server.bench.machine import cpu_model
from server.bench.measure import vm_hwm_mb
from server.bench.report import markdown_table
from server.workloads.catalog import load_workloads

ROOT = Path(__file__).resolve().parent


def client_factors(wl, model, ctype, client, layers, seed):
    """One client's peft-named factors, trained-LoRA-like (decaying spectrum per client);
    module m of client c always gets the same numbers (seeded by (seed, c, m))."""
    shapes = lora_module_shapes(wl["models"][model])
    out = {}
    for layer in range(layers):
        for i, target in enumerate(wl["lora_targets"]):
            out.update(module_factors(wl, shapes, ctype, client, layer, i, target, seed))
    return out


def module_factors(wl, shapes, ctype, client, layer, i, target, seed):
    d_out, d_in = shapes[target]
    r = wl["client_types"][ctype][target_group(target)]
    rng = np.random.default_rng([seed, client, layer, i])
    decay = (1.0 / np.sqrt(1.0 + np.arange(r))).astype(np.float32)
    B = rng.standard_normal((d_out, r), np.float32)
    B *= decay * np.float32(0.01)
    A = rng.standard_normal((r, d_in), np.float32)
    A *= np.float32(1.0 / np.sqrt(d_in))
    name = f"model.layers.{layer}.{'self_attn' if target_group(target) == 'attn' else 'mlp'}.{target}"
    return {name + ".lora_B.weight": B, name + ".lora_A.weight": A}


def round_clients(wl, mix, clients, seed):
    """The round's clients: their types in arrival order (a seeded shuffle, not grouped by type)
    and their numbers of examples."""
    types = client_types(wl["rank_distributions"][mix], clients)
    types = [types[i] for i in np.random.default_rng([seed, 1]).permutation(len(types))]
    n_examples = np.random.default_rng(seed).integers(50, 500, len(types))
    return types, n_examples


def projected(wl, model, types, max_rank, sketch_size=None, core_size=None):
    """Bytes of state per route for one round of `types` clients (server.core.linalg)."""
    from server.core import linalg
    shapes = lora_module_shapes(wl["models"][model])
    layers = wl["models"][model]["layers"]
    tot = {"factors": 0, "dense": 0, "auto": 0, "sketch": 0}  # sketch test maps: regenerated, 0 bytes
    for target in wl["lora_targets"]:
        d_out, d_in = shapes[target]
        R = sum(wl["client_types"][t][target_group(target)] for t in types)
        b = linalg.route_state_bytes(d_out, d_in, R, max_rank, sketch_size=sketch_size,
                                     core_size=core_size)
        for k in tot:
            tot[k] += layers * b[k]
    return tot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--clients", type=int, default=80)
    ap.add_argument("--mix", default="heavy_tail_strong")
    ap.add_argument("--max-rank", type=int, default=200)
    ap.add_argument("--layers", type=int, default=None, help="default: all of the model's")
    ap.add_argument("--max-state-bytes", type=float, default=12 * 2**30)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--sketch-size", type=int, default=None)
    ap.add_argument("--core-size", type=int, default=None)
    ap.add_argument("--clients-run", type=int, default=None,
                    help="stream only the first N clients; the round's time is projected")
    ap.add_argument("--check", default="model.layers.0.self_attn.q_proj,model.layers.0.mlp.down_proj",
                    help="modules whose err/opt is checked against the dense result ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(ROOT.parent / "results" / "bench_round"))
    args = ap.parse_args(argv)

    from server.core import linalg
    from server.core.aggregation import Aggregator
    wl = load_workloads()
    model = wl["models"][args.model]
    layers = args.layers or model["layers"]
    types, n_examples = round_clients(wl, args.mix, args.clients, args.seed)
    alpha = float(wl["lora_alpha"])
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
            "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "numpy": np.__version__}
    print("# machine:", json.dumps(info), flush=True)
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    print(f"# {args.model}: {layers} layers x {len(wl['lora_targets'])} modules, {args.clients} clients "
          f"({args.mix}: {counts}), max_rank {args.max_rank}", flush=True)

    proj = {}
    for name in wl["models"]:
        proj[name] = projected(wl, name, types, args.max_rank, args.sketch_size, args.core_size)
        p = proj[name]
        print(f"# projected state, {name} ({wl['models'][name]['layers']} layers, this mix, {args.clients} "
              f"clients): factors {p['factors'] / 2**30:.1f} GiB, dense {p['dense'] / 2**30:.1f} GiB, "
              f"auto {p['auto'] / 2**30:.1f} GiB, sketch {p['sketch'] / 2**30:.2f} GiB at the default k = 2 rank + 1 "
              "(under --max-state-bytes the sketches are sized to use the budget instead)", flush=True)

    check = [m for m in args.check.split(",") if m]
    shapes = lora_module_shapes(model)
    side = {}
    for m in check:
        target = m.rsplit(".", 1)[1]
        side[m] = np.zeros(shapes[target], np.float32)

    agg = Aggregator(args.max_rank, method=args.method, threads=args.threads,
                     max_state_bytes=None if args.method != "auto" else int(args.max_state_bytes),
                     sketch_size=args.sketch_size, core_size=args.core_size, seed=args.seed)
    run = args.clients if args.clients_run is None else min(args.clients_run, args.clients)
    gen_times, add_times = [], []
    total_w = float(np.sum(n_examples))
    t_round = time.perf_counter()
    for c in range(run):
        t0 = time.perf_counter()
        f = client_factors(wl, args.model, types[c], c, layers, args.seed)
        t1 = time.perf_counter()
        agg.add(f, num_examples=int(n_examples[c]), alpha=alpha, client_id=f"c{c}")
        t2 = time.perf_counter()
        for m in check:  # dense reference on the side (untimed)
            B, A = f[m + ".lora_B.weight"], f[m + ".lora_A.weight"]
            linalg.weighted_sum([B], [A], [float(n_examples[c]) * alpha / B.shape[1]], out=side[m])
        del f
        gen_times.append(t1 - t0)
        add_times.append(t2 - t1)
        if c == 0 or (c + 1) % 10 == 0 or c + 1 == run:
            print(f"  client {c + 1}/{run} ({types[c]}): generate {t1 - t0:.1f} s, add {t2 - t1:.1f} s; "
                  f"state {agg.state_bytes() / 2**30:.2f} GiB, peak RSS {vm_hwm_mb() / 1024:.2f} GiB, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    stream_s = time.perf_counter() - t_round
    routes = sorted(set(agg.routes_planned().values()))
    sketch_k = sorted({st.sketch.k for st in agg._modules.values() if st.sketch is not None})
    t0 = time.perf_counter()
    g = agg.finalize()
    finalize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_rank = {}
    for ctype, spec in wl["client_types"].items():
        pattern = {m: spec[target_group(m.rsplit(".", 1)[1])] for m in g.modules}
        t1 = time.perf_counter()
        cf = g.client_factors(rank=pattern, alpha=alpha)
        per_rank[ctype] = {"seconds": time.perf_counter() - t1,
                           "bytes": int(sum(v.nbytes for v in cf.values()))}
        del cf
    client_s = time.perf_counter() - t0
    print(f"  streamed {run} clients in {stream_s:.1f} s (generate {sum(gen_times):.1f} s, add {sum(add_times):.1f} s); "
          f"finalize {finalize_s:.1f} s; client factors for {len(per_rank)} rank types {client_s:.1f} s; "
          f"routes {routes}" + (f", sketch k {sketch_k}" if sketch_k else ""), flush=True)

    errs = {}
    if run == args.clients:
        import torch
        torch.set_num_threads(args.threads)
        for m in check:
            dW = torch.from_numpy(side[m] / np.float32(total_w))
            s = torch.linalg.svdvals(dW).double().numpy()
            opt = optimum_residual(s, args.max_rank)
            U, S, Vt = g.modules[m]
            err = float(torch.linalg.norm(dW.double() - torch.from_numpy(U * S).double() @ torch.from_numpy(Vt).double()))
            errs[m] = {"err_over_opt": err / opt, "route": g.routes[m]}
            print(f"  {m}: err/opt {err / opt:.4f} ({g.routes[m]})", flush=True)
    else:
        print("  err/opt needs the whole round (--clients-run < --clients): skipped", flush=True)

    add_med = statistics.median(add_times)
    res = {"machine": info, "args": vars(args), "model": args.model, "layers": layers,
           "clients": args.clients, "clients_run": run, "mix": args.mix, "counts": counts,
           "routes": routes, "sketch_k": sketch_k[0] if len(sketch_k) == 1 else (sketch_k or None),
           "projected_state_bytes": proj, "stream_s": stream_s,
           "generate_s": sum(gen_times), "add_s": sum(add_times), "add_median_s": add_med,
           "finalize_s": finalize_s, "client_factors_s": client_s, "per_rank_type": per_rank,
           "peak_rss_gib": vm_hwm_mb() / 1024, "state_gib": agg.state_bytes() / 2**30,
           "errors": errs, "loadavg_end": os.getloadavg()}
    if run < args.clients:
        # clients are not alike (ranks differ by type): scale the add time by total rank
        rank_of = {t: sum(wl["client_types"][t][target_group(x)] for x in wl["lora_targets"])
                   for t in counts}
        done = sum(rank_of[t] for t in types[:run])
        allr = sum(rank_of[t] for t in types)
        res["projected_round_s"] = (sum(add_times) * allr / done) + finalize_s + client_s
        res["projected_round_s_with_generation"] = res["projected_round_s"] + sum(gen_times) * allr / done
    wall = stream_s + finalize_s + client_s
    res["wall_s"] = wall
    print(f"\nRESULT {args.model} {args.clients} clients {args.mix}: wall {wall:.1f} s for {run} clients "
          f"(of which generating factors {sum(gen_times):.1f} s)"
          + (f", projected round {res['projected_round_s']:.0f} s without generation" if run < args.clients else "")
          + f"; peak RSS {res['peak_rss_gib']:.2f} GiB (goal < 16 GiB); state {res['state_gib']:.2f} GiB; "
          f"load {info['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2, default=str))
    md = [f"`python benchmarks/bench_round.py {' '.join(sys.argv[1:])}` on {info['cpu']} ({info['cores']} cores), "
          f"load {info['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}", "",
          f"- {args.model}, {layers} layers x 7 modules, {run}/{args.clients} clients streamed ({args.mix}), routes {routes}"
          + (f", sketch k {res['sketch_k']}" if res.get("sketch_k") else ""),
          f"- wall {wall:.1f} s (generate {sum(gen_times):.1f} s, add {sum(add_times):.1f} s, finalize {finalize_s:.1f} s, "
          f"client factors {client_s:.1f} s)",
          f"- peak RSS {res['peak_rss_gib']:.2f} GiB, aggregator state {res['state_gib']:.2f} GiB"]
    if "projected_round_s" in res:
        md.append(f"- projected whole round (add time scaled by total rank): {res['projected_round_s']:.0f} s")
    for m, e in errs.items():
        md.append(f"- {m}: err/opt {e['err_over_opt']:.4f} ({e['route']})")
    md += [""] + markdown_table(
        ["model", "factors GiB", "dense GiB", "auto GiB", "sketch GiB"],
        [[name, f"{p['factors'] / 2**30:.1f}", f"{p['dense'] / 2**30:.1f}", f"{p['auto'] / 2**30:.1f}",
          f"{p['sketch'] / 2**30:.2f}"] for name, p in proj.items()], align="lrrrr")
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
