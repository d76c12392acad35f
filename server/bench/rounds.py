"""Whole aggregation rounds, for ``benchmarks/bench_aggregation.py``: a synthetic round from the
workloads catalogue, the routes it times, their FLOP counts and err/opt against the optimum.

A round is a list of modules ``(name, Bs, As, weights)``: every client's LoRA factors of one
module and its weight ``p_k alpha / r_k``. The routes: ours (``server.core.linalg`` with a
method), torch's best (one matmul over the concatenated factors, then
``torch.svd_lowrank(q=rank + 10, niter=2)``) and the reference of :mod:`server.core.oracles`
(per-client ``B @ A`` summed in torch, a full SVD per module).
"""

from __future__ import annotations

import numpy as np

from server.bench import accuracy
from server.bench import flops as F
from server.bench.cases import client_types, lora_module_shapes, target_group


def make_round(wl: dict, scale: str, mix: str, seed: int = 0, layers: int | None = None):
    """``(modules, client types)`` of one round at ``wl["bench_scales"][scale]`` with the rank mix
    ``mix``: trained-LoRA-like factors, a decaying spectrum per client."""
    sc = wl["bench_scales"][scale]
    shapes = lora_module_shapes(wl["models"][sc["model"]])
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
                r = wl["client_types"][t][target_group(target)]
                decay = (1.0 / np.sqrt(1.0 + np.arange(r))).astype(np.float32)
                Bs.append((rng.standard_normal((d_out, r), np.float32) * decay * 0.01))
                As.append(rng.standard_normal((r, d_in), np.float32) / np.float32(np.sqrt(d_in)))
                ws.append(float(p[k] * alpha / r))
            modules.append((f"layers.{layer}.{target}", Bs, As, ws))
    return modules, types


def dims(module) -> tuple[int, int, int]:
    """``(d_out, d_in, R)`` of a module, R the clients' total rank."""
    _, Bs, As, _ = module
    return Bs[0].shape[0], As[0].shape[1], sum(b.shape[1] for b in Bs)


# ---- the routes ----------------------------------------------------------------------------

def run_ours(modules, rank: int, method: str, threads: int):
    from server.core import linalg

    return linalg.lowrank_svd_batched([(B, A) for _, B, A, _ in modules], [w for *_, w in modules], rank,
                                      method=method, threads=threads)


def run_torch(modules, rank: int):
    import torch

    out = []
    for _, Bs, As, ws in modules:
        B = torch.cat([torch.from_numpy(b) for b in Bs], 1)
        A = torch.cat([torch.from_numpy(a) * w for a, w in zip(As, ws)], 0)
        U, S, V = torch.svd_lowrank(B @ A, q=rank + 10, niter=2)
        out.append((U[:, :rank].numpy(), S[:rank].numpy(), V[:, :rank].T.numpy()))
    return out


def run_reference(modules, rank: int):
    """``server.core.oracles.reference_lowrank_svd`` per module: ``([(U, S, Vt) at rank], [all of S])``.

    It is asked for the full rank, so the optimum comes from the singular values its full SVD
    computes anyway, not from a second SVD; copying all of U and Vt adds well under 1% to it."""
    from server.core.oracles import reference_lowrank_svd

    out, spectra = [], []
    for _, Bs, As, ws in modules:
        U, S, Vt = reference_lowrank_svd(Bs, As, ws, min(Bs[0].shape[0], As[0].shape[1]))
        out.append((U[:, :rank], S[:rank], Vt[:rank]))
        spectra.append(S)
    return out, spectra


# ---- accuracy ------------------------------------------------------------------------------

def optimum_tails(modules, rank: int, spectra=()):
    """``(dW, ||dW - optimum||_F)`` per module (untimed): dW from ``server.core.oracles.reference_delta``,
    the optimum from ``spectra[i]`` (all singular values, e.g. the reference's) where given, else
    from ``torch.linalg.svdvals``."""
    import torch

    from server.core.oracles import reference_delta

    out = []
    for i, (_, Bs, As, ws) in enumerate(modules):
        dW = reference_delta(Bs, As, ws)
        S = spectra[i] if i < len(spectra) else torch.linalg.svdvals(dW).numpy()
        out.append((dW, accuracy.optimum_residual(S, rank)))
    return out


def error_ratio(tails, svds) -> float:
    """The worst ``||dW - U S Vt||_F / ||dW - optimum||_F`` over the modules (the residual in float32
    like dW itself, its norm in float64)."""
    import torch

    worst = 0.0
    for (dW, tail), (U, S, Vt) in zip(tails, svds):
        approx = torch.from_numpy(np.ascontiguousarray(U * S)) @ torch.from_numpy(np.ascontiguousarray(Vt))
        err = float(torch.linalg.norm((dW - approx).double()))
        worst = max(worst, accuracy.ratio_to_optimum(err, tail))
    return worst


# ---- cost ----------------------------------------------------------------------------------

def route_flops(modules, rank: int, route: str) -> tuple[float, float]:
    """``(FLOPs, of which float64)`` of a route over the modules: ours from ``server.core.linalg.plan``'s
    cost model, the sketch, torch (our dense route's count) and the reference (forming dW, then a
    full SVD) from :mod:`server.bench.flops`."""
    from server.core import linalg

    total = f64 = 0.0
    for module in modules:
        m, n, R = dims(module)
        p = linalg.plan(m, n, R, rank)
        if route == "auto":
            total += p.flops[p.method]
            f64 += p.flops_f64.get(p.method, 0.0)
        elif route in p.flops:
            q = linalg.plan(m, n, R, rank, method=route)
            total += q.flops[route]
            f64 += q.flops_f64.get(route, 0.0)
        elif route == "sketch":
            total += F.sketch_one_pass(m, n, R, rank, *linalg.sketch_sizes(rank, m, n))
        elif route == "torch":
            total += linalg.plan(m, n, R, rank, method="dense").flops["dense"]
        else:
            total += F.form_factored(m, n, R) + F.svd_sigma_v(m, n)
    return total, f64


def auto_routes(modules, rank: int) -> list[str]:
    """The routes ``auto`` takes over the modules (``server.core.linalg.plan``)."""
    from server.core import linalg

    return sorted({linalg.plan(*dims(module), rank).method for module in modules})


def first_of_each_shape(modules, tails):
    """``(module, its optimum tail, d_out, d_in)`` for the first module of each distinct shape."""
    seen = set()
    for mod, tail in zip(modules, tails):
        m, n, _ = dims(mod)
        if (m, n) not in seen:
            seen.add((m, n))
            yield mod, tail, m, n
