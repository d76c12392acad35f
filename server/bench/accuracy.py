"""Accuracy against the Eckart–Young optimum.

With ``s`` the singular values of M (float64 gesdd, computed once per case and reused for
every backend), the best rank-k error is ``opt = sqrt(sum_{i>=k} s_i^2)``. A backend's
``(U, S, Vt)`` is scored by

* ``err_ratio = ||M - U S Vt||_F / opt`` (1 is optimal; computed in float64), and
* ``sigma_rel = max_{i<k} |S_i - s_i| / max(s_i, SIGMA_FLOOR * s_0)``: the worst relative error
  of the top-k singular values; values below ``SIGMA_FLOOR * s_0`` are at float32 round-off and
  are compared on that absolute scale instead.

When M has rank <= k the optimum is 0 up to float32 round-off (tail below
``TAIL_FLOOR * ||M||_F``) and the ratio is undefined: ``err_ratio`` is then None and
``err_rel = ||M - U S Vt||_F / ||M||_F`` (always reported) is the number to read.
"""

from __future__ import annotations

import numpy as np

SIGMA_FLOOR = 1e-5
TAIL_FLOOR = 1e-6


def optimum_residual(singular_values, k: int) -> float:
    """``||M - M_k||_F = sqrt(sum_{i>=k} s_i^2)``: the best rank-k error (Eckart–Young)."""
    tail = np.asarray(singular_values, dtype=np.float64)[k:]
    return float(np.sqrt(np.sum(tail ** 2)))


def ratio_to_optimum(err: float, opt: float) -> float:
    """``err / opt``; where the optimum is 0, 0 for an exact result and infinity otherwise."""
    if opt > 0:
        return err / opt
    return 0.0 if err == 0 else float("inf")


def normalise(U, S, Vt, k: int, d_out: int, d_in: int):
    """Check shapes, keep the top k, order by descending singular value."""
    U, S, Vt = np.asarray(U), np.asarray(S).reshape(-1), np.asarray(Vt)
    if U.ndim != 2 or U.shape[0] != d_out or Vt.ndim != 2 or Vt.shape[1] != d_in:
        raise ValueError(f"result shapes U{U.shape} S{S.shape} Vt{Vt.shape} do not fit M ({d_out} x {d_in})")
    if not (U.shape[1] == S.shape[0] == Vt.shape[0]) or S.shape[0] < k:
        raise ValueError(f"result has {S.shape[0]} singular triplets, expected at least k = {k}")
    order = np.argsort(-S, kind="stable")[:k]
    return U[:, order], S[order], Vt[order]


def score(M: np.ndarray, truth: np.ndarray, U, S, Vt, k: int) -> dict:
    U, S, Vt = normalise(U, S, Vt, k, *M.shape)
    if not (np.all(np.isfinite(S)) and np.all(np.isfinite(U)) and np.all(np.isfinite(Vt))):
        return {"err_ratio": None, "err_rel": None, "sigma_rel": None, "note": "non-finite output"}
    residual = M.astype(np.float64) - (U.astype(np.float64) * S.astype(np.float64)) @ Vt.astype(np.float64)
    err = float(np.linalg.norm(residual))
    norm = float(np.linalg.norm(truth))
    opt = optimum_residual(truth, k)
    top = truth[:k]
    denom = np.maximum(top, SIGMA_FLOOR * truth[0])
    sigma_rel = float(np.max(np.abs(S.astype(np.float64) - top) / denom))
    out = {"err_rel": err / norm if norm > 0 else 0.0, "sigma_rel": sigma_rel, "opt_rel": opt / norm if norm > 0 else 0.0}
    if opt > TAIL_FLOOR * norm:
        out["err_ratio"] = err / opt
    else:
        out["err_ratio"] = None
        out["note"] = "rank(M) <= k: optimum is 0, read err_rel"
    return out
