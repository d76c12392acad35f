"""FlexLoRA: aggregate full-size LoRA products, redistribute by truncated SVD at each rank.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources." NeurIPS 2024, arXiv:2402.11505.

Client k sends ``B_k, A_k`` at its own rank r_k (or rank pattern) with scaling
``s_k = alpha_k / r_k``; the server forms ``dW = sum_k p_k s_k B_k A_k`` (``p_k = n_k / sum n``)
and hands client j the rank-r_j truncated SVD of dW split into ``B_j, A_j`` with
``s_j B_j A_j = U_r S_r V_r^T`` (Eckart-Young optimal). The heavy lifting is the streaming
``server.core.aggregation.Aggregator`` (native core); the functions below are the plain NumPy
statement of the same math, used as the test oracle.

**Split** (``split``): ``"reference"`` (the default) is the official code's
(alibaba/FederatedScope, branch FlexLoRA, ``fed_utils/adaptive_peft.py``): all of ``S`` on B,
``B = U_r S_r / s``, ``A = V_r^T``. ``"balanced"`` puts ``sqrt(S_r / s)`` on both. The effective
update ``s B A`` is the same; local training from the two differs.

**Carry** (``carry=True``, ours, not in the paper). The server holds the previous global update
``G_t = U diag(sigma) V^T``; client k started from ``T_{r_k}(G_t)`` and sends
``X_k = s_k B_k A_k = T_{r_k}(G_t) + Delta_k``. Plain FlexLoRA sets::

    G_{t+1} = sum_k p_k X_k = sum_i w_i sigma_i u_i v_i^T + sum_k p_k Delta_k,
    w_i = sum_{k: r_k >= i} p_k,

so a direction that only some clients received is shrunk by ``w_i`` every round (the rank
collapse of arXiv 2602.13486: the energy drifts geometrically to the smallest shared rank).
Carrying them forward gives::

    G_{t+1} = G_t + sum_k p_k Delta_k = sum_k p_k X_k + U diag((1 - w_i) sigma_i) V^T.

Since ``1 - w_i = sum_k p_k [i > r_k]``, the carry term splits over clients:
``U diag((1 - w_i) sigma_i) V^T = sum_k p_k R_k`` with ``R_k = G_t - T_{r_k}(G_t)`` the tail
client k did not receive. So each reply is added to the *same* streaming aggregator as one
factor pair ``[s_k B_k | U_tail S_tail] [A_k ; V_tail^T]`` (the client's factors with the tail
appended, pre-scaled so the aggregator's per-module scaling reproduces ``s_k`` on the client's
part) under the client's own weight ``n_k``: ``p_k`` normalisation is untouched, ``w_i`` is per
module (from each client's rank or rank pattern) and, with client sampling or failed clients,
over the clients whose replies were aggregated. Round 1 (no ``G_t``) is plain FlexLoRA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, factor_keys, scaling
from server.federation.strategies.base import RankSpec, RoundAggregation, Strategy, StrategyConfig, split_factors

__all__ = ["FlexLoRA", "flexlora_delta", "carry_delta", "truncate_delta", "reference_client_factors"]

SPLITS = ("reference", "balanced")


def flexlora_delta(clients: Sequence[tuple[np.ndarray, np.ndarray, float, float]]) -> np.ndarray:
    """``sum_k p_k s_k B_k A_k`` for ``clients = [(B_k, A_k, s_k, n_k)]``, p_k = n_k / sum n."""
    if not clients:
        raise ValueError("clients must be non-empty")
    total = float(sum(n for *_, n in clients))
    if total <= 0:
        raise ValueError(f"total number of examples must be > 0, got {total}")
    out = None
    for k, (b, a, s, n) in enumerate(clients):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"clients[{k}]: B is {b.shape}, A is {a.shape}; inner ranks differ")
        term = (n / total) * s * (b.astype(np.float64) @ a.astype(np.float64))
        out = term if out is None else out + term
    return out


def carry_delta(previous: np.ndarray, clients: Sequence[tuple[np.ndarray, np.ndarray, float, float]]
                ) -> np.ndarray:
    """FlexLoRA with carry, dense NumPy oracle: ``sum_k p_k X_k + U diag((1 - w_i) sigma_i) V^T``
    with ``G_t = previous = U diag(sigma) V^T``, ``w_i = sum_{k: r_k >= i} p_k``, ``r_k`` the
    inner rank of client k's factors."""
    total = float(sum(n for *_, n in clients))
    u, sig, vt = np.linalg.svd(np.asarray(previous, np.float64), full_matrices=False)
    w = np.zeros_like(sig)
    for b, _a, _s, n in clients:
        w[: b.shape[1]] += n / total
    return flexlora_delta(clients) + (u * ((1.0 - w) * sig)) @ vt


def truncate_delta(delta: np.ndarray, rank: int, scale: float, *, split: str = "reference"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` at ``rank`` with ``scale * B @ A`` = the rank-r truncated SVD of ``delta``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    r = min(rank, s.size)
    u, s, vt = u[:, :r], s[:r], vt[:r]
    if split == "balanced":
        root = np.sqrt(s / scale)
        b, a = u * root, root[:, None] * vt
    elif split == "reference":
        b, a = u * (s / scale), vt
    else:
        raise ValueError(f"split must be 'balanced' or 'reference', got {split!r}")
    return b.astype(np.float32), a.astype(np.float32)


class _FlexRound(RoundAggregation):
    def __init__(self, strategy: "FlexLoRA", round: int) -> None:
        super().__init__(strategy, round)
        from server.core.aggregation import Aggregator  # native core; imported when first needed
        # max_round_bytes is the aggregator's budget when it can keep to one (auto/sketch route
        # choice and sketch sizes); robust buffering holds raw updates, so the round checks then
        budget = strategy.config.max_round_bytes
        self.budget_in_aggregator = budget is not None and strategy.method in ("auto", "sketch") \
            and self._pending is None
        self._agg = Aggregator(strategy.max_rank, method=strategy.method, seed=strategy.config.seed + round,
                               max_state_bytes=budget if self.budget_in_aggregator else None)

    def held_bytes(self) -> int:
        return self._agg.state_bytes()

    def _add(self, update: ClientUpdate) -> None:
        try:
            self._add_to_aggregator(update)
        except ValueError as e:
            if self.budget_in_aggregator and str(e).startswith("max_state_bytes="):
                raise ValueError(f"client {update.client_id!r}: round {self.round}: max_round_bytes="
                                 f"{self.strategy.config.max_round_bytes} is the aggregator's budget: {e}") from None
            raise

    def _add_to_aggregator(self, update: ClientUpdate) -> None:
        adapter = self.strategy.adapter
        if not self.strategy.carry or adapter is None:
            self._agg.add_update(update)
            return
        # carry: the client's factors with the tail of G_t it did not receive appended (see the
        # module docstring); alpha=1, rslora=False makes the aggregator's scaling 1/r', so the
        # client's part is pre-scaled by s_k r' and the tail by r'.
        factors = {}
        for module, (b, a) in split_factors(update.factors).items():
            s_k = update.module_scaling(module)
            r_k = a.shape[0]
            bs, as_ = [np.asarray(b, np.float64) * s_k], [np.asarray(a, np.float64)]
            if module in adapter.modules:
                U, S, Vt = adapter.modules[module]
                keep = np.flatnonzero(np.asarray(S[r_k:]) > 0) + r_k
                if keep.size:
                    bs.append(np.asarray(U[:, keep], np.float64) * np.asarray(S[keep], np.float64))
                    as_.append(np.asarray(Vt[keep], np.float64))
            B, A = np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)
            a_key, b_key = factor_keys(module)
            factors[a_key] = A.astype(np.float32)
            factors[b_key] = (B * B.shape[1]).astype(np.float32)
        self._agg.add(factors, num_examples=update.num_examples, alpha=1.0, rslora=False,
                      client_id=update.client_id)

    def _finalize(self) -> None:
        self.strategy.adapter = self._agg.finalize()


class FlexLoRA(Strategy):
    """Streaming aggregation of full-size products; per-client truncated-SVD redistribution."""

    name = "flexlora"

    def __init__(self, config: StrategyConfig | None = None, *, max_rank: int = 256,
                 method: str = "auto", split: str = "reference", carry: bool = False) -> None:
        super().__init__(config)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(carry, bool):
            raise ValueError(f"carry must be a bool, got {carry!r}")
        self.max_rank = int(max_rank)
        self.method = method
        self.split = split
        self.carry = carry
        self.adapter = None  # server.core.aggregation.GlobalAdapter after the first round

    def configure(self, *, client_id: str, spec: RankSpec, round: int) -> GlobalFactors | None:
        if self.adapter is None:
            return None
        factors = self.adapter.client_factors(spec.rank, alpha=self.config.alpha,
                                              rslora=self.config.rslora, split=self.split,
                                              rank_pattern=dict(spec.rank_pattern) or None)
        return self._message(factors, spec, round)

    def begin_round(self, round: int) -> RoundAggregation:
        return _FlexRound(self, round)

    def global_delta(self) -> dict[str, np.ndarray]:
        if self.adapter is None:
            return {}
        return {m: np.asarray(self.adapter.delta(m), np.float32) for m in sorted(self.adapter.modules)}

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Per module ``<module>.U``, ``.S``, ``.Vt`` of the global adapter (empty before round 1)."""
        return {} if self.adapter is None else self.adapter.to_tensors()

    def state_meta(self) -> dict:
        meta = {**super().state_meta(), "max_rank": self.max_rank, "split": self.split,
                "carry": self.carry}
        if self.adapter is not None:
            meta.update(adapter_rank=self.adapter.max_rank, routes=self.adapter.routes)
        return meta

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None:
        self._check_meta(meta)
        if not tensors:
            self.adapter = None
            return
        from server.core.adapter import GlobalAdapter
        self.adapter = GlobalAdapter.from_tensors(tensors, meta["adapter_rank"], meta.get("routes", {}))


def reference_client_factors(updates: Sequence[ClientUpdate], spec: RankSpec, *, alpha: float,
                             rslora: bool = False, split: str = "reference") -> dict[str, np.ndarray]:
    """NumPy oracle for ``FlexLoRA.configure`` after aggregating ``updates``."""
    modules = split_factors(updates[0].factors)
    out = {}
    for module in modules:
        clients = []
        for u in updates:
            b, a = split_factors(u.factors)[module]
            clients.append((b, a, u.module_scaling(module), u.num_examples))
        r = spec.module_rank(module)
        b, a = truncate_delta(flexlora_delta(clients), r, scaling(alpha, r, rslora), split=split)
        a_key, b_key = factor_keys(module)
        out[a_key], out[b_key] = a, b
    return out
