"""Unit tests of the benchmark suite's pieces: cases, accuracy scoring, FLOP formulas, timing, memory."""

from __future__ import annotations

import numpy as np
import pytest

from server.bench import accuracy
from server.bench import flops as F
from server.bench.backends import BenchSettings, load_all, select
from server.bench.cases import CaseSpec, client_ranks_for_mix, load_case, save_case
from server.bench.measure import PeakMemory, time_call
from server.bench.presets import build_cases, get_preset, parse_shape
from server.workloads.catalog import load_workloads

WL = load_workloads()


def test_dense_case_has_the_requested_spectrum():
    case = CaseSpec(kind="dense", d_out=60, d_in=40, rank=5, spectrum="slow", seed=1).build()
    s = case.truth_singular_values()
    expected = (1.0 + np.arange(40)) ** -0.5
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-6)


def test_factored_case_matches_its_dense_form():
    spec = CaseSpec(kind="factored", d_out=30, d_in=20, rank=4, client_ranks=(2, 3, 5), seed=3)
    case = spec.build()
    want = sum(w * B.astype(np.float64) @ A for w, B, A in zip(case.weights, case.Bs, case.As))
    np.testing.assert_allclose(case.matrix, want, rtol=1e-5, atol=1e-6)
    assert case.matrix.dtype == np.float32 and case.matrix.shape == (30, 20)


def test_case_round_trips_through_safetensors(tmp_path):
    case = CaseSpec(kind="factored", d_out=12, d_in=9, rank=3, client_ranks=(1, 4), seed=2).build()
    case.matrix  # noqa: B018
    save_case(case, tmp_path / "c.safetensors")
    back = load_case(tmp_path / "c.safetensors")
    assert back.spec == case.spec
    np.testing.assert_array_equal(back.matrix, case.matrix)
    for a, b in zip(back.Bs + back.As, case.Bs + case.As):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw, field", [
    (dict(kind="sparse"), "kind"), (dict(d_out=0), "d_out"), (dict(rank=99), "rank"),
    (dict(spectrum="steep"), "spectrum"), (dict(kind="factored", client_ranks=()), "client_ranks"),
    (dict(kind="factored", client_ranks=(3, 0)), "client_ranks\\[1\\]"),
])
def test_bad_case_spec_names_the_field(kw, field):
    base = dict(kind="dense", d_out=10, d_in=8, rank=2, spectrum="fast")
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        CaseSpec(**base)


def test_rank_mix_counts_follow_the_distribution():
    ranks = client_ranks_for_mix(WL, "heavy_tail_light", 20, "ffn")
    assert len(ranks) == 20
    assert ranks.count(8) == 16 and max(ranks) == 200
    assert client_ranks_for_mix(WL, "heavy_tail_strong", 20, "attn", rank_scale=0.125).count(25) == 16
    with pytest.raises(ValueError, match="rank mix"):
        client_ranks_for_mix(WL, "nope", 20, "ffn")


def test_paper_preset_uses_the_llama_1_3b_shapes():
    cases = build_cases(WL, get_preset("paper"))
    shapes = {(c.d_out, c.d_in) for c in cases}
    assert shapes == {(2048, 2048), (5504, 2048), (2048, 5504)}
    assert all(c.rank == 200 for c in cases)
    with pytest.raises(ValueError, match="shapes"):
        parse_shape("2048by2048")


def test_score_is_one_for_the_optimum_and_above_for_worse():
    case = CaseSpec(kind="dense", d_out=50, d_in=30, rank=5, spectrum="slow").build()
    M = case.matrix
    U, S, Vt = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    best = accuracy.score(M, case.truth_singular_values(), U[:, :5], S[:5], Vt[:5], 5)
    assert best["err_ratio"] == pytest.approx(1.0, abs=1e-6) and best["sigma_rel"] < 1e-6
    # the 2nd..6th triplets instead of the 1st..5th: strictly worse than the optimum
    worse = accuracy.score(M, case.truth_singular_values(), U[:, 1:6], S[1:6], Vt[1:6], 5)
    assert worse["err_ratio"] > 1.01 and worse["sigma_rel"] > 0.1


def test_score_handles_exact_low_rank_and_bad_shapes():
    case = CaseSpec(kind="factored", d_out=20, d_in=16, rank=6, client_ranks=(2, 2)).build()
    U, S, Vt = np.linalg.svd(case.matrix, full_matrices=False)
    out = accuracy.score(case.matrix, case.truth_singular_values(), U[:, :6], S[:6], Vt[:6], 6)
    assert out["err_ratio"] is None and out["err_rel"] < 1e-5
    with pytest.raises(ValueError, match="triplets"):
        accuracy.score(case.matrix, case.truth_singular_values(), U[:, :3], S[:3], Vt[:3], 6)


def test_flop_formulas():
    assert F.gemm(2, 3, 4) == 48
    assert F.qr_thin(100, 10) == pytest.approx(4 * 100 * 100 - 4 / 3 * 1000)
    assert F.svd_thin(10, 100) == F.svd_thin(100, 10) == min(14 * 100 * 100 + 8000, 6 * 100 * 100 + 20000)
    # randomized on a dense M: 2q+2 products dominate at large sizes
    big = F.randomized_dense(4096, 4096, 100, 10, 2)
    assert big == pytest.approx(6 * F.gemm(4096, 4096, 110), rel=0.1)
    # through factors it is cheaper than through the dense M when R << d
    assert F.randomized_factored(4096, 4096, 64, 32, 10, 2) < F.randomized_dense(4096, 4096, 32, 10, 2)


def test_time_call_respects_budget_and_minimum():
    calls = []
    t = time_call(lambda: calls.append(1), repeats=50, min_repeats=3, budget_s=0.0)
    assert len(t.samples) == 3 == len(calls) and t.median >= 0 and t.spread >= 0
    with pytest.raises(Exception):
        time_call(lambda: None, repeats=0, min_repeats=0, budget_s=1.0).median  # noqa: B018


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as small:
        pass
    with PeakMemory() as big:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del a
    assert big.peak_bytes is not None and big.peak_bytes >= 48 * 2**20
    assert small.peak_bytes < big.peak_bytes


def test_registry_selection_and_settings():
    load_all()
    names = [b.name for b in select(["numpy:*", "torch-cpu:*"])]
    assert names == ["numpy:gesdd", "torch-cpu:linalg.svd", "torch-cpu:svd_lowrank"]
    with pytest.raises(ValueError, match="matches no backend"):
        select(["nonexistent:*"])
    with pytest.raises(ValueError, match="power_iters"):
        BenchSettings(power_iters=-1)
