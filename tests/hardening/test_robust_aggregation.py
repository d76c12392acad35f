"""Issue 13, classes 2-4: atomic adds, robust aggregation (NumPy oracles for the Gram-matrix
math), and a bad round that is not committed."""
from __future__ import annotations

import numpy as np
import pytest
from test_reply_handling import BASE, honest  # noqa: E402  (tests/hardening on sys.path)

from server.federation import Reply, RoundEngine
from server.federation.strategies import STRATEGIES, RankSpec, RobustConfig, StrategyConfig, make_strategy
from server.federation.strategies.robust import (
    cap_shares,
    clip_multipliers,
    effective_norms,
    inner_products,
    squared_distances,
    trim_by_distance,
)


def _factored(seed: int, ranks=(2, 3)):
    rng = np.random.default_rng(seed)
    return {f"m{i}": (0.5 + i, rng.standard_normal((7, r)), rng.standard_normal((r, 5))) for i, r in enumerate(ranks)}


def _dense(u):
    return {m: s * b @ a for m, (s, b, a) in u.items()}


def test_gram_math_matches_dense_oracle():
    ups = [_factored(0), _factored(1, (4, 1)), _factored(2, (1, 2))]
    dense = [_dense(u) for u in ups]
    norms = [np.sqrt(sum(np.sum(d * d) for d in x.values())) for x in dense]
    np.testing.assert_allclose(effective_norms(ups), norms, rtol=1e-10)
    g = np.array([[sum(np.sum(x[m] * y[m]) for m in x) for y in dense] for x in dense])
    np.testing.assert_allclose(inner_products(ups), g, rtol=1e-10)
    d = np.array([[sum(np.sum((x[m] - y[m]) ** 2) for m in x) for y in dense] for x in dense])
    np.testing.assert_allclose(squared_distances(ups), d, rtol=1e-9, atol=1e-9)


def test_clip_and_cap_and_trim():
    np.testing.assert_allclose(clip_multipliers([1.0, 4.0], clip_norm=2.0), [1.0, 0.5])
    np.testing.assert_allclose(clip_multipliers([1.0, 2.0, 30.0], clip_adaptive=2.0), [1.0, 1.0, 4.0 / 30])
    w = cap_shares([1.0, 1.0, 98.0], 0.5)
    assert w.sum() == pytest.approx(100.0) and w.max() / w.sum() == pytest.approx(0.5)
    assert w[0] == pytest.approx(w[1])
    np.testing.assert_allclose(cap_shares([1.0, 2.0, 3.0], 0.9), [1.0, 2.0, 3.0])
    d = squared_distances([_factored(0), _factored(0), _factored(0), {k: (s * 100, b, a) for k, (s, b, a)
                                                                       in _factored(5).items()}])
    assert trim_by_distance(d, 0.25) == [0, 1, 2]
    assert trim_by_distance(d, 0.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        RobustConfig(trim_fraction=0.5)
    with pytest.raises(ValueError):
        RobustConfig(clip_norm=float("nan"))


def _round(name, updates, **robust):
    opts = {"rank": 4} if name == "fedit" else {}
    st = make_strategy(name, StrategyConfig(base_model=BASE, robust=RobustConfig(**robust) if robust else None),
                       **opts)
    agg = st.begin_round(1)
    for u in updates:
        agg.add(u)
    agg.finalize()
    return st, agg


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_defences_limit_one_attacker_in_every_strategy(name):
    honest_ups = [honest(f"c{i}", i) for i in range(5)]
    clean, _ = _round(name, honest_ups)
    evil = honest("evil", 9)
    evil.num_examples = 10**9
    evil.factors = {k: (v * np.float32(-50) if "lora_B" in k else v) for k, v in evil.factors.items()}

    def err(st):
        ref = clean.global_delta()
        return sum(float(np.linalg.norm(st.global_delta()[m] - ref[m])) for m in ref)

    attacked, _ = _round(name, [*honest_ups, evil])
    defended, agg = _round(name, [*honest_ups, evil], trim_fraction=0.2, clip_adaptive=2.0, max_weight_share=0.3)
    assert "evil" in agg.robust_report["trimmed"]
    assert err(defended) < 0.2 * err(attacked)


def test_robust_off_is_bit_identical_to_streaming():
    ups = [honest(f"c{i}", i) for i in range(4)]
    a, _ = _round("flexlora", ups)
    b, _ = _round("flexlora", ups, trim_fraction=0.0)   # RobustConfig with nothing on
    for m, d in a.global_delta().items():
        np.testing.assert_array_equal(d, b.global_delta()[m])


def test_aggregator_add_is_atomic_when_a_fold_fails(monkeypatch):
    from server.core import aggregation
    agg = aggregation.Aggregator(4, method="auto", dense_threshold=6)
    ups = [honest(f"c{i}", i) for i in range(3)]
    agg.add_update(ups[0])
    before = agg.state_bytes(), agg.num_clients, agg.total_weight, {m: (s.total_rank, s.total_weight, len(s.Bs))
                                                                    for m, s in agg._modules.items()}

    def boom(*a, **k):
        raise MemoryError("simulated allocation failure")
    monkeypatch.setattr(aggregation.linalg, "weighted_sum", boom)
    with pytest.raises(MemoryError):
        agg.add_update(ups[1])        # pushes the rank past 6: the fold fails
    after = agg.state_bytes(), agg.num_clients, agg.total_weight, {m: (s.total_rank, s.total_weight, len(s.Bs))
                                                                   for m, s in agg._modules.items()}
    assert after == before
    monkeypatch.undo()
    agg.add_update(ups[1])            # the same client is accepted once the fold can run
    assert agg.num_clients == 2


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_add_is_atomic(name, monkeypatch):
    opts = {"rank": 4} if name == "fedit" else {}
    st = make_strategy(name, StrategyConfig(base_model=BASE), **opts)
    agg = st.begin_round(1)
    agg.add(honest("c0", 0))
    bad = honest("c1", 1)
    # the second module is broken after validation: the first module must not be half-added
    mods = sorted(bad.modules())
    a_key = mods[-1] + ".lora_A.weight"
    bad.factors[a_key] = bad.factors[a_key][:, :-1]
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as nothing changed
        agg.add(bad)
    assert agg.client_ids == ["c0"] and agg.total_examples == 5
    agg.add(honest("c2", 2))
    agg.finalize()
    ref = make_strategy(name, StrategyConfig(base_model=BASE), **opts)
    ref.aggregate([honest("c0", 0), honest("c2", 2)], round=1)
    for m, d in ref.global_delta().items():
        np.testing.assert_allclose(st.global_delta()[m], d, rtol=1e-6, atol=1e-7)


class _Transport:
    def __init__(self, scale_round: int | None = None):
        self.scale_round = scale_round

    def exchange(self, plan):
        from edge_client.wire import encode_update
        out = []
        for o in plan.orders:
            u = honest(o.client_id, o.index + 10 * o.round)
            u.round = o.round
            if o.round == self.scale_round:
                u.factors = {k: (v * np.float32(1000) if "lora_B" in k else v) for k, v in u.factors.items()}
            out.append(Reply(client_id=o.client_id, data=encode_update(u)))
        return out


def test_a_round_whose_norm_explodes_is_not_committed_and_the_run_goes_on(tmp_path):
    st = make_strategy("flexlora", StrategyConfig(base_model=BASE))
    specs = {f"c{i}": RankSpec(rank=4) for i in range(3)}
    eng = RoundEngine(st, specs, checkpoint_dir=tmp_path, max_norm_growth=10.0)
    eng.start()
    eng.run_round(1, _Transport())
    good = {k: v.copy() for k, v in st.state_tensors().items()}
    entry = eng.run_round(2, _Transport(scale_round=2))
    assert "grew" in entry["failed"] and entry["clients"] == 0
    for k, v in st.state_tensors().items():
        np.testing.assert_array_equal(v, good[k])
    entry = eng.run_round(3, _Transport())
    assert "failed" not in entry and eng.round == 3
    eng.close()


def test_client_exception_becomes_a_rejected_reply():
    from server.runtimes.clients import InProcessClients

    class Boom:
        base = None

        def load_global(self, g):
            pass

        def train(self, *a, **k):
            raise RuntimeError("device on fire")

    t = InProcessClients.__new__(InProcessClients)
    from concurrent.futures import ThreadPoolExecutor
    t.trainer, t.examples, t.faults, t.timeout_s = Boom(), {"c0": []}, {}, 5.0
    t._pool = ThreadPoolExecutor(max_workers=1)
    from server.federation import Order
    reply = t._ask(Order(client_id="c0", round=1, index=0, seed=0, spec=RankSpec(rank=4), message=None, wire=None))
    t._pool.shutdown()
    assert reply.data is None and "device on fire" in reply.error
