"""GPU linalg against the CPU core and the Eckart-Young optimum (skipped without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

# fp32 GPU vs fp32 CPU through different algorithms (Jacobi vs divide and conquer, cuBLAS vs
# OpenBLAS): agreement is bounded by ~sqrt(R) eps ||M||, so compare relative to S[0].
S_RTOL, S_ATOL_REL = 1e-4, 1e-5
# randomized routes: residual within 5% of the optimum on decaying spectra (HMT, q = 2)
RANDOMIZED_SLACK = 1.05
# TF32 products carry a 10-bit mantissa: ~1e-3 relative error per product
TF32_RTOL = 2e-2

CASES = [  # (d_out, d_in, client ranks)
    (64, 48, [4, 8, 16]),          # R < d, d_out != d_in
    (40, 40, [30, 30]),            # R > d
    (96, 32, [8]),                 # single client
    (50, 70, [5, 5, 5, 5]),        # duplicate clients (set below)
]


def make_case(d_out, d_in, ranks, seed=0, duplicate=False):
    rng = np.random.default_rng(seed)
    Bs, As = [], []
    for r in ranks:
        decay = (1.0 / (1.0 + np.arange(r))).astype(np.float32)
        Bs.append(rng.standard_normal((d_out, r), dtype=np.float32) * decay)
        As.append(rng.standard_normal((r, d_in), dtype=np.float32))
    if duplicate:
        Bs[1], As[1] = Bs[0].copy(), As[0].copy()
    w = rng.uniform(0.1, 1.0, len(ranks)).tolist()
    w[-1] = 0.0 if len(ranks) > 2 else w[-1]  # a zero weight
    return Bs, As, w


def dense64(Bs, As, w):
    return sum(wk * B.astype(np.float64) @ A.astype(np.float64) for B, A, wk in zip(Bs, As, w))


def residual_ratio(M, U, S, Vt, rank):
    approx = (U.astype(np.float64) * S) @ Vt.astype(np.float64)
    s = np.linalg.svd(M, compute_uv=False)
    opt = np.sqrt(np.sum(s[rank:] ** 2))
    err = np.linalg.norm(M - approx)
    return err / max(opt, 1e-12 * s[0])


def to_np(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("method", ["exact", "randomized", "dense", "auto"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lowrank_svd_matches_cpu_and_optimum(torch_cuda, method, case):
    from server.core import cuda, linalg
    d_out, d_in, ranks = CASES[case]
    Bs, As, w = make_case(d_out, d_in, ranks, seed=case, duplicate=(case == 3))
    rank = 6
    Bd = [torch_cuda.from_numpy(b).cuda() for b in Bs]
    Ad = [torch_cuda.from_numpy(a).cuda() for a in As]
    U, S, Vt = cuda.lowrank_svd(Bd, Ad, w, rank, method=method)
    assert U.is_cuda and U.shape == (d_out, rank) and S.shape == (rank,) and Vt.shape == (rank, d_in)
    U, S, Vt = to_np(U), to_np(S), to_np(Vt)
    _, Sc, _ = linalg.lowrank_svd(Bs, As, w, rank, method="exact")
    M = dense64(Bs, As, w)
    if method in ("exact", "auto"):
        np.testing.assert_allclose(S, Sc, rtol=S_RTOL, atol=S_ATOL_REL * Sc[0])
        assert residual_ratio(M, U, S, Vt, rank) <= 1.0 + 1e-3
    else:
        assert residual_ratio(M, U, S, Vt, rank) <= RANDOMIZED_SLACK
    assert np.all(np.diff(S) <= 1e-6 * S[0])  # descending
    k = int(np.sum(S > 1e-6 * S[0]))
    np.testing.assert_allclose(U[:, :k].T @ U[:, :k], np.eye(k), atol=1e-4)
    np.testing.assert_allclose(Vt[:k] @ Vt[:k].T, np.eye(k), atol=1e-4)


def test_rank_above_operator_rank_pads_with_zeros(torch_cuda):
    from server.core import cuda
    Bs, As, w = make_case(20, 30, [2, 3], seed=5)
    U, S, Vt = cuda.lowrank_svd([torch_cuda.from_numpy(b).cuda() for b in Bs],
                                [torch_cuda.from_numpy(a).cuda() for a in As], w, 8,
                                method="exact")
    S = to_np(S)
    assert np.all(S[5:] == 0) and np.all(to_np(U)[:, 5:] == 0) and np.all(to_np(Vt)[5:] == 0)


def test_batched_equals_single_calls_and_accepts_cuda_array_interface(torch_cuda):
    from server.core import cuda

    class Wrapped:  # any __cuda_array_interface__ producer (CuPy, Numba) looks like this
        def __init__(self, t):
            self.__cuda_array_interface__ = t.__cuda_array_interface__
            self._keep = t

    layers, ws = [], []
    for i, (d_out, d_in, ranks) in enumerate(CASES):
        Bs, As, w = make_case(d_out, d_in, ranks, seed=10 + i)
        layers.append(([Wrapped(torch_cuda.from_numpy(b).cuda()) for b in Bs],
                       [torch_cuda.from_numpy(a).cuda() for a in As]))
        ws.append(w)
    batched = cuda.lowrank_svd_batched(layers, ws, 5, method="exact", streams=3)
    for (Bs, As), w, (U, S, Vt) in zip(layers, ws, batched):
        U1, S1, Vt1 = cuda.lowrank_svd(Bs, As, w, 5, method="exact")
        np.testing.assert_allclose(to_np(S), to_np(S1), rtol=1e-5, atol=1e-6 * float(S1[0]))


@pytest.mark.parametrize("tf32", [False, True])
def test_weighted_sum_matches_reference(torch_cuda, tf32):
    from server.core import cuda
    Bs, As, w = make_case(33, 47, [3, 7, 11], seed=2)
    M = dense64(Bs, As, w)
    out = cuda.weighted_sum([torch_cuda.from_numpy(b).cuda() for b in Bs],
                            [torch_cuda.from_numpy(a).cuda() for a in As], w, tf32=tf32)
    rtol = TF32_RTOL if tf32 else 1e-5
    np.testing.assert_allclose(to_np(out), M, rtol=rtol, atol=rtol * np.abs(M).max())
    acc = torch_cuda.ones(33, 47, device="cuda")
    cuda.weighted_sum([torch_cuda.from_numpy(b).cuda() for b in Bs[:1]],
                      [torch_cuda.from_numpy(a).cuda() for a in As[:1]], w[:1], out=acc)
    np.testing.assert_allclose(to_np(acc), 1.0 + dense64(Bs[:1], As[:1], w[:1]), rtol=1e-5,
                               atol=1e-5 * np.abs(M).max())


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_dense_svd_matches_cpu(torch_cuda, method):
    from server.core import cuda, linalg
    Bs, As, w = make_case(60, 45, [20], seed=3)
    M = (dense64(Bs, As, w)).astype(np.float32)
    U, S, Vt = cuda.dense_svd(torch_cuda.from_numpy(M).cuda(), 7, method=method)
    _, Sc, _ = linalg.dense_svd(M, 7, method="exact")
    if method == "exact":
        np.testing.assert_allclose(to_np(S), Sc, rtol=S_RTOL, atol=S_ATOL_REL * Sc[0])
    assert residual_ratio(M.astype(np.float64), to_np(U), to_np(S), to_np(Vt), 7) <= (
        1.0 + 1e-3 if method == "exact" else RANDOMIZED_SLACK)


def test_bad_input_raises_value_error_naming_the_argument(torch_cuda):
    from server.core import cuda
    B = torch_cuda.ones(8, 2, device="cuda")
    A = torch_cuda.ones(3, 5, device="cuda")
    with pytest.raises(ValueError, match=r"Bs\[0\] has 2 columns but As\[0\] has 3 rows"):
        cuda.lowrank_svd([B], [A], [1.0], 1)
    A2 = torch_cuda.ones(2, 5, device="cuda")
    A2[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"As\[0\] contains NaN"):
        cuda.lowrank_svd([B], [A2], [1.0], 1)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        cuda.lowrank_svd([B], [A2[:, :]], [-1.0], 1)
    with pytest.raises(ValueError, match="rank"):
        cuda.lowrank_svd([B], [A2], [1.0], 0)
