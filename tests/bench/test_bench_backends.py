"""Every available CPU backend returns a truncated SVD that scores near the optimum on a small case."""

from __future__ import annotations

import pytest

from server.bench import accuracy
from server.bench.backends import BenchSettings, load_all
from server.bench.cases import CaseSpec

load_all()
from server.bench.backends.base import all_backends  # noqa: E402

CPU = [b for b in all_backends() if b.device == "cpu"]
CASES = {
    "dense-fast": CaseSpec(kind="dense", d_out=90, d_in=60, rank=6, spectrum="fast", seed=4),
    "lora": CaseSpec(kind="factored", d_out=70, d_in=50, rank=8, client_ranks=(2, 4, 8, 8), seed=5),
}


@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("backend", CPU, ids=lambda b: b.name)
def test_backend_is_near_optimal(backend, case_name):
    ok, reason = backend.available()
    if not ok:
        pytest.skip(reason)
    case = CASES[case_name].build()
    applies, why = backend.applies(case)
    if not applies:
        pytest.skip(why)
    settings = BenchSettings(power_iters=4)
    result = backend.to_numpy(backend.run(backend.prepare(case, settings), settings))
    s = accuracy.score(case.matrix, case.truth_singular_values(), *result, case.spec.rank)
    # float32 kernels: within 0.1% of the optimum with 4 power iterations on these spectra
    assert s["err_ratio"] is not None and s["err_ratio"] < 1.001, s
    assert s["sigma_rel"] < 1e-2, s
    fl = backend.flops(case, settings, {"arpack_products": 10})
    assert fl is None or fl > 0


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [b for b in all_backends() if b.device == "cuda"], ids=lambda b: b.name)
def test_cuda_backend_matches_the_optimum(backend):
    ok, reason = backend.available()
    if not ok:
        pytest.skip(reason)  # marker-selected run on a machine without a usable GPU
    case = CASES["dense-fast"].build()
    settings = BenchSettings(power_iters=4)
    result = backend.to_numpy(backend.run(backend.prepare(case, settings), settings))
    s = accuracy.score(case.matrix, case.truth_singular_values(), *result, case.spec.rank)
    assert s["err_ratio"] < 1.001 and s["sigma_rel"] < 1e-2, s


def test_a_backend_whose_library_is_missing_says_which_package():
    from server.bench.backends import Backend

    class Missing(Backend):
        name, requires = "missing:svd", ("no_such_module_for_flexlora", "nosuchpkg")

    ok, reason = Missing().available()
    assert not ok and reason.startswith("nosuchpkg not installed (")
    assert Backend().available() == (True, "")
