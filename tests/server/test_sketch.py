"""The streaming sketch route (method="sketch") and the Aggregator's max_state_bytes."""
from __future__ import annotations

import numpy as np
import pytest
from _server_testutil import check_svd, dense, make_problem

from server.core import linalg
from server.core.aggregation import Aggregator
from server.core.oracles import reference_aggregate


def test_sketch_exact_when_it_covers_the_operator():
    # k >= rank(dW): the range and co-range sketches span dW exactly, so the core solve
    # recovers Q^T dW P and the result is the exact truncated SVD (float32 rounding only)
    rng = np.random.default_rng(0)
    Bs, As, w = make_problem(rng, 60, 50, [3, 5, 2])
    M = dense(Bs, As, w)
    for rank in (4, 10):
        U, S, Vt = linalg.lowrank_svd(Bs, As, w, rank, method="sketch", sketch_size=12)
        check_svd(M, rank, U, S, Vt)


def test_streaming_equals_one_shot_and_memory_is_flat():
    rng = np.random.default_rng(1)
    Bs, As, w = make_problem(rng, 80, 70, [4, 6, 9, 5, 7])
    one = linalg.StreamingSketch(80, 70, 6, seed=3)
    one.add(Bs, As, w)
    streamed = linalg.StreamingSketch(80, 70, 6, seed=3)
    sizes = []
    for b, a, wk in zip(Bs, As, w):
        streamed.add([b], [a], [wk])
        sizes.append(streamed.nbytes)
    assert len(set(sizes)) == 1 and sizes[0] == 4 * (13 * (80 + 70) + 27 * 27)
    for x, y in ((one.Y, streamed.Y), (one.W, streamed.W), (one.Z, streamed.Z)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    assert streamed.tests is one.tests  # one shape, one seed: shared test matrices
    U1, S1, _ = one.finalize()
    U2, S2, _ = streamed.finalize()
    np.testing.assert_allclose(S1, S2, rtol=1e-4, atol=1e-5 * S1[0])


def test_sketch_error_falls_with_size():
    rng = np.random.default_rng(2)
    Bs, As, w = make_problem(rng, 200, 160, [20, 30, 25], decay=0.85)
    M = dense(Bs, As, w)
    s_all = np.linalg.svd(M, compute_uv=False)
    opt = np.sqrt(np.sum(s_all[10:] ** 2))
    ratios = []
    for k in (21, 41, 75):
        U, S, Vt = linalg.lowrank_svd(Bs, As, w, 10, method="sketch", sketch_size=k)
        ratios.append(np.linalg.norm(M - (U.astype(np.float64) * S) @ Vt) / opt)
    assert ratios[0] >= ratios[2] and ratios[2] <= 1 + 1e-3, ratios  # k = 75 = R covers dW


def test_sketch_batched_matches_single_and_validates():
    rng = np.random.default_rng(4)
    layers = [make_problem(rng, 40, 30, [3, 4])[:2], make_problem(rng, 40, 30, [5])[:2]]
    weights = [[0.5, 0.25], [1.0]]
    got = linalg.lowrank_svd_batched(layers, weights, 3, method="sketch")
    for (Bs, As), w, (U, S, Vt) in zip(layers, weights, got):
        ref = linalg.lowrank_svd(Bs, As, w, 3, method="sketch")
        np.testing.assert_allclose(S, ref[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="core_size"):
        linalg.StreamingSketch(40, 30, 3, sketch_size=8, core_size=4)
    sk = linalg.StreamingSketch(40, 30, 3)
    with pytest.raises(ValueError, match=r"layers\[0\] is 41x30"):
        sk.add([np.ones((41, 2), np.float32)], [np.ones((2, 30), np.float32)], [1.0])


def test_huge_finite_entries_rejected_up_front():
    rng = np.random.default_rng(5)
    Bs, As, w = make_problem(rng, 20, 10, [2, 3])
    Bs[1] = Bs[1] * np.float32(1e30)
    for method in ("exact", "auto", "sketch"):
        with pytest.raises(ValueError, match=r"Bs\[1\] has an entry of magnitude"):
            linalg.lowrank_svd(Bs, As, w, 2, method=method)
    with pytest.raises(ValueError, match="could reach"):
        linalg.lowrank_svd([np.full((4, 2), 1e12, np.float32)], [np.full((2, 4), 1e12, np.float32)], [1.0], 1)


MODULES = {"m.q_proj": (48, 40), "m.down_proj": (36, 56)}


def _updates(seed, ranks, modules=MODULES):
    rng = np.random.default_rng(seed)

    class U:  # ClientUpdate-like, for the reference
        pass
    out = []
    for r in ranks:
        u = U()
        u.factors = {}
        for m, (d_out, d_in) in modules.items():
            u.factors[m + ".lora_B.weight"] = rng.standard_normal((d_out, r)).astype(np.float32)
            u.factors[m + ".lora_A.weight"] = rng.standard_normal((r, d_in)).astype(np.float32)
        u.num_examples, u.alpha, u.rslora = int(rng.integers(5, 50)), 16.0, False
        out.append(u)
    return out


def test_aggregator_sketch_route_matches_reference_when_it_covers_dw():
    updates = _updates(0, (2, 3, 4))  # R = 9 <= k = 2*6+1
    agg = Aggregator(6, method="sketch")
    for u in updates:
        agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha)
    assert set(agg.routes_planned().values()) == {"sketch"}
    got = agg.finalize()
    assert set(got.routes.values()) == {"sketch"}
    ref = reference_aggregate(updates, 6)
    for m, (U, S, Vt) in ref.items():
        U2, S2, Vt2 = got.modules[m]
        np.testing.assert_allclose(S2, S, rtol=1e-4, atol=1e-5 * S[0])
        np.testing.assert_allclose((U2 * S2) @ Vt2, (U * S) @ Vt, rtol=0, atol=1e-3 * S[0])


def test_max_state_bytes_picks_sketch_only_when_needed():
    big = {"m.q_proj": (400, 300), "m.down_proj": (360, 500)}  # where a sketch is smaller than dW
    updates = _updates(1, (2, 3), big)
    dense_bytes = sum(4 * m * n for m, n in big.values())
    loose = Aggregator(4, max_state_bytes=dense_bytes)
    tight = Aggregator(4, max_state_bytes=dense_bytes - 1)
    for agg in (loose, tight):
        for u in updates:
            agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha)
    assert "sketch" not in loose.routes_planned().values()
    assert set(tight.routes_planned().values()) == {"sketch"}
    assert tight.state_bytes() <= dense_bytes - 1
    ref = reference_aggregate(updates, 4)  # R = 5 <= k = 9: the sketch is exact here
    got = tight.finalize()
    for m, (U, S, Vt) in ref.items():
        np.testing.assert_allclose(got.modules[m][1], S, rtol=1e-4, atol=1e-5 * S[0])
    with pytest.raises(ValueError, match="max_state_bytes=100 is below"):
        Aggregator(4, max_state_bytes=100).add(updates[0].factors, num_examples=1, alpha=16.0)
    with pytest.raises(ValueError, match="max_state_bytes needs method"):
        Aggregator(4, method="dense", max_state_bytes=10**9)
