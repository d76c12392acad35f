"""FedIT: homogeneous-rank federated instruction tuning, FedAvg of A and B separately.

Zhang, Vahidian, Kuo, Li, Ruan, Song, Chen. "Towards Building the Federated GPT: Federated
Instruction Tuning." ICASSP 2024 (arXiv:2305.05644).

Every client trains at one rank (the smallest the federation allows, as the paper's
resource-constrained baseline, or the largest as the resource-unaware upper bound), and the
server averages ``B`` and ``A`` separately with weights ``p_k = n_k / sum n``. Client scalings
are folded into ``B`` (``B_g = sum p_k s_k B_k``), so the global delta is ``B_g @ A_g`` —
which is not ``sum p_k s_k B_k A_k``: the averaging error FlexLoRA avoids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, join_factors, split_factors
from server.federation.strategies.base import FactorStrategy, RankSpec, RoundAggregation, StrategyConfig

__all__ = ["FedIT", "fedavg_factors", "federation_rank"]


def federation_rank(specs: Iterable[RankSpec], which: str) -> int:
    """FedIT's one rank for a federation whose devices afford ``specs``: the smallest rank any
    client trains any module at (``"min"``, the resource-constrained baseline) or the largest
    (``"max"``, the resource-unaware upper bound)."""
    specs = list(specs)
    if not specs:
        raise ValueError("specs must be non-empty")
    if which == "min":
        return min(s.min_rank() for s in specs)
    if which == "max":
        return max(s.max_rank() for s in specs)
    raise ValueError(f"fedit_rank must be 'min' or 'max', got {which!r}")


def fedavg_factors(clients: Sequence[tuple[np.ndarray, np.ndarray, float, float]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(sum p_k s_k B_k, sum p_k A_k)`` for ``clients = [(B_k, A_k, s_k, n_k)]``, equal ranks."""
    if not clients:
        raise ValueError("clients must be non-empty")
    r = clients[0][0].shape[1]
    total = float(sum(n for *_, n in clients))
    bg = ag = 0.0
    for k, (b, a, s, n) in enumerate(clients):
        if b.shape[1] != r or a.shape[0] != r:
            raise ValueError(f"clients[{k}] has rank {b.shape[1]}/{a.shape[0]}, expected {r} (FedIT is homogeneous)")
        bg = bg + (n / total) * s * b.astype(np.float64)
        ag = ag + (n / total) * a.astype(np.float64)
    return bg, ag


class _FedAvgRound(RoundAggregation):
    def __init__(self, strategy: "FedIT", round: int) -> None:
        super().__init__(strategy, round)
        self._acc: dict[str, list] = {}
        self._n = 0.0

    def _add(self, update: ClientUpdate) -> None:
        n = float(update.num_examples)
        for module, (b, a) in split_factors(update.factors).items():
            if b.shape[1] != self.strategy.rank:
                raise ValueError(f"client {update.client_id!r}: module {module!r} has rank "
                                 f"{b.shape[1]}, FedIT runs every client at {self.strategy.rank}")
        staged = {}   # new arrays, committed only when every module succeeded
        for module, (b, a) in split_factors(update.factors).items():
            s = update.module_scaling(module)
            acc = self._acc.get(module, [0.0, 0.0])
            staged[module] = [acc[0] + n * s * b.astype(np.float64), acc[1] + n * a.astype(np.float64)]
        self._acc.update(staged)
        self._n += n

    def _finalize(self) -> None:
        self.strategy.factors = {m: ((b / self._n).astype(np.float32), (a / self._n).astype(np.float32))
                                 for m, (b, a) in self._acc.items()}


class FedIT(FactorStrategy):
    """Homogeneous-rank FedAvg of the LoRA factors."""

    name = "fedit"

    def __init__(self, config: StrategyConfig | None = None, *, rank: int = 8) -> None:
        super().__init__(config)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        self.rank = rank

    def assign_rank(self, spec: RankSpec) -> RankSpec:
        return RankSpec(rank=self.rank)

    def configure(self, *, client_id: str, spec: RankSpec, round: int) -> GlobalFactors | None:
        if not self.factors:
            return None
        s = self.send_scaling(self.rank)
        out = {m: (b / s, a) for m, (b, a) in self.factors.items()}
        return self._message(join_factors(out), RankSpec(rank=self.rank), round)

    def begin_round(self, round: int) -> RoundAggregation:
        return _FedAvgRound(self, round)

    def state_meta(self) -> dict:
        return {**super().state_meta(), "rank": self.rank}

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None:
        if int(meta.get("rank", self.rank)) != self.rank:
            raise ValueError(f"checkpoint has FedIT rank {meta.get('rank')}, this run uses {self.rank}")
        super().load_state(tensors, meta)
