"""Property tests (hypothesis) over shapes, ranks and weights for the exact route."""
from __future__ import annotations

import numpy as np
from _server_testutil import check_svd, dense
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.core import linalg


@st.composite
def problems(draw):
    d_out = draw(st.integers(1, 24))
    d_in = draw(st.integers(1, 24))
    ranks = draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    # a weight is 0 or a float32-representable scale: 5e-163 (drawn once) rounds to 0 in the
    # float32 core while the float64 oracle keeps a nonzero (but unrepresentable) product
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 10.0)), min_size=len(ranks),
                            max_size=len(ranks)))
    rank = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    Bs = [rng.standard_normal((d_out, r)).astype(np.float32) for r in ranks]
    As = [rng.standard_normal((r, d_in)).astype(np.float32) for r in ranks]
    return Bs, As, weights, rank


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["exact", "auto", "dense"]))
def test_exact_routes_match_numpy(problem, method):
    Bs, As, w, rank = problem
    U, S, Vt = linalg.lowrank_svd(Bs, As, w, rank, method=method, oversample=30)
    M = dense(Bs, As, w)
    if np.abs(M).max() == 0:
        np.testing.assert_array_equal(S, 0)
        return
    check_svd(M, rank, U, S, Vt, residual_ratio=1.01)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_weighted_sum_matches_numpy(problem):
    Bs, As, w, _ = problem
    M = dense(Bs, As, w)
    got = linalg.weighted_sum(Bs, As, w)
    np.testing.assert_allclose(got, M, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(M).max()))
