"""Issue 21, class 3: a poisoned round is not committed by default (the sanity guard's reference
is the round's accepted replies, not the state it guards), a round with no valid replies is
recorded and rolls back to the last good state, the run goes on, and resume can start from a
kept known-good round."""
from __future__ import annotations

import numpy as np
import pytest
from redteam_hooks import poison_examples  # noqa: E402  (tests/hardening on sys.path)
from test_reply_handling import BASE, SHAPES, honest  # noqa: E402

from edge_client.wire import encode_update
from server.core.oracles import flexlora_delta
from server.federation import Reply, RoundEngine
from server.federation.strategies import RankSpec, RoundFailed, StrategyConfig, make_strategy

IDS = [f"c{i}" for i in range(4)]


class _Transport:
    """Honest replies; ``poison`` clients send the issue's attack, ``garbage`` clients bytes that
    every decoder rejects, ``silent`` clients nothing."""

    def __init__(self, poison=(), garbage=(), silent=()) -> None:
        self.poison, self.garbage, self.silent = set(poison), set(garbage), set(silent)

    def exchange(self, plan):
        out = []
        for o in plan.orders:
            if o.client_id in self.silent:
                continue
            u = honest(o.client_id, 10 * plan.round + int(o.client_id[1:]))
            u.round = plan.round
            data = encode_update(u)
            if o.client_id in self.poison:
                data = poison_examples(data)
            elif o.client_id in self.garbage:
                data = b"\0" * 64
            out.append(Reply(client_id=o.client_id, data=data))
        return out


def _engine(**kw):
    strat = make_strategy("flexlora", StrategyConfig(base_model=BASE, module_shapes=SHAPES))
    eng = RoundEngine(strat, {cid: RankSpec(rank=4) for cid in IDS}, **kw)
    eng.start()
    return eng, strat


def _state(strat):
    return {k: v.copy() for k, v in strat.state_tensors().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _oracle_check(strat, ups):
    for module, got in strat.global_delta().items():
        want = flexlora_delta([(*u.pair(module), u.module_scaling(module), u.num_examples) for u in ups])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_a_poisoning_reply_is_refused_by_the_default_guard_and_round_1_is_the_honest_one():
    eng, strat = _engine()
    entry = eng.run_round(1, _Transport(poison={"c3"}))
    assert "failed" not in entry and entry["clients"] == 3
    assert list(entry["rejected"]) == ["c3"] and "sanity guard" in entry["rejected"]["c3"]
    _oracle_check(strat, [honest(cid, 10 + i) for i, cid in enumerate(IDS[:3])])
    entry = eng.run_round(2, _Transport(poison={"c3"}))      # every round, not only the first
    assert "failed" not in entry and list(entry["rejected"]) == ["c3"]


def test_a_round_the_guard_refuses_without_a_single_culprit_is_not_committed_and_the_run_goes_on(monkeypatch):
    from server.federation import rounds
    eng, strat = _engine()
    real = rounds.global_norm
    monkeypatch.setattr(rounds, "global_norm", lambda s: 1e30 * (s.rounds_completed == 1) + real(s))
    entry = eng.run_round(1, _Transport())      # no reply stands out: the round itself is refused
    assert "sanity guard" in entry["failed"] and entry["clients"] == 0 and entry["rejected"] == {}
    assert strat.global_delta() == {} and strat.rounds_completed == 0
    monkeypatch.setattr(rounds, "global_norm", real)
    entry = eng.run_round(2, _Transport())
    assert "failed" not in entry and entry["clients"] == 4
    _oracle_check(strat, [honest(cid, 20 + i) for i, cid in enumerate(IDS)])


def test_the_guard_is_off_on_request_and_then_commits_the_poison():
    eng, strat = _engine(sanity_ratio=None)
    assert "failed" not in eng.run_round(1, _Transport(poison={"c3"}))
    assert strat.rounds_completed == 1


@pytest.mark.parametrize("how", ["garbage", "silent"])
def test_a_round_without_a_valid_reply_rolls_back_to_the_last_good_state(how):
    # garbage: every reply rejected; silent: clients whose training diverged on the state they
    # were sent (NaN loss) report an error instead of a reply
    eng, strat = _engine()
    eng.run_round(1, _Transport())
    after_1 = _state(strat)
    eng.run_round(2, _Transport())
    entry = eng.run_round(3, _Transport(**{how: IDS}))
    assert "0 valid replies" in entry["failed"] and entry["rolled_back_to"] == 1
    _same(_state(strat), after_1)
    assert strat.rounds_completed == 1
    entry = eng.run_round(4, _Transport())       # the run goes on from the state after round 1
    assert "failed" not in entry and strat.rounds_completed == 4


def test_with_one_valid_reply_below_min_clients_the_state_stays():
    strat = make_strategy("flexlora", StrategyConfig(base_model=BASE, module_shapes=SHAPES, min_clients=2))
    eng = RoundEngine(strat, {cid: RankSpec(rank=4) for cid in IDS})
    eng.start()
    eng.run_round(1, _Transport())
    eng.run_round(2, _Transport())
    after_2 = _state(strat)
    entry = eng.run_round(3, _Transport(garbage=IDS[1:]))
    assert "1 valid replies, min_clients=2" in entry["failed"] and "rolled_back_to" not in entry
    _same(_state(strat), after_2)


def test_too_many_failed_rounds_in_a_row_end_the_run():
    eng, _ = _engine(max_consecutive_failures=2)
    eng.run_round(1, _Transport(silent=IDS))
    with pytest.raises(RoundFailed, match="2 rounds in a row failed"):
        eng.run_round(2, _Transport(silent=IDS))
    with pytest.raises(ValueError, match="sanity_ratio"):
        _engine(sanity_ratio=float("nan"))


def test_resume_can_start_from_a_kept_round(tmp_path):
    eng, strat = _engine(checkpoint_dir=tmp_path, sanity_ratio=None)
    eng.run_round(1, _Transport())
    eng.run_round(2, _Transport())
    after_2 = _state(strat)
    eng.run_round(3, _Transport(poison={"c3"}))   # guard off: the poison is committed
    eng.close()
    eng2 = RoundEngine(make_strategy("flexlora", StrategyConfig(base_model=BASE, module_shapes=SHAPES)),
                       {cid: RankSpec(rank=4) for cid in IDS}, checkpoint_dir=tmp_path)
    assert eng2.restore(round=2) and eng2.round == 2
    _same(_state(eng2.strategy), after_2)
    assert [h["round"] for h in eng2.history] == [1, 2]
    with pytest.raises(ValueError, match="keeps no checkpoint of round 9"):
        eng2.restore(round=9)
    eng2.close()


def test_run_config_checks_resume_round():
    from server.runtimes.config import RunConfig
    with pytest.raises(ValueError, match="resume_round"):
        RunConfig(resume_round=2)
    RunConfig(resume_round=2, resume=True, checkpoint_dir="x")
