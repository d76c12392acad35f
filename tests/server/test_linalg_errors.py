"""Bad input raises ValueError naming the argument and index; the interpreter survives."""
from __future__ import annotations

import numpy as np
import pytest
from _server_testutil import make_problem

from server.core import linalg


@pytest.fixture
def good():
    return make_problem(np.random.default_rng(0), 12, 10, [2, 3, 4])


def _call(Bs, As, w, rank=2, **kw):
    return linalg.lowrank_svd(Bs, As, w, rank, **kw)


@pytest.mark.parametrize("case,match", [
    ("B_rows", r"Bs\[1\] has 11 rows, expected 12"),
    ("A_cols", r"As\[2\] has 9 columns, expected 10"),
    ("rank_mismatch", r"Bs\[0\] has 2 columns but As\[0\] has 3 rows"),
    ("nan", r"As\[1\] contains NaN or Inf"),
    ("inf", r"Bs\[2\] contains NaN or Inf"),
    ("neg_weight", r"weights\[1\] must be finite and >= 0"),
    ("nan_weight", r"weights\[0\] must be finite"),
    ("short_weights", r"weights has 2 entries, expected 3"),
    ("short_As", r"Bs has 3 entries but As has 2"),
    ("empty", r"Bs is empty"),
    ("int_dtype", r"Bs\[0\] must be a floating-point array"),
    ("one_d", r"As\[0\] must be 2-D"),
    ("rank0", r"rank must be >= 1"),
    ("method", r"method must be one of"),
    ("neg_over", r"oversample must be an integer >= 0"),
    ("threads", r"threads must be None or an integer >= 1"),
])
def test_bad_input(good, case, match):
    Bs, As, w = [list(x) for x in good]
    kw, rank = {}, 2
    if case == "B_rows":
        Bs[1] = Bs[1][:11]
    elif case == "A_cols":
        As[2] = As[2][:, :9]
    elif case == "rank_mismatch":
        As[0] = As[1]
    elif case == "nan":
        As[1] = As[1].copy()
        As[1][0, 3] = np.nan
    elif case == "inf":
        Bs[2] = Bs[2].copy()
        Bs[2][1, 1] = np.inf
    elif case == "neg_weight":
        w[1] = -0.1
    elif case == "nan_weight":
        w[0] = float("nan")
    elif case == "short_weights":
        w = w[:2]
    elif case == "short_As":
        As = As[:2]
    elif case == "empty":
        Bs, As, w = [], [], []
    elif case == "int_dtype":
        Bs[0] = Bs[0].astype(np.int32)
    elif case == "one_d":
        As[0] = As[0].ravel()
    elif case == "rank0":
        rank = 0
    elif case == "method":
        kw["method"] = "svd"
    elif case == "neg_over":
        kw["oversample"] = -1
    elif case == "threads":
        kw["threads"] = 0
    with pytest.raises(ValueError, match=match):
        _call(Bs, As, w, rank, **kw)


def test_batched_errors_name_the_layer(good):
    Bs, As, w = good
    bad_As = list(As)
    bad_As[1] = As[1].copy()
    bad_As[1][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"layers\[1\]\.As\[1\] contains NaN"):
        linalg.lowrank_svd_batched([(Bs, As), (Bs, bad_As)], w, 2)
    with pytest.raises(ValueError, match=r"rank has 1 entries, expected 2"):
        linalg.lowrank_svd_batched([(Bs, As), (Bs, As)], w, [2])
    with pytest.raises(ValueError, match=r"layers is empty"):
        linalg.lowrank_svd_batched([], w, 2)


def test_native_layer_rejects_bad_arrays_without_crashing(good):
    from server import _core
    Bs, As, w = good
    with pytest.raises(ValueError, match="float32"):
        _core.weighted_sum([b.astype(np.float64) for b in Bs], As, w)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.weighted_sum([np.asfortranarray(b) for b in Bs], As, w)
    with pytest.raises(ValueError, match="same length"):
        _core.weighted_sum(Bs, As, w[:1])
    with pytest.raises(ValueError, match="method"):
        _core.svd_batched([(Bs, As, w)], [2], "bogus", 10, 2, 0, False, 0)


def test_dense_and_weighted_sum_errors(good):
    Bs, As, w = good
    with pytest.raises(ValueError, match=r"M contains NaN"):
        linalg.dense_svd(np.full((4, 4), np.nan), 2)
    with pytest.raises(ValueError, match=r"method must be one of 'randomized', 'exact'"):
        linalg.dense_svd(np.ones((4, 4)), 2, method="auto")
    with pytest.raises(ValueError, match=r"out has shape \(3, 3\)"):
        linalg.weighted_sum(Bs, As, w, out=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"ranks\[1\] must be >= 1"):
        linalg.plan(10, 10, [3, 0], 2)
