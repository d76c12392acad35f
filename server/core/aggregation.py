"""Streaming FlexLoRA aggregation (Bai et al., NeurIPS 2024, arXiv 2402.11505).

Clients are added one at a time; each module keeps only what its route needs:

* ``method="exact"`` / ``"randomized"``: the clients' factors (the route works on them; the
  memory is the concatenated factors, ``R (d_out + d_in)`` floats).
* ``method="dense"``: one dense accumulator ``dW`` per module, updated in place by a GEMM
  with beta = 1 per client, so memory stays flat in the number of clients.
* ``method="auto"`` (the default): factors are kept while the module's concatenated rank
  ``R`` stays at or below ``dense_threshold``; the client that would push ``R`` past it
  folds everything into a dense accumulator, and the module continues on the dense route.
  The default threshold is the memory break-even point ``d_out d_in / (d_out + d_in)``
  (factors as large as dW), which is also about where forming dW starts to pay off in the
  cost model of :func:`server.core.linalg.plan`. Unfolded modules let ``auto`` pick their route
  at :meth:`Aggregator.finalize` from the final ``R``.
* ``method="sketch"``: a one-pass streaming sketch per module
  (:class:`server.core.linalg.StreamingSketch`): ``k (d_out + d_in) + s^2`` floats, flat in the
  number of clients and far below ``d_out d_in``; approximate.
* ``max_state_bytes`` (with ``auto``): when a client brings modules whose worst-case state
  on the other routes (the dense accumulator, ``4 d_out d_in`` bytes; factors fold into it
  at the break-even rank) would push the projected total past the budget, those modules go
  to the sketch route instead; modules already held keep their route. The sketches are then
  sized by the budget, not by the default ``k = 2 rank + 1``: the bytes the held modules do
  not reserve go to the new sketches (:func:`server.core.linalg.sketch_sizes_for_budget`,
  the largest common ``k``), so the state is what the budget buys (with ``method="sketch"``
  too). The state never exceeds the budget. A budget that even the smallest sketches
  (``k = max_rank``) cannot meet is an error when the first client arrives. An explicit
  ``sketch_size`` / ``core_size`` overrides the sizing.

Weights: client ``k`` contributes ``p_k s_k B_k A_k`` with ``p_k = weight_k / sum(weight)``
(weight defaults to ``num_examples``) and ``s_k = alpha_k / r`` (``alpha_k / sqrt(r)`` with
rsLoRA), ``r`` the module's rank in that client (``A.shape[0]``). Modules a client does
not send are normalised over the clients that sent them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edge_client.wire import scaling, split_factors
from server.core import linalg
from server.core.adapter import GlobalAdapter
from server.core.validate import (
    METHODS,
    as_count,
    as_matrix,
    as_method,
    as_rank,
    as_threads,
    check_client_args,
    check_client_modules,
    check_finite_contribution,
)

__all__ = ["Aggregator", "AggregatorBase", "ClientLedger", "ModuleState", "GlobalAdapter", "check_client_args",
           "check_client_modules", "check_finite_contribution"]


@dataclass
class ModuleState:
    """One module's streaming state; arrays are numpy (CPU) or torch CUDA tensors."""
    d_out: int
    d_in: int
    Bs: list = field(default_factory=list)
    As: list = field(default_factory=list)
    ws: list = field(default_factory=list)
    total_rank: int = 0
    total_weight: float = 0.0
    dense: Any = None
    sketch: Any = None

    def factor_bytes(self) -> int:
        return sum(int(b.nbytes) + int(a.nbytes) for b, a in zip(self.Bs, self.As))

    def held_bytes(self) -> int:
        return self.factor_bytes() + (int(self.dense.nbytes) if self.dense is not None else 0) + \
            (self.sketch.nbytes if self.sketch is not None else 0)


class ClientLedger:
    """What every streaming aggregator (CPU, CUDA, sharded) counts of the clients it accepted, and
    how it takes a whole ``ClientUpdate``."""

    def __init__(self) -> None:
        self.num_clients = 0
        self.total_weight = 0.0
        self.client_ids: list[str] = []

    def add(self, factors: Mapping[str, Any], **kwargs) -> None:
        raise NotImplementedError

    def add_update(self, update: Any) -> None:
        """Add an ``edge_client.wire.ClientUpdate`` (or any object with its fields); an
        ``alpha_pattern`` is folded into the factors, so one ``alpha`` scales them."""
        factors = update.factors_at_alpha() if hasattr(update, "factors_at_alpha") else update.factors
        self.add(factors, num_examples=update.num_examples, alpha=update.alpha,
                 rank=update.rank, rank_pattern=update.rank_pattern or None,
                 rslora=update.rslora, client_id=update.client_id)

    def _finish_client(self, w: float, client_id: str | None) -> None:
        self.num_clients += 1
        self.total_weight += float(w)
        if client_id is not None:
            self.client_ids.append(str(client_id))


class AggregatorBase(ClientLedger):
    """What the CPU :class:`Aggregator` and :class:`server.core.cuda_aggregation.CudaAggregator`
    share: arguments, per-client bookkeeping, the ``auto`` fold of factors into a dense
    accumulator past ``dense_threshold``, and the finalize tasks. The backends differ only
    in where arrays live and which kernels run, through four hooks:

    * ``_keep(x)``: the factor as stored (a private copy on the CPU, the device tensor);
    * ``_zeros(d_out, d_in)``: a new dense accumulator;
    * ``_fold(st)``: ``st.dense += sum_k st.ws[k] st.Bs[k] @ st.As[k]`` (the fold);
    * ``_accumulate(st, B, A, w)``: ``st.dense += w B @ A`` now, or return an item that the
      backend runs later in one batched call (CUDA).
    """

    def __init__(self, max_rank: int, *, method: str, oversample: int, power_iters: int,
                 seed: int, threads: int | None, dense_threshold: int | None,
                 methods: tuple[str, ...] = METHODS) -> None:
        self.max_rank = as_rank(max_rank, "max_rank")
        self.method = as_method(method, methods)
        self.oversample = as_count(oversample, "oversample")
        self.power_iters = as_count(power_iters, "power_iters")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.threads = threads
        as_threads(threads)
        self.dense_threshold = None if dense_threshold is None else \
            as_count(dense_threshold, "dense_threshold")
        super().__init__()
        self._modules: dict[str, ModuleState] = {}

    # hooks (see the class docstring)
    def _keep(self, x: Any) -> Any:
        raise NotImplementedError

    def _zeros(self, d_out: int, d_in: int) -> Any:
        raise NotImplementedError

    def _fold(self, st: ModuleState) -> None:
        raise NotImplementedError

    def _accumulate(self, st: ModuleState, B: Any, A: Any, w: float) -> Any:
        raise NotImplementedError

    def _threshold(self, st: ModuleState) -> int:
        if self.dense_threshold is not None:
            return self.dense_threshold
        return (st.d_out * st.d_in) // (st.d_out + st.d_in)

    def _module_state(self, module: str, d_out: int, d_in: int) -> ModuleState:
        st = self._modules.get(module)
        if st is None:
            st = self._modules[module] = ModuleState(d_out=d_out, d_in=d_in)
        return st

    def _add_module(self, module: str, B: Any, A: Any, w: float, raw_weight: float) -> Any:
        """Adds ``w B @ A`` to the module's state; returns the backend's deferred item (or None)."""
        st = self._module_state(module, B.shape[0], A.shape[1])
        st.total_weight += raw_weight
        st.total_rank += B.shape[1]
        if st.dense is None and self.method in ("dense", "auto") and (
                self.method == "dense" or st.total_rank > self._threshold(st)):
            st.dense = self._zeros(st.d_out, st.d_in)
            if st.Bs:
                self._fold(st)
            st.Bs, st.As, st.ws = [], [], []
        if st.dense is not None:
            return self._accumulate(st, B, A, w)
        st.Bs.append(self._keep(B))
        st.As.append(self._keep(A))
        st.ws.append(w)
        return None

    @property
    def modules(self) -> list[str]:
        return sorted(self._modules)

    def state_bytes(self) -> int:
        """Bytes of factors, dense accumulators and sketches held now: all the state (the
        sketches' test maps are regenerated, not stored)."""
        return sum(st.held_bytes() for st in self._modules.values())

    def _svd_tasks(self, names: list[str]) -> list[tuple]:
        """The batched-SVD task of each (non-sketch) module: ``(dense, 1 / total weight)``
        or ``(Bs, As, weights / total weight)``."""
        tasks = []
        for name in names:
            st = self._modules[name]
            if st.dense is not None:
                tasks.append((st.dense, 1.0 / st.total_weight))
            else:
                tasks.append((st.Bs, st.As, [w / st.total_weight for w in st.ws]))
        return tasks

    def _check_finalize(self) -> list[str]:
        if self.num_clients == 0:
            raise ValueError("finalize() needs at least one client; none was added")
        names = sorted(self._modules)
        for name in names:
            if self._modules[name].total_weight <= 0:
                raise ValueError(f"module {name!r}: the clients that sent it all have weight 0")
        return names


class Aggregator(AggregatorBase):
    """Streaming weighted aggregation of per-module LoRA factors, then truncated SVD (CPU).
    The GPU twin is :class:`server.core.cuda_aggregation.CudaAggregator` (same base)."""

    def __init__(self, max_rank: int, *, method: str = "auto", oversample: int = 10,
                 power_iters: int = 2, seed: int = 0, threads: int | None = None,
                 dense_threshold: int | None = None, max_state_bytes: int | None = None,
                 sketch_size: int | None = None, core_size: int | None = None) -> None:
        super().__init__(max_rank, method=method, oversample=oversample, power_iters=power_iters,
                         seed=seed, threads=threads, dense_threshold=dense_threshold)
        self.max_state_bytes = None if max_state_bytes is None else \
            as_count(max_state_bytes, "max_state_bytes")
        if max_state_bytes is not None and self.method not in ("auto", "sketch"):
            raise ValueError(f"max_state_bytes needs method 'auto' (or 'sketch'), got {self.method!r}")
        self.sketch_size = None if sketch_size is None else as_rank(sketch_size, "sketch_size")
        self.core_size = None if core_size is None else as_rank(core_size, "core_size")
        linalg.sketch_sizes(self.max_rank, 1 << 30, 1 << 30, self.sketch_size, self.core_size)

    def _keep(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float32, copy=True)

    def _zeros(self, d_out: int, d_in: int) -> np.ndarray:
        return np.zeros((d_out, d_in), dtype=np.float32)

    def _fold(self, st: ModuleState) -> None:
        # held factors were checked when their client was added (check_finite_contribution leaves
        # room for MAX_ROUND_REPLIES of them in float32); the generic magnitude check here would
        # refuse what add accepted and so fail a later, honest client
        linalg.weighted_sum(st.Bs, st.As, st.ws, out=st.dense, threads=self.threads, validated=True)

    def _accumulate(self, st: ModuleState, B: np.ndarray, A: np.ndarray, w: float) -> None:
        linalg.weighted_sum([B], [A], [w], out=st.dense, threads=self.threads, validated=True)
        return None

    # ------------------------------------------------------------------ adding clients
    def add(self, factors: Mapping[str, np.ndarray], *, num_examples: int, alpha: float,
            rank: int | None = None, rank_pattern: Mapping[str, int] | None = None,
            rslora: bool = False, client_id: str | None = None,
            weight: float | None = None) -> None:
        """Add one client's peft-named factors. Validates everything before any state
        changes, so a rejected client leaves the aggregator as it was."""
        who = f"client {client_id!r}" if client_id is not None else f"client #{self.num_clients}"
        w = check_client_args(who, num_examples=num_examples, alpha=alpha, weight=weight)
        pairs = split_factors(factors, who, convert=as_matrix, required=True)
        check_client_modules(who, pairs, self._modules, max_rank=self.max_rank, rank=rank,
                             rank_pattern=rank_pattern)
        sketch_new = self._sketch_new_modules(pairs)  # {module: (k, s)} of new sketched modules
        # prepare: every check and allocation (a dense fold included) on new objects ...
        staged = []
        for module, (B, A) in pairs.items():
            r = B.shape[1]
            ws = float(w) * scaling(alpha, r, rslora)
            check_finite_contribution(who, module, B, A, ws)
            staged.append(self._prepare_module(module, B, A, ws, sketch_new))
        # ... then commit: assignments, appends and the in-place updates of states whose
        # arguments were all checked above, so a failure above leaves the aggregator as it was
        sketched = []
        for module, B, A, ws, new_sketch, fold in staged:
            st = self._module_state(module, B.shape[0], A.shape[1])
            st.total_weight += float(w)
            st.total_rank += B.shape[1]
            if new_sketch is not None:
                st.sketch = new_sketch
            if st.sketch is not None:
                sketched.append((st.sketch, B, A, ws))
            elif fold is not None:
                st.dense, st.Bs, st.As, st.ws = fold, [], [], []
            elif st.dense is not None:
                self._accumulate(st, B, A, ws)
            else:
                st.Bs.append(self._keep(B))
                st.As.append(self._keep(A))
                st.ws.append(ws)
        if sketched:  # every sketched module of this client in one parallel native call
            linalg.sketch_update_batched([x[0] for x in sketched], [([x[1]], [x[2]]) for x in sketched],
                                         [[x[3]] for x in sketched], threads=self.threads, validated=True)
        self._finish_client(w, client_id)

    def _prepare_module(self, module: str, B: np.ndarray, A: np.ndarray, ws: float,
                        sketch_new: Mapping[str, tuple[int, int]]) -> tuple:
        """What adding ``ws B @ A`` to ``module`` will do, computed without touching the state:
        ``(module, B, A, ws, new sketch or None, freshly folded dense accumulator or None)``."""
        st = self._modules.get(module)
        if st is None and module in sketch_new:
            k, s = sketch_new[module]
            sketch = linalg.StreamingSketch(B.shape[0], A.shape[1], self.max_rank, sketch_size=k, core_size=s,
                                            seed=self.seed)
            return module, B, A, ws, sketch, None
        if st is not None and (st.sketch is not None or st.dense is not None):
            return module, B, A, ws, None, None
        d_out, d_in = B.shape[0], A.shape[1]
        total_rank = (0 if st is None else st.total_rank) + B.shape[1]
        if self.method in ("dense", "auto") and (
                self.method == "dense" or total_rank > self._threshold(ModuleState(d_out=d_out, d_in=d_in))):
            fold = self._zeros(d_out, d_in)
            if st is not None and st.Bs:
                # held factors: checked at their add (see _fold)
                linalg.weighted_sum(st.Bs, st.As, st.ws, out=fold, threads=self.threads, validated=True)
            linalg.weighted_sum([np.ascontiguousarray(B, np.float32)], [np.ascontiguousarray(A, np.float32)],
                                [ws], out=fold, threads=self.threads, validated=True)
            if not np.isfinite(fold).all():
                raise ValueError(f"module {module!r}: the dense aggregate is not finite in float32")
            return module, B, A, ws, None, fold
        return module, B, A, ws, None, None

    def _sketch_new_modules(self, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[int, int]]:
        """The modules this client brings for the first time that go to the sketch route, with
        their sketch sizes ``(k, s)``: sized by the budget when there is one (the bytes the
        held modules do not reserve), else the defaults or ``sketch_size`` / ``core_size``."""
        new = {m: (B.shape[0], A.shape[1]) for m, (B, A) in pairs.items() if m not in self._modules}
        if not new or (self.method != "sketch" and self.max_state_bytes is None):
            return {}
        if self.max_state_bytes is None or self.sketch_size is not None:
            sizes = {m: linalg.sketch_sizes(self.max_rank, d_out, d_in, self.sketch_size, self.core_size)
                     for m, (d_out, d_in) in new.items()}
            if self.max_state_bytes is None:
                return sizes
        held = sum(4 * st.d_out * st.d_in if st.sketch is None else st.sketch.nbytes
                   for st in self._modules.values())
        if self.method != "sketch" and held + sum(4 * m * n for m, n in new.values()) <= self.max_state_bytes:
            return {}
        free = self.max_state_bytes - held
        if self.sketch_size is None:
            try:
                sizes = dict(zip(new, linalg.sketch_sizes_for_budget(self.max_rank, list(new.values()), free)))
            except ValueError as e:
                raise ValueError(f"max_state_bytes={self.max_state_bytes} is below what even the sketch route "
                                 f"needs for these modules ({held} bytes held, {free} free: {e}); raise it "
                                 "or lower max_rank") from None
        need = held + sum(linalg.sketch_state_bytes(d_out, d_in, *sizes[m]) for m, (d_out, d_in) in new.items())
        if need > self.max_state_bytes:
            raise ValueError(f"max_state_bytes={self.max_state_bytes} is below what even the sketch route "
                             f"needs for these modules ({need} bytes); raise it or lower max_rank/sketch_size")
        return sizes

    # ------------------------------------------------------------------ results
    def routes_planned(self) -> dict[str, str]:
        """Per module: 'dense (folded)' or the route auto would take with the factors so far."""
        out = {}
        for name, st in sorted(self._modules.items()):
            if st.sketch is not None:
                out[name] = "sketch"
            elif st.dense is not None:
                out[name] = "dense"
            elif self.method != "auto":
                out[name] = self.method
            else:
                out[name] = linalg.plan(st.d_out, st.d_in, st.total_rank, self.max_rank,
                                        oversample=self.oversample,
                                        power_iters=self.power_iters).method
        return out

    def finalize(self) -> GlobalAdapter:
        """Truncated SVD of every module's aggregate at ``max_rank`` (all modules in one
        parallel native call). The aggregator keeps its state; more clients may follow."""
        names = self._check_finalize()
        sketched = [n for n in names if self._modules[n].sketch is not None]
        others = [n for n in names if self._modules[n].sketch is None]
        results: dict[str, tuple] = {}
        if sketched:
            sts = [self._modules[n] for n in sketched]
            outs = linalg.sketch_finalize_batched([st.sketch for st in sts], self.max_rank,
                                                  scales=[1.0 / st.total_weight for st in sts],
                                                  threads=self.threads)
            results.update({n: (*o, "sketch") for n, o in zip(sketched, outs)})
        if others:
            tasks = self._svd_tasks(others)
            method = "auto" if self.method == "sketch" else self.method
            out = linalg.svd_prepared(tasks, [self.max_rank] * len(tasks), method=method,
                                      oversample=self.oversample, power_iters=self.power_iters,
                                      seed=self.seed, threads=self.threads)
            results.update(zip(others, out))
        modules = {n: results[n][:3] for n in names}
        routes = {n: results[n][3] for n in names}
        return GlobalAdapter(modules=modules, max_rank=self.max_rank, routes=routes)
