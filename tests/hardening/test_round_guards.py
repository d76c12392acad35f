"""Server-side guards of a round: decoder limits from the strategy config, the per-round
aggregator memory budget, replies that claim another client, and unexpected errors while
handling one reply (which reject that reply, not the run)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from test_reply_handling import BASE, SHAPES, honest  # noqa: E402  (tests/hardening on sys.path)

from edge_client.wire import DecodeLimits, encode_update
from server.federation.strategies import STRATEGIES, RankSpec, StrategyConfig, make_strategy
from server.runtimes.config import RunConfig
from server.runtimes.simulate import run_simulation

SMALL = dict(rounds=1, num_clients=3, num_heldout=1, local_steps=1, batch_size=2, rank_distribution="uniform",
             threads=1, progress=False, eval_max_new_tokens=2)


def _strategy(name: str, method: str | None = None, **config):
    opts = {"rank": 4} if name == "fedit" else {}
    if method is not None:
        opts["method"] = method
    return make_strategy(name, StrategyConfig(base_model=BASE, module_shapes=SHAPES, **config), **opts)


def test_decode_reply_uses_the_configured_limits():
    data = encode_update(honest("c0", 0))
    _strategy("flexlora").decode_reply(data, spec=RankSpec(rank=4))
    with pytest.raises(ValueError, match="max_bytes|bytes"):
        _strategy("flexlora", limits=DecodeLimits(max_bytes=len(data) - 1)).decode_reply(data, spec=RankSpec(rank=4))
    with pytest.raises(ValueError, match="max_rank|rank"):
        _strategy("flexlora", limits=DecodeLimits(max_rank=3)).decode_reply(data, spec=RankSpec(rank=4))


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "1"])
def test_bad_max_round_bytes_is_refused(bad):
    with pytest.raises(ValueError, match="max_round_bytes"):
        StrategyConfig(max_round_bytes=bad)
    with pytest.raises(ValueError, match="limits"):
        StrategyConfig(limits={"max_bytes": 10})


# FlexLoRA on auto/sketch keeps to the budget in its aggregator (test below); on exact the
# round refuses the reply, as every other strategy does
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_round_memory_budget_rejects_the_update_that_would_exceed_it(name):
    method = "exact" if name == "flexlora" else None
    ups = [honest(f"c{i}", i) for i in range(3)]
    one = sum(v.nbytes for v in ups[0].factors.values())
    free = _strategy(name, method).begin_round(1)
    held = []
    for u in ups[:2]:
        free.add(u)
        held.append(free.held_bytes())
    # room for exactly what the round held after two updates: the third is refused, the round goes on
    budget = held[-1] + one - 1
    agg = _strategy(name, method, max_round_bytes=budget).begin_round(1)
    assert not agg.budget_in_aggregator
    agg.add(ups[0])
    agg.add(ups[1])
    with pytest.raises(ValueError, match=f"max_round_bytes={budget}") as exc:
        agg.add(ups[2])
    assert "'c2'" in str(exc.value) and "c2" not in agg.client_ids
    assert agg.finalize().num_clients == 2
    # the same budget plus one byte admits all three
    roomy = _strategy(name, method, max_round_bytes=held[-1] + one).begin_round(1)
    for u in ups:
        roomy.add(u)
    assert roomy.finalize().num_clients == 3


def test_flexlora_round_budget_is_the_aggregators_sketches_sized_by_it():
    """max_round_bytes on FlexLoRA (auto): modules whose dense state would not fit go to the
    sketch route sized to use the budget; every reply is admitted and the round's state stays
    within the budget; a budget below the smallest sketches refuses the reply and says so."""
    from server.core import linalg
    from server.core.oracles import reference_aggregate
    big = {"base_model.model.model.layers.0.self_attn.q_proj": (300, 200),
           "base_model.model.model.layers.0.mlp.up_proj": (400, 200)}
    ups = [honest(f"c{i}", i, rank=4, shapes=big) for i in range(4)]
    dense = sum(4 * m * n for m, n in big.values())
    budget = dense // 3

    def flex(budget):
        cfg = StrategyConfig(base_model=BASE, module_shapes=big, max_round_bytes=budget)
        return make_strategy("flexlora", cfg, max_rank=8)

    st = flex(budget)
    agg = st.begin_round(1)
    assert agg.budget_in_aggregator
    for u in ups:
        agg.add(u)
        assert agg.held_bytes() <= budget
    assert set(agg._agg.routes_planned().values()) == {"sketch"}
    ks = sorted(agg._agg._modules[m].sketch.k for m in big)
    assert ks[0] > 2 * 8 + 1  # sized by the budget, above the default k = 2 rank + 1
    assert agg.held_bytes() > 0.9 * budget
    assert agg.finalize().num_clients == 4
    ref = reference_aggregate(ups, 8)  # R = 16 <= k: the sketch spans dW, the result is exact
    for m, (U, S, Vt) in ref.items():
        np.testing.assert_allclose(st.adapter.modules[m][1], S, rtol=1e-3, atol=1e-4 * S[0])
    smallest = sum(linalg.sketch_state_bytes(m, n, 8, 17) for m, n in big.values())
    agg = flex(smallest - 1).begin_round(1)
    with pytest.raises(ValueError, match=rf"'c0': round 1: max_round_bytes={smallest - 1} is the aggregator's budget"):
        agg.add(ups[0])
    assert agg.client_ids == [] and agg.held_bytes() == 0
    agg = flex(smallest).begin_round(1)
    agg.add(ups[0])
    assert sorted(agg._agg._modules[m].sketch.k for m in big) == [8, 8]


def test_flexlora_budget_counts_the_aggregator_state_bytes():
    agg = _strategy("flexlora").begin_round(1)
    assert agg.held_bytes() == 0
    agg.add(honest("c0", 0))
    assert agg.held_bytes() == agg._agg.state_bytes() > 0


def _patch_reply(monkeypatch, cid: str, change):
    from server.runtimes.clients import InProcessClients

    real = InProcessClients._train

    def train(self, order, cancel):
        reply = real(self, order, cancel)
        return change(reply) if order.client_id == cid else reply

    monkeypatch.setattr(InProcessClients, "_train", train)


def test_runtime_rejects_a_reply_that_claims_another_client(monkeypatch, caplog):
    from edge_client.wire import decode_update

    def impersonate(reply: bytes) -> bytes:
        u = decode_update(reply)
        u.client_id = "client-000"
        return encode_update(u)

    _patch_reply(monkeypatch, "client-002", impersonate)
    with caplog.at_level(logging.WARNING, logger="flexlora.simulate"):
        doc = run_simulation(RunConfig(**SMALL))
    r = doc["rounds"][0]
    assert list(r["rejected"]) == ["client-002"]
    assert "says client 'client-000'" in r["rejected"]["client-002"]
    assert r["clients"] == 2 and sorted(r["ranks"]) == ["client-000", "client-001"]
    assert "client-002" in caplog.text


def test_runtime_rejects_a_reply_from_another_round(monkeypatch):
    from edge_client.wire import decode_update

    def stale(reply: bytes) -> bytes:
        u = decode_update(reply)
        u.round = 7
        return encode_update(u)

    _patch_reply(monkeypatch, "client-001", stale)
    doc = run_simulation(RunConfig(**SMALL))
    assert "is for round 7, expected 1" in doc["rounds"][0]["rejected"]["client-001"]


def test_an_unexpected_error_in_one_reply_rejects_that_reply_not_the_run(monkeypatch, caplog):
    from server.federation.strategies.base import Strategy

    real = Strategy.decode_reply

    def decode(self, data, *, spec):
        update = real(self, data, spec=spec)
        if update.client_id == "client-001":
            raise KeyError("simulated decoder bug")
        return update

    monkeypatch.setattr(Strategy, "decode_reply", decode)
    with caplog.at_level(logging.WARNING, logger="flexlora.simulate"):
        doc = run_simulation(RunConfig(**{**SMALL, "rounds": 2}))
    assert doc["rounds_completed"] == 2
    for r in doc["rounds"]:
        assert list(r["rejected"]) == ["client-001"]
        assert r["rejected"]["client-001"].startswith("KeyError while handling the reply")
        assert r["clients"] == 2
    assert "simulated decoder bug" in caplog.text


def test_runtime_plumbs_limits_and_round_budget():
    # every reply is bigger than 64 bytes / 1 byte: all rejected for that reason, the round fails
    # (issue 21: a round with no valid replies is recorded as failed and the run goes on)
    entry = run_simulation(RunConfig(**SMALL, max_reply_bytes=64))["rounds"][-1]
    assert "0 valid replies" in entry["failed"]
    assert all("exceeds the limit of 64" in why for why in entry["rejected"].values())
    entry = run_simulation(RunConfig(**SMALL, max_round_bytes=1))["rounds"][-1]
    assert "0 valid replies" in entry["failed"]
    assert all("max_round_bytes=1" in why for why in entry["rejected"].values())
    with pytest.raises(ValueError, match="max_round_bytes"):
        RunConfig(**SMALL, max_round_bytes=0)
