"""The reference FlexLoRA aggregation, as the public FlexLoRA code does it.

Per module: every client's ``B_k @ A_k * alpha_k / r_k * p_k`` is formed in torch and
summed client by client, then a full SVD (``torch.linalg.svd``) of the dense sum is taken,
and the redistribution puts all of ``S`` on B. It holds every client's adapter in memory.
This is the test oracle and the baseline every benchmark reports against; use
:class:`server.core.aggregation.Aggregator` for real work.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from server.core.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, split_factor_dict

__all__ = ["reference_delta", "reference_lowrank_svd", "reference_aggregate",
           "reference_client_factors"]


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
        for module, (B, A) in split_factor_dict(u.factors, "update").items():
            r = B.shape[1]
            s = u.alpha / (math.sqrt(r) if getattr(u, "rslora", False) else r)
            per_module.setdefault(module, []).append((B, A, s * p))
    return {m: reference_lowrank_svd([b for b, _, _ in v], [a for _, a, _ in v],
                                     [w for _, _, w in v], max_rank)
            for m, v in sorted(per_module.items())}


def reference_client_factors(svds: Mapping[str, tuple], rank: int, alpha: float,
                             rslora: bool = False) -> dict[str, np.ndarray]:
    """All of ``S`` on B: ``B = U_r diag(S_r) / s``, ``A = Vt_r`` (so ``s B A`` is the
    rank-r truncation)."""
    s = alpha / (math.sqrt(rank) if rslora else rank)
    out = {}
    for module, (U, S, Vt) in svds.items():
        out[module + LORA_B_SUFFIX] = np.ascontiguousarray(U[:, :rank] * (S[:rank] / s), np.float32)
        out[module + LORA_A_SUFFIX] = np.ascontiguousarray(Vt[:rank], np.float32)
    return out
