"""FlexLoRA: aggregate full-size LoRA products, redistribute by truncated SVD at each rank.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources." NeurIPS 2024, arXiv:2402.11505.

Client k sends ``B_k, A_k`` at its own rank r_k (or rank pattern) with scaling
``s_k = alpha_k / r_k``; the server forms ``dW = sum_k p_k s_k B_k A_k`` (``p_k = n_k / sum n``)
and hands client j the rank-r_j truncated SVD of dW split into ``B_j, A_j`` with
``s_j B_j A_j = U_r S_r V_r^T`` (Eckart-Young optimal). The heavy lifting is the streaming
``server.aggregation.Aggregator`` (native core); the functions below are the plain NumPy
statement of the same math, used as the test oracle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, factor_keys, scaling

from .base import RankSpec, RoundAggregation, Strategy, StrategyConfig, split_factors

__all__ = ["FlexLoRA", "flexlora_delta", "truncate_delta", "reference_client_factors"]


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


def truncate_delta(delta: np.ndarray, rank: int, scale: float, *, split: str = "balanced"
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
        from server.aggregation import Aggregator  # native core; imported when first needed
        self._agg = Aggregator(strategy.max_rank, method=strategy.method, seed=strategy.config.seed + round)

    def held_bytes(self) -> int:
        return self._agg.state_bytes()

    def _add(self, update: ClientUpdate) -> None:
        self._agg.add_update(update)

    def _finalize(self) -> None:
        self.strategy.adapter = self._agg.finalize()


class FlexLoRA(Strategy):
    """Streaming aggregation of full-size products; per-client truncated-SVD redistribution."""

    name = "flexlora"

    def __init__(self, config: StrategyConfig | None = None, *, max_rank: int = 256,
                 method: str = "auto", split: str = "balanced") -> None:
        super().__init__(config)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if split not in ("balanced", "reference"):
            raise ValueError(f"split must be 'balanced' or 'reference', got {split!r}")
        self.max_rank = int(max_rank)
        self.method = method
        self.split = split
        self.adapter = None  # server.aggregation.GlobalAdapter after the first round

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
        meta = {**super().state_meta(), "max_rank": self.max_rank, "split": self.split}
        if self.adapter is not None:
            meta.update(adapter_rank=self.adapter.max_rank, routes=self.adapter.routes)
        return meta

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None:
        self._check_meta(meta)
        if not tensors:
            self.adapter = None
            return
        from server._global_adapter import GlobalAdapter
        self.adapter = GlobalAdapter.from_tensors(tensors, meta["adapter_rank"], meta.get("routes", {}))


def reference_client_factors(updates: Sequence[ClientUpdate], spec: RankSpec, *, alpha: float,
                             rslora: bool = False, split: str = "balanced") -> dict[str, np.ndarray]:
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
