"""The plain statements of the FlexLoRA math that the fast code is checked against.

* The **reference algorithm**, as the public FlexLoRA code does it (``reference_*``): per
  module every client's ``B_k @ A_k * alpha_k / r_k * p_k`` is formed in torch and summed
  client by client, then a full SVD (``torch.linalg.svd``) of the dense sum is taken, and the
  redistribution puts all of ``S`` on B. It holds every client's adapter in memory: the
  baseline every benchmark reports against.
* **NumPy oracles** in float64 on ``clients = [(B_k, A_k, s_k, n_k)]`` (``p_k = n_k / sum n``):
  :func:`flexlora_delta` (``sum_k p_k s_k B_k A_k``), :func:`carry_delta` (FlexLoRA with
  carry), :func:`raflora_delta` (rank-partitioned weights) and :func:`truncate_delta` (the
  rank-r split at each client's scaling).

Use :class:`server.core.aggregation.Aggregator` for real work; tests and benchmarks compare it
(and the strategies built on it) with these.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edge_client.wire import LORA_A_SUFFIX, LORA_B_SUFFIX, scaling, split_factors
from server.core.adapter import SPLITS

__all__ = ["reference_delta", "reference_lowrank_svd", "reference_aggregate", "reference_client_factors",
           "flexlora_delta", "carry_delta", "raflora_delta", "truncate_delta"]


def reference_delta(Bs: Sequence[np.ndarray], As: Sequence[np.ndarray],
                    weights: Sequence[float]):
    """``sum_k weights[k] B_k @ A_k`` as a torch float32 tensor, client by client."""
    import torch
    dW = None
    for B, A, w in zip(Bs, As, weights):
        term = torch.as_tensor(np.asarray(B, np.float32)) @ torch.as_tensor(np.asarray(A, np.float32))
        term = term * float(w)
        dW = term if dW is None else dW + term
    return dW


def _truncate(dW, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    r = min(rank, S.shape[0])
    Uo = np.zeros((dW.shape[0], rank), np.float32)
    So = np.zeros(rank, np.float32)
    Vo = np.zeros((rank, dW.shape[1]), np.float32)
    Uo[:, :r], So[:r], Vo[:r] = U[:, :r].numpy(), S[:r].numpy(), Vh[:r].numpy()
    return Uo, So, Vo


def reference_lowrank_svd(Bs, As, weights, rank: int):
    """Truncated SVD of ``sum_k weights[k] B_k A_k`` by a full SVD of the dense sum."""
    return _truncate(reference_delta(Bs, As, weights), rank)


def reference_aggregate(updates: Sequence[Any], max_rank: int) -> dict[str, tuple]:
    """One reference round over ClientUpdate-like objects (``factors``, ``num_examples``,
    ``alpha``, ``rslora``): per module ``(U, S, Vt)`` at ``max_rank``."""
    total = float(sum(u.num_examples for u in updates))
    per_module: dict[str, list] = {}
    for u in updates:
        p = u.num_examples / total
        for module, (B, A) in split_factors(u.factors, "update").items():
            s = scaling(u.alpha, B.shape[1], getattr(u, "rslora", False))
            per_module.setdefault(module, []).append((B, A, s * p))
    return {m: reference_lowrank_svd([b for b, _, _ in v], [a for _, a, _ in v],
                                     [w for _, _, w in v], max_rank)
            for m, v in sorted(per_module.items())}


def reference_client_factors(svds: Mapping[str, tuple], rank: int, alpha: float,
                             rslora: bool = False) -> dict[str, np.ndarray]:
    """All of ``S`` on B: ``B = U_r diag(S_r) / s``, ``A = Vt_r`` (so ``s B A`` is the
    rank-r truncation)."""
    s = scaling(alpha, rank, rslora)
    out = {}
    for module, (U, S, Vt) in svds.items():
        out[module + LORA_B_SUFFIX] = np.ascontiguousarray(U[:, :rank] * (S[:rank] / s), np.float32)
        out[module + LORA_A_SUFFIX] = np.ascontiguousarray(Vt[:rank], np.float32)
    return out


# ---------------------------------------------------------------------------- NumPy oracles
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


def raflora_delta(clients: Sequence[tuple[np.ndarray, np.ndarray, float, float]]) -> np.ndarray:
    """NumPy oracle: ``sum_i sum_{k: r_k >= i} (p_k / w_i) s_k b_{k,i} a_{k,i}^T`` for
    ``clients = [(B_k, A_k, s_k, n_k)]``."""
    if not clients:
        raise ValueError("clients must be non-empty")
    total = float(sum(n for *_, n in clients))
    rmax = max(b.shape[1] for b, *_ in clients)
    w = np.zeros(rmax)
    for b, _a, _s, n in clients:
        w[: b.shape[1]] += n / total
    out = None
    for b, a, s, n in clients:
        r = b.shape[1]
        term = (n / total) * s * ((b.astype(np.float64) / w[:r]) @ a.astype(np.float64))
        out = term if out is None else out + term
    return out


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
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return b.astype(np.float32), a.astype(np.float32)
