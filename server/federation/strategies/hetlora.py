"""HetLoRA: heterogeneous-rank LoRA by zero-padding and sparsity-weighted averaging.

Cho, Manoel, Joshi, Sahu, Dimitriadis. "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models." EMNLP 2024 (arXiv:2401.06432).

Each client's factors are zero-padded to the largest rank in the round; ``B`` and ``A`` are
averaged separately with per-module weights proportional to ``||s_k B_k A_k||_F``
(sparsity-weighted aggregation); client j receives the first ``r_j`` columns of ``B`` and
rows of ``A`` (rank truncation of the padded factors). The client scaling ``s_k`` is folded
into ``B`` before averaging so clients with different alpha or rank stay comparable; the
global delta is ``B_g @ A_g``. The paper's local rank self-pruning is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, join_factors, split_factors
from server.federation.strategies.base import FactorStrategy, RankSpec, RoundAggregation

__all__ = ["HetLoRA", "pad_factors", "hetlora_aggregate", "truncate_factors"]


def pad_factors(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``B`` (d_out x r) and ``A`` (r x d_in) to inner rank ``rank``."""
    r = b.shape[1]
    if a.shape[0] != r:
        raise ValueError(f"B is {b.shape} and A is {a.shape}: inner ranks differ")
    if rank < r:
        raise ValueError(f"rank={rank} is below the factors' rank {r}")
    bp = np.zeros((b.shape[0], rank), np.float64)
    ap = np.zeros((rank, a.shape[1]), np.float64)
    bp[:, :r], ap[:r] = b, a
    return bp, ap


def hetlora_aggregate(clients: Sequence[tuple[np.ndarray, np.ndarray, float]]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(B_g, A_g)`` from ``clients = [(B_k, A_k, s_k)]``: pad to the largest rank, weights
    ``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F`` (uniform if all are zero)."""
    if not clients:
        raise ValueError("clients must be non-empty")
    r_max = max(b.shape[1] for b, _, _ in clients)
    norms = np.array([np.linalg.norm(s * (b.astype(np.float64) @ a.astype(np.float64)))
                      for b, a, s in clients])
    w = norms / norms.sum() if norms.sum() > 0 else np.full(len(clients), 1.0 / len(clients))
    bg = ag = 0.0
    for wk, (b, a, s) in zip(w, clients):
        bp, ap = pad_factors(s * b.astype(np.float64), a.astype(np.float64), r_max)
        bg, ag = bg + wk * bp, ag + wk * ap
    return bg, ag


def truncate_factors(b: np.ndarray, a: np.ndarray, rank: int, scale: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """First ``rank`` slots of the global factors, ``B`` divided by the client's scaling."""
    r = min(rank, b.shape[1])
    return (b[:, :r] / scale).astype(np.float32), np.asarray(a[:r], np.float32)


def _grow(arr: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Zero-pad ``arr`` along ``axis`` (the rank axis) to ``rank``."""
    missing = rank - arr.shape[axis]
    if missing <= 0:
        return arr
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, missing)
    return np.pad(arr, pad)


class _HetRound(RoundAggregation):
    def __init__(self, strategy: "HetLoRA", round: int) -> None:
        super().__init__(strategy, round)
        # module -> [sum w B, sum w A, sum w, sum B, sum A, count], zero-padded as ranks grow;
        # unnormalised, so replies stream in; the plain sums serve when every norm is zero
        self._acc: dict[str, list] = {}

    def _add(self, update: ClientUpdate) -> None:
        staged = {}   # computed on new arrays, committed only when every module succeeded
        for module, (b, a) in split_factors(update.factors).items():
            sb = update.module_scaling(module) * b.astype(np.float64)
            a = a.astype(np.float64)
            w = float(np.linalg.norm(sb @ a))
            acc = self._acc.get(module)
            if acc is None:
                acc = [np.zeros((b.shape[0], 0)), np.zeros((0, a.shape[1])), 0.0,
                       np.zeros((b.shape[0], 0)), np.zeros((0, a.shape[1])), 0]
            acc = list(acc)
            r = max(acc[0].shape[1], b.shape[1])
            for i, axis in ((0, 1), (1, 0), (3, 1), (4, 0)):
                acc[i] = _grow(acc[i], r, axis)
            bp, ap = _grow(sb, r, 1), _grow(a, r, 0)
            acc[0] = acc[0] + w * bp
            acc[1] = acc[1] + w * ap
            acc[2] += w
            acc[3] = acc[3] + bp
            acc[4] = acc[4] + ap
            acc[5] += 1
            staged[module] = acc
        self._acc.update(staged)

    def _finalize(self) -> None:
        out = {}
        for module, (wb, wa, wsum, b, a, count) in self._acc.items():
            if wsum > 0:
                out[module] = ((wb / wsum).astype(np.float32), (wa / wsum).astype(np.float32))
            else:
                out[module] = ((b / count).astype(np.float32), (a / count).astype(np.float32))
        self.strategy.factors = out


class HetLoRA(FactorStrategy):
    """Zero-padding, sparsity-weighted aggregation and rank truncation (Cho et al. 2024)."""

    name = "hetlora"

    def configure(self, *, client_id: str, spec: RankSpec, round: int) -> GlobalFactors | None:
        if not self.factors:
            return None
        out = {}
        for module, (b, a) in self.factors.items():
            r = spec.module_rank(module)
            out[module] = truncate_factors(b, a, r, self.send_scaling(r))
        return self._message(join_factors(out), spec, round)

    def begin_round(self, round: int) -> RoundAggregation:
        return _HetRound(self, round)
