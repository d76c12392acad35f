"""Issue 12: the official FlexLoRA conventions, orthonormal completion, carry and raFLoRA
against NumPy oracles."""
from __future__ import annotations

import numpy as np
import pytest
from rt_helpers import MODULES, SVD32, make_update

from edge_client.completion import complete_rows, dead_slots
from server.core.oracles import carry_delta, flexlora_delta, raflora_delta
from server.federation.strategies import FlexLoRA, RaFLoRA, RankSpec, StrategyConfig, build_strategy
from server.federation.strategies.base import split_factors


def _clients(updates, module):
    out = []
    for u in updates:
        b, a = split_factors(u.factors)[module]
        out.append((b, a, u.module_scaling(module), u.num_examples))
    return out


def _mixed():
    return [make_update("c0", 2, seed=0, num_examples=5), make_update("c1", 4, seed=1, num_examples=20, alpha=8.0),
            make_update("c2", 3, seed=2, num_examples=11, rank_pattern={"up_proj": 6}),
            make_update("c3", 1, seed=3, num_examples=7)]


def official_factors(dw: np.ndarray, r: int, alpha: float):
    """alibaba/FederatedScope@FlexLoRA fed_utils/adaptive_peft.py, restated: full SVD,
    B = U_r diag(S_r) / (alpha / r), A = V_r^T."""
    u, s, vt = np.linalg.svd(dw, full_matrices=True)
    return u[:, :r] * s[:r] / (alpha / r), vt[:r]


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_default_split_is_the_official_one(rank):
    updates = _mixed()
    st = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=12, method="exact")
    assert st.split == "reference"
    st.aggregate(updates, round=1)
    msg = st.configure(client_id="x", spec=RankSpec(rank=rank), round=2)
    for module in MODULES:
        dw = flexlora_delta(_clients(updates, module))
        b_ref, a_ref = official_factors(dw, rank, 16.0)
        b, a = msg.factors[module + ".lora_B.weight"], msg.factors[module + ".lora_A.weight"]
        sign = np.sign(np.sum(a * a_ref, axis=1))       # SVD vectors are defined up to sign
        assert np.all(sign != 0)
        np.testing.assert_allclose(a * sign[:, None], a_ref, atol=2e-5 * np.sqrt(a.shape[1]))
        np.testing.assert_allclose(b * sign[None, :], b_ref, rtol=0, atol=1e-4 * np.abs(b_ref).max())
        s = 16.0 / rank
        np.testing.assert_allclose(s * b.astype(np.float64) @ a, s * b_ref @ a_ref, rtol=0,
                                   atol=1e-5 * np.abs(dw).max())


def test_completion_rows_are_orthonormal_and_orthogonal_to_the_kept_ones():
    rng = np.random.default_rng(0)
    a = np.zeros((6, 10))
    a[:2] = rng.standard_normal((2, 10))
    fill = np.array([False, False, True, True, True, True])
    out = complete_rows(a, fill)
    np.testing.assert_array_equal(out[:2], a[:2])
    np.testing.assert_allclose(out[2:] @ out[2:].T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(out[2:] @ a[:2].T, 0, atol=1e-12)
    np.testing.assert_array_equal(complete_rows(a, fill), out)          # deterministic
    assert dead_slots(a, np.zeros((3, 6))).tolist() == [False, False, True, True, True, True]


def test_slots_beyond_the_aggregate_rank_get_orthonormal_a_and_zero_b():
    low = [make_update(f"c{i}", 2, seed=i, num_examples=5) for i in range(2)]   # aggregate rank <= 4
    for split in ("reference", "balanced"):
        st = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=12, method="exact", split=split)
        st.aggregate(low, round=1)
        msg = st.configure(client_id="x", spec=RankSpec(rank=10), round=2)
        for module in MODULES:
            a, b = msg.factors[module + ".lora_A.weight"], msg.factors[module + ".lora_B.weight"]
            assert np.all(np.linalg.norm(a, axis=1) > 0.5), split     # no all-zero A row
            np.testing.assert_allclose(b[:, 4:], 0)
            np.testing.assert_allclose(a[4:] @ a[4:].T, np.eye(6), atol=1e-5)
            np.testing.assert_allclose(a[4:] @ a[:4].T, 0, atol=1e-5)
            dw = flexlora_delta(_clients(low, module))
            np.testing.assert_allclose(msg.module_scaling(module) * b.astype(np.float64) @ a, dw, **SVD32)


def test_carry_matches_numpy_oracle_over_two_rounds_with_sampling():
    r1 = _mixed()
    st = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=12, method="exact", carry=True)
    st.aggregate(r1, round=1)                  # round 1: no G_t, plain FlexLoRA
    g1 = st.global_delta()
    for module in MODULES:
        np.testing.assert_allclose(g1[module], flexlora_delta(_clients(r1, module)), **SVD32)
    # round 2: only two of the clients (sampling), with ranks 1 and 3/6
    r2 = [make_update("c3", 1, seed=13, num_examples=7),
          make_update("c2", 3, seed=12, num_examples=11, rank_pattern={"up_proj": 6})]
    st.aggregate(r2, round=2)
    for module in MODULES:
        want = carry_delta(g1[module], _clients(r2, module))
        np.testing.assert_allclose(st.global_delta()[module], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        # and the derivation: G_t + sum_k p_k Delta_k with Delta_k = X_k - T_{r_k}(G_t)
        u, s, vt = np.linalg.svd(g1[module].astype(np.float64))
        total = sum(n for *_, n in _clients(r2, module))
        g = g1[module].astype(np.float64).copy()
        for b, a, sk, n in _clients(r2, module):
            r = b.shape[1]
            g += n / total * (sk * b.astype(np.float64) @ a - (u[:, :r] * s[:r]) @ vt[:r])
        np.testing.assert_allclose(want, g, rtol=1e-9, atol=1e-9 * np.abs(g).max())


def test_carry_keeps_the_energy_beyond_the_smallest_rank():
    """Spectrum diagnostic: clients that send back exactly what they received (Delta = 0).
    Plain FlexLoRA shrinks direction i by w_i each round (energy at the smallest rank -> 1);
    carry keeps G fixed."""
    from server.runtimes.experiments.spectrum import retained_energy
    st_plain = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=12, method="exact")
    st_carry = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=12, method="exact", carry=True)
    specs = {"a": RankSpec(rank=1), "b": RankSpec(rank=4)}
    init = [make_update("a", 4, seed=0, num_examples=10), make_update("b", 4, seed=1, num_examples=10)]
    shares = {}
    for name, st in (("plain", st_plain), ("carry", st_carry)):
        st.aggregate(init, round=1)
        for t in range(2, 8):
            echo = []
            for cid, spec in specs.items():
                msg = st.configure(client_id=cid, spec=spec, round=t)
                u = make_update(cid, spec.rank, seed=0, num_examples=10)
                u.factors.update(msg.factors)
                echo.append(u)
            st.aggregate(echo, round=t)
        m = next(iter(MODULES))
        sv = np.linalg.svd(st.global_delta()[m].astype(np.float64), compute_uv=False)
        shares[name] = retained_energy(sv, [1])[1]
    assert shares["plain"] > 0.97
    m = next(iter(MODULES))
    first = flexlora_delta(_clients(init, m))
    assert shares["carry"] == pytest.approx(retained_energy(np.linalg.svd(first, compute_uv=False), [1])[1], abs=1e-3)


def test_raflora_matches_numpy_oracle_and_equals_flexlora_at_equal_ranks():
    updates = _mixed()
    st = RaFLoRA(StrategyConfig(alpha=16.0), max_rank=12, method="exact")
    st.aggregate(updates, round=1)
    for module in MODULES:
        want = raflora_delta(_clients(updates, module))
        np.testing.assert_allclose(st.global_delta()[module], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert not np.allclose(want, flexlora_delta(_clients(updates, module)))
    same = [make_update(f"c{i}", 3, seed=i, num_examples=5 + i) for i in range(3)]
    st.aggregate(same, round=2)
    for module in MODULES:
        np.testing.assert_allclose(raflora_delta(_clients(same, module)), flexlora_delta(_clients(same, module)),
                                   rtol=1e-12, atol=1e-12)
    msg = st.configure(client_id="x", spec=RankSpec(rank=2), round=3)
    assert msg.strategy == "raflora" and msg.factors[next(iter(MODULES)) + ".lora_A.weight"].shape[0] == 2


def test_build_strategy_passes_split_and_refuses_carry_elsewhere():
    specs = [RankSpec(rank=2), RankSpec(rank=4)]
    cfg = StrategyConfig(alpha=16.0)
    assert build_strategy("flexlora", cfg, specs=specs).split == "reference"
    assert build_strategy("flexlora", cfg, specs=specs, split="balanced", carry=True).carry
    assert build_strategy("raflora", cfg, specs=specs, split="balanced").split == "balanced"
    assert build_strategy("hetlora", cfg, specs=specs, split="balanced").name == "hetlora"
    with pytest.raises(ValueError, match="carry"):
        build_strategy("raflora", cfg, specs=specs, carry=True)
    with pytest.raises(ValueError, match="split"):
        FlexLoRA(cfg, split="sqrt")
