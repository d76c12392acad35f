"""Truncated SVD of weighted sums of low-rank products: the server's hot path.

Every function takes and returns numpy float32 arrays and runs in the native core
(``server._core``, C++ over OpenBLAS + OpenMP) with the GIL released. ``dW`` below is
``sum_k weights[k] * Bs[k] @ As[k]`` with ``Bs[k]`` (d_out x r_k) and ``As[k]``
(r_k x d_in); ``R = sum_k r_k``.

Routes (``method``):

* ``"exact"``: thin QR of the concatenated factors on both sides and an SVD of the small
  core; dW is never formed. Exact up to float32 rounding.
* ``"randomized"``: Halko-Martinsson-Tropp range finder applied through the factors, with
  ``oversample`` extra test vectors and ``power_iters`` power iterations, QR between them;
  the Gaussian test matrix comes from ``seed`` (same seed, same answer).
* ``"dense"``: dW by one GEMM over the concatenated factors, then the randomized SVD of dW.
* ``"auto"``: the cheapest route by the cost model of :func:`plan`; exact unless an
  approximate route is more than ``EXACT_PREFERENCE`` times cheaper. On a randomized route
  ``auto`` is accuracy-driven: ``power_iters`` is a minimum, and subspace iteration goes on
  until one iteration lowers the residual energy ``||dW||_F^2 - sum_{i<rank} sigma_i^2`` of
  the current subspace by at most ``AUTO_ENERGY_TOL`` (1%) of itself, or until
  ``max(power_iters, AUTO_MAX_POWER_ITERS)`` iterations. That residual is exactly the
  squared error the answer would have, and on flat/heavy-tailed spectra the excess left
  over the Eckart-Young optimum was measured at 1-1.5x the last relative decrease, so the
  error ratio ends near ``sqrt(1 + 1.5e-2)`` ~ 1.0075 (target: <= 1.01). With R above d
  the planner forms dW (one GEMM) and iterates on it: a pass through the factors costs
  ``2 l R (d_out + d_in)``, more than a dense pass ``2 l d_out d_in``.
  Explicit ``"randomized"`` / ``"dense"`` run exactly ``power_iters`` iterations.

Re-orthonormalisation between passes is Cholesky QR twice (CholQR2, BLAS-3) with a shifted
first step or a Householder fallback for ill-conditioned blocks.

A requested ``rank`` above the operator's rank (``min(d_out, d_in, R)``; for the
randomized routes ``min(d_out, d_in, rank + oversample)``) gives zero singular values and
zero singular vectors in the extra positions, so ``U @ diag(S) @ Vt`` is still the best
approximation and the shapes stay what the caller asked for.

``threads=None`` uses :func:`get_num_threads` (all cores unless :func:`set_num_threads`
lowered it); the core never runs more BLAS x OpenMP threads than there are cores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# The core's OpenMP runtime (libgomp) reads its wait policy once, when server._core loads
# it. The default ACTIVE-then-spin policy burns a core per idle worker, which on a shared
# or oversubscribed machine steals the time the other workers need (one dense aggregation
# was seen to take 40x longer). PASSIVE makes idle workers sleep at once; the core's
# parallel regions are coarse (one module per iteration) so the wake-up cost is noise.
# An explicit OMP_WAIT_POLICY / GOMP_SPINCOUNT in the environment wins.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core  # noqa: E402
from ._validate import (METHODS, as_count, as_factors, as_matrix, as_method, as_rank,  # noqa: E402
                        as_threads)

__all__ = ["lowrank_svd", "lowrank_svd_batched", "dense_svd", "weighted_sum", "plan", "Plan",
           "set_num_threads", "get_num_threads", "METHODS", "EXACT_PREFERENCE",
           "AUTO_ENERGY_TOL", "AUTO_MAX_POWER_ITERS"]

EXACT_PREFERENCE: float = float(_core.kExactPreference)
AUTO_ENERGY_TOL: float = float(_core.kAutoEnergyTol)
AUTO_MAX_POWER_ITERS: int = int(_core.kAutoMaxPowerIters)

SVD = tuple[np.ndarray, np.ndarray, np.ndarray]


def set_num_threads(n: int | None) -> None:
    """Default thread budget for every call (None: all cores). Capped at the core count."""
    _core.set_num_threads(0 if n is None else as_threads(n))


def get_num_threads() -> int:
    return int(_core.get_num_threads())


def _options(rank, method, oversample, power_iters, seed, threads):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return dict(method=as_method(method), oversample=as_count(oversample, "oversample"),
                power_iters=as_count(power_iters, "power_iters"), seed=int(seed) % (1 << 64),
                threads=as_threads(threads))


def _run(tasks: list, ranks: list[int], opts: dict, dense_exact: bool = False,
         with_route: bool = False) -> list:
    out = _core.svd_batched(tasks, ranks, opts["method"], opts["oversample"],
                            opts["power_iters"], opts["seed"], dense_exact, opts["threads"])
    return [tuple(r) if with_route else tuple(r[:3]) for r in out]


def lowrank_svd(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: Sequence[float],
                rank: int, *, method: str = "auto", oversample: int = 10, power_iters: int = 2,
                seed: int = 0, threads: int | None = None) -> SVD:
    """Rank-``rank`` truncated SVD ``(U, S, Vt)`` of ``sum_k weights[k] Bs[k] @ As[k]``.

    ``U`` is (d_out x rank), ``S`` (rank,) descending, ``Vt`` (rank x d_in).
    """
    rank = as_rank(rank)
    opts = _options(rank, method, oversample, power_iters, seed, threads)
    Bm, Am, w = as_factors(Bs, As, weights)
    return _run([(Bm, Am, w)], [rank], opts)[0]


def lowrank_svd_batched(layers: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
                        weights: Sequence[float] | Sequence[Sequence[float]],
                        rank: int | Sequence[int], *, method: str = "auto", oversample: int = 10,
                        power_iters: int = 2, seed: int = 0,
                        threads: int | None = None) -> list[SVD]:
    """:func:`lowrank_svd` of many modules in one native call, modules in parallel.

    ``layers`` is a sequence of ``(Bs, As)``; ``weights`` is one weight per client shared by
    every layer, or one sequence of weights per layer; ``rank`` one int or one per layer.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: at least one module is needed")
    ranks = _per_layer_ranks(rank, len(layers))
    opts = _options(ranks[0], method, oversample, power_iters, seed, threads)
    per_layer = _per_layer_weights(weights, len(layers))
    tasks = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"layers[{i}] must be a (Bs, As) pair")
        tasks.append(as_factors(layer[0], layer[1], per_layer[i], prefix=f"layers[{i}]."))
    return _run(tasks, ranks, opts)


def dense_svd(M: np.ndarray, rank: int, *, method: str = "randomized", oversample: int = 10,
              power_iters: int = 2, seed: int = 0, threads: int | None = None) -> SVD:
    """Truncated SVD of a dense matrix: ``"randomized"`` (HMT) or ``"exact"`` (full gesdd)."""
    rank = as_rank(rank)
    as_method(method, ("randomized", "exact"))
    opts = _options(rank, "dense", oversample, power_iters, seed, threads)
    M = as_matrix(M, "M")
    return _run([(M, 1.0)], [rank], opts, dense_exact=(method == "exact"))[0]


def weighted_sum(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: Sequence[float],
                 *, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """``sum_k weights[k] Bs[k] @ As[k]`` (d_out x d_in) by one GEMM over the concatenated
    factors. With ``out`` (float32, C-contiguous) the sum is added to it in place."""
    Bm, Am, w = as_factors(Bs, As, weights)
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or \
                not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous float32 numpy array")
        if out.shape != (Bm[0].shape[0], Am[0].shape[1]):
            raise ValueError(f"out has shape {out.shape}, expected "
                             f"{(Bm[0].shape[0], Am[0].shape[1])} (d_out, d_in)")
    return _core.weighted_sum(Bm, Am, w, out, as_threads(threads))


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The route ``method="auto"`` takes for one module and the cost model behind it.

    ``cost`` is FLOPs weighted by kernel efficiency (GEMM x1, QR x2, SVD x4), ``flops`` the
    raw FLOP count of each route (what benchmarks divide by time for GFLOP/s).
    """
    method: str
    reason: str
    total_rank: int
    cost: Mapping[str, float]
    flops: Mapping[str, float]


def plan(d_out: int, d_in: int, ranks: Sequence[int] | int, rank: int, *, oversample: int = 10,
         power_iters: int = 2, method: str = "auto") -> Plan:
    """The route ``auto`` takes for a (d_out x d_in) module with client ranks ``ranks``
    (a sequence, or the total R as an int) at the requested ``rank``.

    ``method`` only changes how the randomized routes are priced: ``"auto"`` (default) at
    ``power_iters + 2`` iterations, its typical adaptive count (the figures auto decides
    by); an explicit method at exactly ``power_iters`` (for FLOP counts of that method)."""
    d_out, d_in, rank = as_rank(d_out, "d_out"), as_rank(d_in, "d_in"), as_rank(rank)
    if isinstance(ranks, (int, np.integer)) and not isinstance(ranks, bool):
        total = as_rank(ranks, "ranks")
    else:
        total = sum(as_rank(r, f"ranks[{k}]") for k, r in enumerate(ranks))
        if total == 0:
            raise ValueError("ranks is empty: at least one client is needed")
    d = _core.plan(d_out, d_in, total, rank, as_count(oversample, "oversample"),
                   as_count(power_iters, "power_iters"), False, as_method(method))
    return Plan(method=d["method"], reason=d["reason"], total_rank=total,
                cost=dict(d["cost"]), flops=dict(d["flops"]))


def _per_layer_ranks(rank: Any, n: int) -> list[int]:
    if isinstance(rank, (list, tuple, np.ndarray)):
        if len(rank) != n:
            raise ValueError(f"rank has {len(rank)} entries, expected {n} (one per layer)")
        return [as_rank(r, f"rank[{i}]") for i, r in enumerate(rank)]
    return [as_rank(rank)] * n


def _per_layer_weights(weights: Any, n: int) -> list:
    items = list(weights) if not isinstance(weights, np.ndarray) else weights
    if len(items) and isinstance(items[0], (list, tuple, np.ndarray)) and np.ndim(items[0]) == 1:
        if len(items) != n:
            raise ValueError(f"weights has {len(items)} per-layer entries, expected {n}")
        return list(items)
    return [weights] * n
