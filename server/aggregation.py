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
  cost model of :func:`server.linalg.plan`. Unfolded modules let ``auto`` pick their route
  at :meth:`Aggregator.finalize` from the final ``R``.

Weights: client ``k`` contributes ``p_k s_k B_k A_k`` with ``p_k = weight_k / sum(weight)``
(weight defaults to ``num_examples``) and ``s_k = alpha_k / r`` (``alpha_k / sqrt(r)`` with
rsLoRA), ``r`` the module's rank in that client (``A.shape[0]``). Modules a client does
not send are normalised over the clients that sent them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import _core, linalg
from ._global_adapter import GlobalAdapter, split_factor_dict
from ._validate import as_count, as_method, as_rank, as_threads

__all__ = ["Aggregator", "GlobalAdapter"]


@dataclass
class _Module:
    d_out: int
    d_in: int
    Bs: list = field(default_factory=list)
    As: list = field(default_factory=list)
    ws: list = field(default_factory=list)
    total_rank: int = 0
    total_weight: float = 0.0
    dense: np.ndarray | None = None

    def factor_bytes(self) -> int:
        return sum(b.nbytes + a.nbytes for b, a in zip(self.Bs, self.As))


class Aggregator:
    """Streaming weighted aggregation of per-module LoRA factors, then truncated SVD."""

    def __init__(self, max_rank: int, *, method: str = "auto", oversample: int = 10,
                 power_iters: int = 2, seed: int = 0, threads: int | None = None,
                 dense_threshold: int | None = None) -> None:
        self.max_rank = as_rank(max_rank, "max_rank")
        self.method = as_method(method)
        self.oversample = as_count(oversample, "oversample")
        self.power_iters = as_count(power_iters, "power_iters")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.threads = threads
        as_threads(threads)
        self.dense_threshold = None if dense_threshold is None else \
            as_count(dense_threshold, "dense_threshold")
        self._modules: dict[str, _Module] = {}
        self.num_clients = 0
        self.total_weight = 0.0
        self.client_ids: list[str] = []

    # ------------------------------------------------------------------ adding clients
    def add(self, factors: Mapping[str, np.ndarray], *, num_examples: int, alpha: float,
            rank: int | None = None, rank_pattern: Mapping[str, int] | None = None,
            rslora: bool = False, client_id: str | None = None,
            weight: float | None = None) -> None:
        """Add one client's peft-named factors. Validates everything before any state
        changes, so a rejected client leaves the aggregator as it was."""
        who = f"client {client_id!r}" if client_id is not None else f"client #{self.num_clients}"
        w = check_client_args(who, num_examples=num_examples, alpha=alpha, weight=weight)
        pairs = split_factor_dict(factors, who)
        check_client_modules(who, pairs, self._modules, max_rank=self.max_rank, rank=rank,
                             rank_pattern=rank_pattern)
        for module, (B, A) in pairs.items():
            r = B.shape[1]
            s = alpha / (math.sqrt(r) if rslora else r)
            self._add_module(module, B, A, float(w) * s, float(w))
        self.num_clients += 1
        self.total_weight += float(w)
        if client_id is not None:
            self.client_ids.append(str(client_id))

    def add_update(self, update: Any) -> None:
        """Add an ``edge_client.wire.ClientUpdate`` (or any object with its fields)."""
        factors = update.factors_at_alpha() if hasattr(update, "factors_at_alpha") else update.factors
        self.add(factors, num_examples=update.num_examples, alpha=update.alpha,
                 rank=update.rank, rank_pattern=update.rank_pattern or None,
                 rslora=update.rslora, client_id=update.client_id)

    def _threshold(self, st: _Module) -> int:
        if self.dense_threshold is not None:
            return self.dense_threshold
        return (st.d_out * st.d_in) // (st.d_out + st.d_in)

    def _add_module(self, module: str, B: np.ndarray, A: np.ndarray, w: float,
                    raw_weight: float) -> None:
        st = self._modules.get(module)
        if st is None:
            st = self._modules[module] = _Module(d_out=B.shape[0], d_in=A.shape[1])
        st.total_weight += raw_weight
        st.total_rank += B.shape[1]
        if st.dense is None and self.method in ("dense", "auto") and (
                self.method == "dense" or st.total_rank > self._threshold(st)):
            st.dense = np.zeros((st.d_out, st.d_in), dtype=np.float32)
            if st.Bs:
                linalg.weighted_sum(st.Bs, st.As, st.ws, out=st.dense, threads=self.threads)
            st.Bs, st.As, st.ws = [], [], []
        if st.dense is not None:
            _core.weighted_sum([B], [A], [w], st.dense, as_threads(self.threads))
        else:
            st.Bs.append(np.array(B, dtype=np.float32, copy=True))
            st.As.append(np.array(A, dtype=np.float32, copy=True))
            st.ws.append(w)

    # ------------------------------------------------------------------ results
    @property
    def modules(self) -> list[str]:
        return sorted(self._modules)

    def state_bytes(self) -> int:
        """Bytes of factors and dense accumulators held now."""
        return sum(st.factor_bytes() + (st.dense.nbytes if st.dense is not None else 0)
                   for st in self._modules.values())

    def routes_planned(self) -> dict[str, str]:
        """Per module: 'dense (folded)' or the route auto would take with the factors so far."""
        out = {}
        for name, st in sorted(self._modules.items()):
            if st.dense is not None:
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
        if self.num_clients == 0:
            raise ValueError("finalize() needs at least one client; none was added")
        names = sorted(self._modules)
        tasks = []
        for name in names:
            st = self._modules[name]
            if st.total_weight <= 0:
                raise ValueError(f"module {name!r}: the clients that sent it all have weight 0")
            if st.dense is not None:
                tasks.append((st.dense, 1.0 / st.total_weight))
            else:
                tasks.append((st.Bs, st.As, [w / st.total_weight for w in st.ws]))
        out = _core.svd_batched(tasks, [self.max_rank] * len(tasks), self.method,
                                self.oversample, self.power_iters, self.seed,
                                False, as_threads(self.threads))
        modules = {n: (U, S, Vt) for n, (U, S, Vt, _r) in zip(names, out)}
        routes = {n: r for n, (_U, _S, _Vt, r) in zip(names, out)}
        return GlobalAdapter(modules=modules, max_rank=self.max_rank, routes=routes)


def check_client_args(who: str, *, num_examples: Any, alpha: Any, weight: Any) -> float:
    """Validated scalar arguments of one client's ``add``; returns its weight (the number of
    examples unless ``weight`` is given). Shared by the CPU and CUDA aggregators."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) \
            or num_examples < 1:
        raise ValueError(f"num_examples of {who} must be an integer >= 1, got {num_examples!r}")
    if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha of {who} must be a finite number > 0, got {alpha!r}")
    w = float(num_examples) if weight is None else weight
    if not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
        raise ValueError(f"weight of {who} must be finite and >= 0, got {weight!r}")
    return w


def check_client_modules(who: str, pairs: Mapping[str, tuple[Any, Any]], modules: Mapping[str, Any], *,
                         max_rank: int, rank: int | None, rank_pattern: Mapping[str, int] | None) -> None:
    """Each module's rank against ``rank``/``rank_pattern`` (when given) and its shape against
    what earlier clients sent (``modules[name].d_out/.d_in``)."""
    if rank is not None or rank_pattern:
        from edge_client.wire import rank_for_module
        default = max_rank if rank is None else as_rank(rank, "rank")
        for module, (B, _A) in pairs.items():
            expected = rank_for_module(module, default, rank_pattern)
            if B.shape[1] != expected:
                raise ValueError(f"{who}: module {module!r} has rank {B.shape[1]} but "
                                 f"rank/rank_pattern say {expected}")
    for module, (B, A) in pairs.items():
        state = modules.get(module)
        if state is not None and (B.shape[0], A.shape[1]) != (state.d_out, state.d_in):
            raise ValueError(f"{who}: module {module!r} is {B.shape[0]}x{A.shape[1]}, "
                             f"other clients sent {state.d_out}x{state.d_in}")
