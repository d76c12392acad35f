"""The streaming sketch route (method="sketch"), its sparse sign test maps, and the
Aggregator's max_state_bytes (routes and sketch sizes chosen by the budget)."""
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
    assert not hasattr(streamed, "tests")  # the test maps are regenerated, not stored
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


# ---------------------------------------------------------------- sparse sign test maps
def _unit_update(d_out, d_in, i, j):
    """Factors of dW = e_i e_j^T: its sketches expose one column of each test map."""
    B = np.zeros((d_out, 1), np.float32)
    A = np.zeros((1, d_in), np.float32)
    B[i, 0], A[0, j] = 1.0, 1.0
    return [B], [A], [1.0]


@pytest.mark.parametrize("k, s", [(5, 11), (13, 27), (20, 20)])
def test_test_maps_are_sparse_signs_regenerated_from_the_seed(k, s):
    d_out, d_in = 40, 30
    zeta = min(k, 8)
    for i, j in ((0, 0), (7, 29), (39, 11)):
        sk = linalg.StreamingSketch(d_out, d_in, 2, sketch_size=k, core_size=s, seed=5)
        sk.add(*_unit_update(d_out, d_in, i, j))
        # Y = dW Omega = e_i Omega[j, :]: one column of the map, zeta entries +-1, rest 0
        row = sk.Y[i]
        assert np.count_nonzero(row) == zeta and set(np.abs(row[row != 0])) == {1.0}
        assert np.count_nonzero(sk.Y) == zeta
        col = sk.W[:, j]  # W = Psi dW = Psi[:, i] e_j^T
        assert np.count_nonzero(col) == zeta and set(np.abs(col[col != 0])) == {1.0}
        # Z = Phi e_i (Xi e_j)^T: an outer product of two zeta-sparse sign vectors
        assert np.count_nonzero(sk.Z) == min(s, 8) ** 2 and set(np.abs(sk.Z[sk.Z != 0])) == {1.0}
    same = [linalg.StreamingSketch(d_out, d_in, 2, sketch_size=k, core_size=s, seed=5) for _ in range(2)]
    other = linalg.StreamingSketch(d_out, d_in, 2, sketch_size=k, core_size=s, seed=6)
    rng = np.random.default_rng(0)
    Bs, As, w = make_problem(rng, d_out, d_in, [3, 4])
    for sk in same + [other]:
        sk.add(Bs, As, w)
    for x, y in ((same[0].Y, same[1].Y), (same[0].W, same[1].W), (same[0].Z, same[1].Z)):
        np.testing.assert_array_equal(x, y)  # same seed: the same maps, bit for bit
    assert not np.array_equal(same[0].Y, other.Y) and not np.array_equal(same[0].Z, other.Z)


def test_sketch_state_is_linear_in_dw_through_the_maps():
    """Y, W, Z of a sum of clients against the plain reference: the same sketches of every
    unit matrix e_i e_j^T (which read off the maps), combined with dW's entries in float64."""
    d_out, d_in, k, s = 12, 9, 5, 11
    unit = {}
    for i in range(d_out):
        for j in range(d_in):
            sk = linalg.StreamingSketch(d_out, d_in, 2, sketch_size=k, core_size=s, seed=1)
            sk.add(*_unit_update(d_out, d_in, i, j))
            unit[i, j] = (sk.Y.astype(np.float64), sk.W.astype(np.float64), sk.Z.astype(np.float64))
    rng = np.random.default_rng(3)
    Bs, As, w = make_problem(rng, d_out, d_in, [2, 3])
    M = dense(Bs, As, w)
    sk = linalg.StreamingSketch(d_out, d_in, 2, sketch_size=k, core_size=s, seed=1)
    sk.add(Bs, As, w)
    for got, part in ((sk.Y, 0), (sk.W, 1), (sk.Z, 2)):
        want = sum(M[i, j] * unit[i, j][part] for i in range(d_out) for j in range(d_in))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------- sized by the budget
def test_sketch_sizes_for_budget_is_the_largest_common_k_that_fits():
    shapes = [(400, 300), (360, 500), (64, 48)]
    for budget in (60_000, 200_000, 10**6, 10**8):
        sizes = linalg.sketch_sizes_for_budget(4, shapes, budget)
        used = sum(linalg.sketch_state_bytes(m, n, k, s) for (m, n), (k, s) in zip(shapes, sizes))
        assert used <= budget
        k = max(kk for kk, _ in sizes)
        assert all(kk == min(k, m, n) and ss == 2 * kk + 1 for (m, n), (kk, ss) in zip(shapes, sizes))
        bigger = [(min(k + 1, m, n), 2 * min(k + 1, m, n) + 1) for m, n in shapes]
        if bigger != sizes:  # one more would not fit (brute-force reference)
            assert sum(linalg.sketch_state_bytes(m, n, kk, ss) for (m, n), (kk, ss) in zip(shapes, bigger)) > budget
    assert linalg.sketch_sizes_for_budget(4, shapes, 10**8) == [(300, 601), (360, 721), (48, 97)]
    with pytest.raises(ValueError, match=r"below what the sketch route needs for 3 module\(s\) at the smallest"):
        linalg.sketch_sizes_for_budget(4, shapes, 1000)


def test_aggregator_sketches_use_the_budget_and_error_falls_with_it():
    big = {"m.q_proj": (400, 300), "m.down_proj": (360, 500)}
    rng = np.random.default_rng(7)
    clients = []
    for r in (8, 16, 4, 12, 16, 8):
        f = {}
        for m, (d_out, d_in) in big.items():
            B = rng.standard_normal((d_out, r)) * 0.9 ** np.arange(r)
            f[m + ".lora_B.weight"] = B.astype(np.float32)
            f[m + ".lora_A.weight"] = (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(np.float32)
        clients.append((f, int(rng.integers(5, 50))))
    total = sum(n for _, n in clients)
    dW = {m: sum((n / total) * (16.0 / f[m + ".lora_A.weight"].shape[0]) *
                 f[m + ".lora_B.weight"].astype(np.float64) @ f[m + ".lora_A.weight"] for f, n in clients)
          for m in big}
    dense_bytes = sum(4 * m * n for m, n in big.values())
    errors, sizes = [], []
    for budget in (dense_bytes // 20, dense_bytes // 6, dense_bytes // 2):
        agg = Aggregator(8, max_state_bytes=budget)
        for f, n in clients:
            agg.add(f, num_examples=n, alpha=16.0)
            assert agg.state_bytes() <= budget
        assert set(agg.routes_planned().values()) == {"sketch"}
        ks = [agg._modules[m].sketch.k for m in sorted(big)]
        # the budget is used: one more range vector would not fit
        more = sum(linalg.sketch_state_bytes(d_out, d_in, k + 1, 2 * k + 3)
                   for (d_out, d_in), k in zip([big[m] for m in sorted(big)], ks))
        assert agg.state_bytes() > 0.9 * budget and more > budget
        got = agg.finalize()
        ratio = []
        for m in big:
            s_all = np.linalg.svd(dW[m], compute_uv=False)
            U, S, Vt = got.modules[m]
            ratio.append(np.linalg.norm(dW[m] - (U.astype(np.float64) * S) @ Vt) / np.sqrt(np.sum(s_all[8:] ** 2)))
        errors.append(max(ratio))
        sizes.append(ks)
    assert sizes[0][0] != 2 * 8 + 1  # sized by the budget, not the default k = 2 rank + 1
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert errors[2] < errors[0] and errors[2] <= 1.05, errors
    # method="sketch" with a budget is sized the same way
    agg = Aggregator(8, method="sketch", max_state_bytes=dense_bytes // 6)
    agg.add(clients[0][0], num_examples=clients[0][1], alpha=16.0)
    assert [agg._modules[m].sketch.k for m in sorted(big)] == sizes[1]
