"""Truncated SVD of weighted sums of low-rank products: the server's hot path.

Every function takes and returns numpy float32 arrays and runs in the native core
(``server._core``, C++ over OpenBLAS + OpenMP) with the GIL released. ``dW`` below is
``sum_k weights[k] * Bs[k] @ As[k]`` with ``Bs[k]`` (d_out x r_k) and ``As[k]``
(r_k x d_in); ``R = sum_k r_k``. (About 400 lines on purpose: the one Python door to the
native core, every route and the sketch's sizing beside the planner that chooses between them.)

Routes (``method``):

* ``"exact"``: dW is never formed; exact up to float32 rounding. When both concatenated
  factors are well conditioned (the usual case, R <= min(d_out, d_in)): float64 Gram
  matrices of the factors (dsyrk), a column-scaled Cholesky of one, the R x R matrix
  ``K = Rb Ga Rb^T`` and its top-``rank`` eigenpairs, then two float32 GEMMs, all BLAS-3.
  Otherwise (duplicated clients, rank-deficient factors, zero weights, R above d): thin
  Householder QR of both factors and an SVD of the small core.
* ``"randomized"``: Halko-Martinsson-Tropp range finder applied through the factors, with
  ``oversample`` extra test vectors and ``power_iters`` power iterations, QR between them;
  the Gaussian test matrix comes from ``seed`` (same seed, same answer).
* ``"dense"``: dW by one GEMM over the concatenated factors, then the randomized SVD of dW.
* ``"sketch"``: one pass, bounded memory (:class:`StreamingSketch`): range, co-range and
  core sketches of dW updated from each client's factors, dW never formed; approximate
  (error against the optimum depends on the sketch sizes, see :func:`sketch_sizes`; under a
  memory budget, :func:`sketch_sizes_for_budget`). The test maps are sparse sign maps
  regenerated from ``seed``, never stored.
  ``auto`` never picks it here; :class:`server.core.aggregation.Aggregator` does under
  ``max_state_bytes`` when the other routes would not fit.
* ``"auto"``: the cheapest route by the cost model of :func:`plan`; exact unless an
  approximate route is more than ``EXACT_PREFERENCE`` times cheaper. On a randomized route
  ``auto`` is accuracy-driven: it draws at least ``rank / 5`` extra test vectors (more than
  ``oversample`` when that is smaller), ``power_iters`` is a minimum, and subspace iteration
  goes on until one iteration lowers the residual energy ``||dW||_F^2 - sum_{i<rank}
  sigma_i^2`` of the current subspace by at most ``AUTO_ENERGY_TOL`` (5%) of itself, or until
  ``max(power_iters, AUTO_MAX_POWER_ITERS)`` iterations. That residual is exactly the squared
  error the answer would have. On the workloads' heavy-tailed sums (R above d) the wider
  block stops after the minimum 2 iterations at an error ratio of ~1.007-1.009 (target:
  <= 1.01; torch's ``svd_lowrank`` with ``niter=2`` gives ~1.015): the measured table is in
  csrc/routes.cpp. The planner forms dW (one GEMM) and iterates on it when a dense pass,
  ``2 l d_out d_in``, is cheaper than a pass through the factors, ``2 l R (d_out + d_in)``;
  on the factors, ``||dW||_F^2`` is estimated from the first pass when its exact value
  (``R^2 (d_out + d_in)``) would cost more than a pass.
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
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

# The core's OpenMP runtime (libgomp) reads its wait policy once, when server._core loads
# it. The default ACTIVE-then-spin policy burns a core per idle worker, which on a shared
# or oversubscribed machine steals the time the other workers need (one dense aggregation
# was seen to take 40x longer). PASSIVE makes idle workers sleep at once; the core's
# parallel regions are coarse (one module per iteration) so the wake-up cost is noise.
# An explicit OMP_WAIT_POLICY / GOMP_SPINCOUNT in the environment wins.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from server import _core  # noqa: E402
from server.core.validate import (  # noqa: E402
    METHODS,
    as_count,
    as_factors,
    as_matrix,
    as_method,
    as_rank,
    as_threads,
    per_layer_ranks,
    per_layer_weights,
)

__all__ = ["lowrank_svd", "lowrank_svd_batched", "dense_svd", "weighted_sum", "plan", "Plan",
           "set_num_threads", "get_num_threads", "METHODS", "EXACT_PREFERENCE",
           "AUTO_ENERGY_TOL", "AUTO_MAX_POWER_ITERS", "StreamingSketch", "sketch_sizes", "sketch_sizes_for_budget",
           "sketch_state_bytes", "sketch_update_batched", "sketch_finalize_batched", "route_state_bytes",
           "blas_config", "svd_prepared"]

EXACT_PREFERENCE: float = float(_core.kExactPreference)
AUTO_ENERGY_TOL: float = float(_core.kAutoEnergyTol)
AUTO_MAX_POWER_ITERS: int = int(_core.kAutoMaxPowerIters)

SVD = tuple[np.ndarray, np.ndarray, np.ndarray]


def set_num_threads(n: int | None) -> None:
    """Default thread budget for every call (None: all cores). Capped at the core count."""
    _core.set_num_threads(0 if n is None else as_threads(n))


def get_num_threads() -> int:
    return int(_core.get_num_threads())


def blas_config() -> str:
    """Which BLAS/LAPACK the native core was built against, and its threading."""
    return str(_core.blas_config())


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


def svd_prepared(tasks: Sequence[tuple], ranks: Sequence[int], *, method: str = "auto", oversample: int = 10,
                 power_iters: int = 2, seed: int = 0, threads: int | None = None) -> list[tuple]:
    """Truncated SVDs of already validated tasks in one parallel native call, with the route
    each took: ``[(U, S, Vt, route)]``. A task is ``(Bs, As, weights)`` (the weighted sum of
    factor products) or ``(M, scale)`` (a dense matrix times ``scale``), arrays float32,
    C-contiguous and finite (the streaming aggregator checks every client as it arrives)."""
    opts = _options(ranks[0] if ranks else 1, method, oversample, power_iters, seed, threads)
    return _run(list(tasks), [as_rank(r, f"ranks[{i}]") for i, r in enumerate(ranks)], opts, with_route=True)


def lowrank_svd(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: Sequence[float],
                rank: int, *, method: str = "auto", oversample: int = 10, power_iters: int = 2,
                seed: int = 0, threads: int | None = None, sketch_size: int | None = None,
                core_size: int | None = None) -> SVD:
    """Rank-``rank`` truncated SVD ``(U, S, Vt)`` of ``sum_k weights[k] Bs[k] @ As[k]``.

    ``U`` is (d_out x rank), ``S`` (rank,) descending, ``Vt`` (rank x d_in).
    ``sketch_size`` / ``core_size`` (method ``"sketch"`` only): see :func:`sketch_sizes`.
    """
    rank = as_rank(rank)
    opts = _options(rank, method, oversample, power_iters, seed, threads)
    Bm, Am, w = as_factors(Bs, As, weights)
    if opts["method"] == "sketch":
        return _sketch_run([(Bm, Am, w)], [rank], seed, opts["threads"], sketch_size, core_size)[0]
    return _run([(Bm, Am, w)], [rank], opts)[0]


def lowrank_svd_batched(layers: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
                        weights: Sequence[float] | Sequence[Sequence[float]],
                        rank: int | Sequence[int], *, method: str = "auto", oversample: int = 10,
                        power_iters: int = 2, seed: int = 0,
                        threads: int | None = None, sketch_size: int | None = None,
                        core_size: int | None = None) -> list[SVD]:
    """:func:`lowrank_svd` of many modules in one native call, modules in parallel.

    ``layers`` is a sequence of ``(Bs, As)``; ``weights`` is one weight per client shared by
    every layer, or one sequence of weights per layer; ``rank`` one int or one per layer.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: at least one module is needed")
    ranks = per_layer_ranks(rank, len(layers))
    opts = _options(ranks[0], method, oversample, power_iters, seed, threads)
    per_layer = per_layer_weights(weights, len(layers))
    tasks = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"layers[{i}] must be a (Bs, As) pair")
        tasks.append(as_factors(layer[0], layer[1], per_layer[i], prefix=f"layers[{i}]."))
    if opts["method"] == "sketch":
        return _sketch_run(tasks, ranks, seed, opts["threads"], sketch_size, core_size)
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
                 *, out: np.ndarray | None = None, threads: int | None = None,
                 validated: bool = False) -> np.ndarray:
    """``sum_k weights[k] Bs[k] @ As[k]`` (d_out x d_in) by one GEMM over the concatenated
    factors. With ``out`` (float32, C-contiguous) the sum is added to it in place.
    ``validated``: the caller already checked factors, weights and ``out`` (the streaming
    aggregator, per client), so the checks are not repeated on the hot path."""
    if validated:
        return _core.weighted_sum(list(Bs), list(As), [float(x) for x in weights], out, as_threads(threads))
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

    ``cost`` is FLOPs weighted by kernel efficiency (GEMM x1, float64 BLAS-3 and QR x2, SVD
    x4), ``flops`` the raw FLOP count of each route (what benchmarks divide by time for
    GFLOP/s), ``flops_f64`` the part of ``flops`` done in float64 (the exact route's Grams
    and R x R steps; a floor at GEMM speed charges them at the dgemm rate).
    """
    method: str
    reason: str
    total_rank: int
    cost: Mapping[str, float]
    flops: Mapping[str, float]
    flops_f64: Mapping[str, float] = field(default_factory=dict)


def plan(d_out: int, d_in: int, ranks: Sequence[int] | int, rank: int, *, oversample: int = 10,
         power_iters: int = 2, method: str = "auto") -> Plan:
    """The route ``auto`` takes for a (d_out x d_in) module with client ranks ``ranks``
    (a sequence, or the total R as an int) at the requested ``rank``.

    ``method`` only changes how the randomized routes are priced: ``"auto"`` (default) at
    ``power_iters + 1`` iterations and auto's block width (the figures auto decides by); an
    explicit method at exactly ``power_iters`` (for FLOP counts of that method)."""
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
                cost=dict(d["cost"]), flops=dict(d["flops"]), flops_f64=dict(d["flops_f64"]))


# ---------------------------------------------------------------------------- sketch route
def sketch_sizes(rank: int, d_out: int, d_in: int, sketch_size: int | None = None,
                 core_size: int | None = None) -> tuple[int, int]:
    """``(k, s)``: range/co-range sketch size ``k`` (default ``2 rank + 1``) and core sketch
    size ``s`` (default ``2 k + 1``), Tropp et al.'s recommended proportions (SISC 2019,
    sec. 5.4: ``s >= 2k + 1`` keeps the core solve well conditioned); ``k`` is capped at
    ``min(d_out, d_in)``."""
    rank = as_rank(rank)
    k = 2 * rank + 1 if sketch_size is None else as_rank(sketch_size, "sketch_size")
    k = min(k, d_out, d_in)
    s = 2 * k + 1 if core_size is None else as_rank(core_size, "core_size")
    if s < k:
        raise ValueError(f"core_size must be >= sketch_size ({k}), got {s}")
    return k, s


def sketch_state_bytes(d_out: int, d_in: int, k: int, s: int) -> int:
    """Bytes of one sketch's state: ``Y`` (d_out x k), ``W`` (k x d_in), ``Z`` (s x s), float32."""
    return 4 * (k * (d_out + d_in) + s * s)


def sketch_sizes_for_budget(rank: int, shapes: Sequence[tuple[int, int]],
                            budget_bytes: int) -> list[tuple[int, int]]:
    """``(k, s)`` for each module shape in ``shapes`` so that their sketches together use
    ``budget_bytes``: the largest common range size ``k`` (each module's capped at
    ``min(d_out, d_in)``, where its sketch is exact) with ``s = 2 k + 1`` (Tropp et al., SISC
    2019, sec. 5.4: the storage ``k (d_out + d_in) + s^2`` split between range and core in
    these proportions), the total at most ``budget_bytes``. The test maps take no memory
    (regenerated). ValueError when even ``k = rank`` (the fewest that can return ``rank``
    directions) does not fit."""
    rank = as_rank(rank)
    shapes = [(as_rank(m, "d_out"), as_rank(n, "d_in")) for m, n in shapes]
    if not shapes:
        return []

    def sizes(k: int) -> list[tuple[int, int]]:
        return [(min(k, m, n), 2 * min(k, m, n) + 1) for m, n in shapes]

    def total(k: int) -> int:
        return sum(sketch_state_bytes(m, n, kk, ss) for (m, n), (kk, ss) in zip(shapes, sizes(k)))

    lo, hi = rank, max(min(m, n) for m, n in shapes)
    if total(min(lo, hi)) > budget_bytes:
        raise ValueError(f"a memory budget of {budget_bytes} bytes is below what the sketch route needs for "
                         f"{len(shapes)} module(s) at the smallest sketch (k = rank = {rank}): "
                         f"{total(min(lo, hi))} bytes")
    while lo < hi:  # largest k with total(k) <= budget (total is non-decreasing in k)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid - 1)
    return sizes(lo)


class StreamingSketch:
    """One-pass sketch of ``dW = sum_k weights[k] Bs[k] @ As[k]`` for one module (Tropp,
    Yurtsever, Udell, Cevher, SIMAX 2017 and SISC 2019): ``Y = dW Omega`` (d_out x k),
    ``W = Psi dW`` (k x d_in) and ``Z = Phi dW Xi^T`` (s x s), updated in place from each
    client's factors (:meth:`add`), never forming dW. State: ``k (d_out + d_in) + s^2``
    floats, flat in the number of clients and all the memory it takes: the test maps are
    sparse sign maps (8 nonzeros +-1 per column) that the native core regenerates from
    ``(seed, shape, k, s)`` wherever it applies them, so sketches of one shape and seed
    share them without storing them. :meth:`finalize` returns the rank-``rank``
    approximation ``Q C P^T`` truncated by an SVD of the small core ``C``."""

    def __init__(self, d_out: int, d_in: int, rank: int, *, sketch_size: int | None = None,
                 core_size: int | None = None, seed: int = 0) -> None:
        self.d_out, self.d_in = as_rank(d_out, "d_out"), as_rank(d_in, "d_in")
        self.rank = as_rank(rank)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.k, self.s = sketch_sizes(self.rank, self.d_out, self.d_in, sketch_size, core_size)
        self.seed = int(seed) % (1 << 64)
        self.Y = np.zeros((self.d_out, self.k), np.float32)
        self.W = np.zeros((self.k, self.d_in), np.float32)
        self.Z = np.zeros((self.s, self.s), np.float32)

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """What the native core needs besides the state: sizes and the seed of the maps."""
        return self.d_out, self.d_in, self.k, self.s, self.seed

    @property
    def nbytes(self) -> int:
        """Bytes of this sketch: its state, all of it (the test maps are not stored)."""
        return self.Y.nbytes + self.W.nbytes + self.Z.nbytes

    @staticmethod
    def projected_bytes(d_out: int, d_in: int, rank: int, sketch_size: int | None = None,
                        core_size: int | None = None) -> int:
        k, s = sketch_sizes(rank, d_out, d_in, sketch_size, core_size)
        return sketch_state_bytes(d_out, d_in, k, s)

    def add(self, Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], weights: Sequence[float],
            *, threads: int | None = None) -> None:
        sketch_update_batched([self], [(Bs, As)], [weights], threads=threads)

    def finalize(self, rank: int | None = None, *, scale: float = 1.0,
                 threads: int | None = None) -> SVD:
        return sketch_finalize_batched([self], rank if rank is None else [rank], scales=[scale],
                                       threads=threads)[0]


def sketch_update_batched(sketches: Sequence[StreamingSketch],
                          layers: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
                          weights: Sequence[Sequence[float]], *, threads: int | None = None,
                          validated: bool = False) -> None:
    """Adds ``sum_k weights[i][k] Bs[k] @ As[k]`` of ``layers[i]`` to ``sketches[i]``, all
    modules in one parallel native call. ``validated``: the factors already passed
    :func:`server.core.validate.as_factors` (C-contiguous float32, finite, shapes agree)."""
    if not (len(sketches) == len(layers) == len(weights)):
        raise ValueError(f"sketches, layers and weights must have the same length, got "
                         f"{len(sketches)}, {len(layers)}, {len(weights)}")
    tasks = []
    for i, (sk, (Bs, As), w) in enumerate(zip(sketches, layers, weights)):
        if validated:
            Bm, Am, wl = list(Bs), list(As), [float(x) for x in w]
        else:
            Bm, Am, wl = as_factors(Bs, As, w, prefix=f"layers[{i}].")
        if (Bm[0].shape[0], Am[0].shape[1]) != (sk.d_out, sk.d_in):
            raise ValueError(f"layers[{i}] is {Bm[0].shape[0]}x{Am[0].shape[1]}, its sketch is "
                             f"{sk.d_out}x{sk.d_in}")
        tasks.append((sk.dims, (sk.Y, sk.W, sk.Z), Bm, Am, wl))
    if tasks:
        _core.sketch_update(tasks, as_threads(threads))


def sketch_finalize_batched(sketches: Sequence[StreamingSketch],
                            ranks: int | Sequence[int] | None = None, *,
                            scales: Sequence[float] | None = None,
                            threads: int | None = None) -> list[SVD]:
    """Rank-``ranks[i]`` ``(U, S, Vt)`` of every sketch (default: each sketch's rank),
    ``scales[i]`` multiplying its dW; positions above the sketch size are zero."""
    sketches = list(sketches)
    if ranks is None:
        ranks = [sk.rank for sk in sketches]
    ranks = per_layer_ranks(ranks, len(sketches))
    scales = [1.0] * len(sketches) if scales is None else [float(x) for x in scales]
    tasks = [(sk.dims, (sk.Y, sk.W, sk.Z), sc, r)
             for sk, r, sc in zip(sketches, ranks, scales)]
    return [tuple(r[:3]) for r in _core.sketch_finalize(tasks, as_threads(threads))]


def _sketch_run(tasks: list, ranks: list[int], seed: int, threads: int,
                sketch_size: int | None, core_size: int | None) -> list[SVD]:
    sketches = [StreamingSketch(B[0].shape[0], A[0].shape[1], r, sketch_size=sketch_size,
                                core_size=core_size, seed=seed)
                for (B, A, _w), r in zip(tasks, ranks)]
    sketch_update_batched(sketches, [(B, A) for B, A, _ in tasks], [w for *_, w in tasks],
                          threads=threads or None, validated=True)
    return sketch_finalize_batched(sketches, ranks, threads=threads or None)


def route_state_bytes(d_out: int, d_in: int, total_rank: int, rank: int, *,
                      sketch_size: int | None = None, core_size: int | None = None) -> dict[str, int]:
    """Bytes the streaming aggregator holds for one module on each route at the end of a
    round with concatenated rank ``total_rank``: ``factors`` (exact/randomized keep the
    factors, ``R (d_out + d_in)`` floats), ``dense`` (one accumulator), ``auto`` (factors
    up to the break-even rank, then the accumulator), ``sketch`` (all it holds: the test
    maps are regenerated, not stored)."""
    factors = 4 * total_rank * (d_out + d_in)
    dense = 4 * d_out * d_in
    auto = factors if total_rank <= (d_out * d_in) // (d_out + d_in) else dense
    return {"factors": factors, "dense": dense, "auto": auto,
            "sketch": StreamingSketch.projected_bytes(d_out, d_in, rank, sketch_size, core_size)}
