"""Determinism, threads, and the batched entry point."""
from __future__ import annotations

import numpy as np
import pytest
from _server_testutil import check_svd, dense, make_problem

from server.core import linalg


def _modules(seed, n=6):
    rng = np.random.default_rng(seed)
    layers, weights = [], []
    for i in range(n):
        Bs, As, w = make_problem(rng, 30 + 7 * i, 25 + 3 * i, [2 + i, 5, 9 - i])
        layers.append((Bs, As))
        weights.append(w)
    return layers, weights


@pytest.mark.parametrize("method", ["randomized", "dense", "exact"])
def test_same_seed_same_answer(method):
    rng = np.random.default_rng(7)
    Bs, As, w = make_problem(rng, 120, 90, [30, 40])
    a = linalg.lowrank_svd(Bs, As, w, 8, method=method, seed=11)
    b = linalg.lowrank_svd(Bs, As, w, 8, method=method, seed=11)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_one_and_two_threads_agree(method):
    rng = np.random.default_rng(8)
    Bs, As, w = make_problem(rng, 200, 150, [40, 50])
    one = linalg.lowrank_svd(Bs, As, w, 8, method=method, threads=1)
    two = linalg.lowrank_svd(Bs, As, w, 8, method=method, threads=2)
    np.testing.assert_allclose(one[1], two[1], rtol=1e-5, atol=1e-5 * one[1][0])
    np.testing.assert_allclose((one[0] * one[1]) @ one[2], (two[0] * two[1]) @ two[2],
                               rtol=0, atol=1e-4 * one[1][0])


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_equals_loop(threads):
    layers, weights = _modules(9)
    batched = linalg.lowrank_svd_batched(layers, weights, 4, method="randomized",
                                         threads=threads)
    assert len(batched) == len(layers)
    for (Bs, As), w, got in zip(layers, weights, batched):
        one = linalg.lowrank_svd(Bs, As, w, 4, method="randomized", threads=1)
        np.testing.assert_allclose(got[1], one[1], rtol=1e-5, atol=1e-6)
        check_svd(dense(Bs, As, w), 4, *got, residual_ratio=1.05, compare_product=False,
                  s_rtol=5e-2)  # randomized: approximate


def test_batched_shared_weights_and_per_layer_ranks():
    layers, _ = _modules(10, n=3)
    got = linalg.lowrank_svd_batched(layers, [0.5, 0.25, 0.25], [1, 2, 3], method="exact")
    for (Bs, As), r, res in zip(layers, [1, 2, 3], got):
        check_svd(dense(Bs, As, [0.5, 0.25, 0.25]), r, *res)


def test_thread_setting_roundtrip():
    before = linalg.get_num_threads()
    try:
        linalg.set_num_threads(1)
        assert linalg.get_num_threads() == 1
        linalg.set_num_threads(10_000)  # capped at the core count
        assert 1 <= linalg.get_num_threads() <= 10_000
    finally:
        linalg.set_num_threads(None)
    assert linalg.get_num_threads() == before or before >= 1
