"""Every route of server.core.linalg against the NumPy SVD optimum."""
from __future__ import annotations

import numpy as np
import pytest
from _server_testutil import check_svd, dense, make_problem

from server.core import linalg

METHODS = ["exact", "randomized", "dense", "auto"]
SHAPES = [(48, 40), (40, 56), (33, 33)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks,rank", [((3, 5, 2), 4), ((3, 5, 2), 10), ((20, 30, 25), 8),
                                        ((1,), 1)])
def test_route_matches_optimum(method, shape, ranks, rank):
    rng = np.random.default_rng(hash((shape, ranks, rank)) % 2**32)
    Bs, As, w = make_problem(rng, *shape, ranks)
    M = dense(Bs, As, w)
    U, S, Vt = linalg.lowrank_svd(Bs, As, w, rank, method=method, oversample=40)
    # oversample 40 covers the whole operator here, so even randomized routes are exact
    check_svd(M, rank, U, S, Vt)


@pytest.mark.parametrize("method", ["randomized", "dense"])
def test_randomized_close_to_optimum_on_decaying_spectrum(method):
    rng = np.random.default_rng(3)
    Bs, As, w = make_problem(rng, 300, 200, [40, 60, 50], decay=0.8)
    M = dense(Bs, As, w)
    U, S, Vt = linalg.lowrank_svd(Bs, As, w, 10, method=method)
    # approximate routes: singular values within 1%, residual within 1% of the optimum
    ratio = check_svd(M, 10, U, S, Vt, residual_ratio=1.01, compare_product=False, s_rtol=1e-2)
    assert ratio >= 1 - 1e-6


def test_requested_rank_above_operator_rank_pads_with_zeros():
    rng = np.random.default_rng(0)
    Bs, As, w = make_problem(rng, 30, 20, [2, 3])
    for method in METHODS:
        U, S, Vt = linalg.lowrank_svd(Bs, As, w, 25, method=method)
        assert U.shape == (30, 25) and Vt.shape == (25, 20)
        np.testing.assert_allclose(S[5:], 0, atol=1e-5)
        np.testing.assert_allclose((U * S) @ Vt, dense(Bs, As, w), atol=1e-4)


def test_rank_deficient_and_duplicate_clients():
    rng = np.random.default_rng(1)
    B = rng.standard_normal((40, 4)).astype(np.float32)
    B[:, 3] = B[:, 0]  # rank-deficient factor
    A = rng.standard_normal((4, 30)).astype(np.float32)
    Bs, As, w = [B, B, B], [A, A, A], [0.2, 0.3, 0.0]  # duplicates and a zero weight
    one = linalg.lowrank_svd([B], [A], [0.5], 6, method="exact")
    for method in METHODS:
        U, S, Vt = linalg.lowrank_svd(Bs, As, w, 6, method=method)
        check_svd(dense(Bs, As, w), 6, U, S, Vt)
        np.testing.assert_allclose(S, one[1], rtol=1e-4, atol=1e-5)


def test_all_zero_weights_give_zero():
    rng = np.random.default_rng(2)
    Bs, As, _ = make_problem(rng, 10, 12, [2, 3])
    U, S, Vt = linalg.lowrank_svd(Bs, As, [0.0, 0.0], 3)
    np.testing.assert_array_equal(S, 0)


def test_dense_svd_both_methods():
    rng = np.random.default_rng(4)
    Bs, As, w = make_problem(rng, 50, 35, [10, 12])
    M = dense(Bs, As, w)
    for method in ("exact", "randomized"):
        U, S, Vt = linalg.dense_svd(M.astype(np.float32), 7, method=method, oversample=30)
        check_svd(M, 7, U, S, Vt)


def test_weighted_sum_and_accumulate():
    rng = np.random.default_rng(5)
    Bs, As, w = make_problem(rng, 23, 17, [3, 1, 6])
    M = dense(Bs, As, w)
    np.testing.assert_allclose(linalg.weighted_sum(Bs, As, w), M, rtol=1e-5, atol=1e-5)
    acc = np.ones((23, 17), np.float32)
    res = linalg.weighted_sum(Bs, As, w, out=acc)
    assert res is acc
    np.testing.assert_allclose(acc, M + 1, rtol=1e-5, atol=1e-5)


def test_inputs_converted_from_other_float_dtypes_and_layouts():
    rng = np.random.default_rng(6)
    Bs, As, w = make_problem(rng, 20, 15, [3, 4])
    ref = linalg.lowrank_svd(Bs, As, w, 3, method="exact")
    Bs64 = [np.asfortranarray(b.astype(np.float64)) for b in Bs]
    got = linalg.lowrank_svd(Bs64, [a[:, ::1] for a in As], np.array(w), 3, method="exact")
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-6, atol=1e-6)


def test_plan_picks_exact_for_small_R_and_not_for_large():
    small = linalg.plan(2048, 2048, [8] * 16 + [30, 30, 30, 200], 200)
    assert small.method == "exact" and small.total_rank == 418
    big = linalg.plan(2048, 5504, [200] * 18, 200)
    assert big.method in ("randomized", "dense")
    assert big.cost["exact"] > 2 * min(big.cost["randomized"], big.cost["dense"])
    assert all(v > 0 for v in big.flops.values()) and big.reason


@pytest.mark.parametrize("eps", [1e-1, 1e-2, 1e-3, 1e-4, 0.0])
def test_exact_near_collinear_clients(eps):
    # the exact route's Gram form (cond^2 in double) must hand nearly dependent factors to
    # the Householder fallback before float32 output loses accuracy: sweep across the switch
    rng = np.random.default_rng(11)
    Bs, As, w = make_problem(rng, 120, 90, [6, 6, 10])
    Bs[1] = (Bs[0] + eps * rng.standard_normal(Bs[0].shape)).astype(np.float32)
    As[1] = (As[0] + eps * rng.standard_normal(As[0].shape) / np.sqrt(90)).astype(np.float32)
    M = dense(Bs, As, w)
    for rank in (4, 12, 22):
        U, S, Vt = linalg.lowrank_svd(Bs, As, w, rank, method="exact")
        check_svd(M, rank, U, S, Vt)


def test_exact_wide_spectrum_and_weights():
    # singular values spread over ~6 decades and weights over 4: the Gram route squares
    # them, so this is where a float32 Gram would fail
    rng = np.random.default_rng(12)
    Bs, As, _ = make_problem(rng, 200, 150, [20, 8, 30], decay=0.6)
    w = [1.0, 1e-2, 1e-4]
    M = dense(Bs, As, w)
    for rank in (5, 30, 58):
        U, S, Vt = linalg.lowrank_svd(Bs, As, w, rank, method="exact")
        check_svd(M, rank, U, S, Vt)
