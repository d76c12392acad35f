"""Orthonormal completion of LoRA ``A`` rows for slots that carry no direction.

The official FlexLoRA code (alibaba/FederatedScope, branch FlexLoRA,
``fed_utils/adaptive_peft.py``) takes a *full* SVD of the aggregated update, so a client whose
rank exceeds the update's numerical rank still receives orthonormal rows of ``V^T`` in its
extra ``A`` slots (with ``B`` zero there, because the singular values are zero). Such a slot
learns like a fresh LoRA slot (``B`` gets gradient through ``A``). If both the ``A`` row and
the ``B`` column of a slot are zero, the slot gets exactly zero gradient and can never learn.

One rule, used by the server (``server.core.adapter.GlobalAdapter.client_factors``) and by
the client loader (``edge_client.trainer._load_factors``): every slot without a direction gets
a unit-norm ``A`` row orthogonal to the rows that do carry one (and to each other), ``B`` zero.
The rows are deterministic (a fixed-seed Gaussian draw, projected and orthonormalised).
"""
from __future__ import annotations

import numpy as np

__all__ = ["complete_rows", "dead_slots"]


def dead_slots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean mask of the slots (rows of ``a``, columns of ``b``) that are both all-zero."""
    a = np.asarray(a)
    b = np.asarray(b)
    return ~np.any(a != 0, axis=1) & ~np.any(b != 0, axis=0)


def complete_rows(a: np.ndarray, fill: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """``a`` (r x d_in) with the rows where ``fill`` is True replaced by unit-norm rows
    orthogonal to the other rows' span and to each other. At most ``d_in`` rows can be
    orthonormal; rows beyond that are left as they are."""
    a = np.array(a, dtype=np.float64, copy=True)
    fill = np.asarray(fill, dtype=bool)
    if a.ndim != 2 or fill.shape != (a.shape[0],):
        raise ValueError(f"a must be 2-D and fill one flag per row, got {a.shape} and {fill.shape}")
    idx = np.flatnonzero(fill)
    if idx.size == 0:
        return a
    d_in = a.shape[1]
    keep = a[~fill]
    if keep.size:
        q, rr = np.linalg.qr(keep.T)                   # d_in x k orthonormal basis of the kept span
        q = q[:, np.abs(np.diag(rr)) > 1e-12 * max(1.0, np.abs(rr).max())]
    else:
        q = np.zeros((d_in, 0))
    room = d_in - q.shape[1]
    n = min(idx.size, room)
    if n <= 0:
        return a
    g = np.random.default_rng(seed).standard_normal((d_in, n))
    for _ in range(2):                                 # project out the kept span (twice: stable)
        g -= q @ (q.T @ g)
    new, _ = np.linalg.qr(g)
    a[idx[:n]] = new.T
    return a
