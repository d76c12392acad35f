"""Shared helpers for the server tests: problem generators, the NumPy oracle, tolerances."""
from __future__ import annotations

import numpy as np

# float32 kernels against a float64 oracle. An SVD of float32 data is accurate to about
# eps32 * ||M|| * sqrt(size) per entry, so tolerances scale with the largest singular value;
# rtol and atol are always given together.
F32 = {"rtol": 1e-4, "atol_rel": 2e-5}
# Eckart-Young residual ratio (ours / optimum) allowed for exact routes; the optimum can be
# ~0 when rank >= operator rank, so the ratio is only checked where the tail is not tiny.
EXACT_RESIDUAL = 1 + 1e-3


def make_problem(rng, d_out, d_in, ranks, weights=None, decay=None):
    Bs = [rng.standard_normal((d_out, r)).astype(np.float32) for r in ranks]
    As = [rng.standard_normal((r, d_in)).astype(np.float32) / np.sqrt(d_in) for r in ranks]
    if decay is not None:  # give each client a decaying spectrum
        Bs = [b * (decay ** np.arange(b.shape[1])).astype(np.float32) for b in Bs]
    if weights is None:
        weights = list(rng.uniform(0.1, 1.0, len(ranks)))
    return Bs, As, weights


def dense(Bs, As, weights):
    return sum(float(w) * b.astype(np.float64) @ a.astype(np.float64)
               for b, a, w in zip(Bs, As, weights))


def optimum(M, rank):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    r = min(rank, len(S))
    return U[:, :r], S[:r], Vt[:r], S


def check_svd(M, rank, U, S, Vt, *, residual_ratio=EXACT_RESIDUAL, compare_product=True,
              s_rtol=None):
    """Compare what is unique: singular values, U S Vt, and the Eckart-Young residual."""
    d_out, d_in = M.shape
    assert U.shape == (d_out, rank) and S.shape == (rank,) and Vt.shape == (rank, d_in)
    assert U.dtype == S.dtype == Vt.dtype == np.float32
    Uo, So, Vto, full = optimum(M, rank)
    scale = max(float(full[0]), 1e-30)
    atol = F32["atol_rel"] * scale
    r = len(So)
    assert np.all(np.diff(S) <= atol), "S must be descending"
    np.testing.assert_allclose(S[:r], So, rtol=s_rtol or F32["rtol"], atol=atol)
    np.testing.assert_allclose(S[r:], 0, atol=atol)
    # nonzero singular directions are orthonormal
    k = int(np.sum(S > 1e-3 * scale))
    np.testing.assert_allclose(U[:, :k].T @ U[:, :k], np.eye(k), atol=1e-4)
    np.testing.assert_allclose(Vt[:k] @ Vt[:k].T, np.eye(k), atol=1e-4)
    ours = (U.astype(np.float64) * S) @ Vt
    best = (Uo * So) @ Vto
    gap_ok = r == len(full) or full[r - 1] - full[r] > 1e-3 * scale
    if compare_product and gap_ok:  # the truncation is unique only with a gap
        np.testing.assert_allclose(ours, best, rtol=0, atol=1e-3 * scale)
    tail = np.linalg.norm(M - best)
    err = np.linalg.norm(M - ours)
    if tail > 1e-3 * np.linalg.norm(M):
        assert err <= residual_ratio * tail, (err / tail, residual_ratio)
    else:
        assert err <= 1e-3 * np.linalg.norm(M) + 1e-6
    return err / max(tail, 1e-30)
