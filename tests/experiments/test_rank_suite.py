"""The rank suite (issue 12): deterministic codes, unseen clients hold trained codes, and the
runtimes' new options (split, carry, raFLoRA, the rank suite) are validated and exposed."""
from __future__ import annotations

import pytest

from server.runtimes.config import RunConfig
from server.runtimes.experiments.config import ARMS, experiment_settings
from server.workloads.rank_suite import build_rank_suite, make_codes, rank_suite_records
from server.workloads.tasks import WORDS


def test_codes_are_derangements_and_deterministic():
    codes = make_codes(4, seed=3)
    assert codes == make_codes(4, seed=3) and codes != make_codes(4, seed=4)
    for code in codes:
        assert sorted(code.values()) == sorted(WORDS) and all(k != v for k, v in code.items())
    recs = rank_suite_records()
    assert recs == rank_suite_records()
    for r in recs[:50]:
        k = int(r["category"][4])
        assert r["output"].split() == [codes_for_seed0()[k][w] for w in r["input"].split()]


def codes_for_seed0():
    return make_codes(4, seed=0)


def test_heldout_clients_hold_codes_that_are_trained():
    s = build_rank_suite(num_clients=16, num_heldout=4, heldout_examples=5, seed=1)
    assert len(s.train) == 16 and len(s.heldout) == 4
    trained = {c.families[0].split("-")[0] for c in s.train}
    held = [c.families[0] for c in s.heldout]
    assert {h.split("-")[0] for h in held} <= trained and len(set(held)) == 4
    assert not set(held) & {c.families[0] for c in s.train}
    assert all(len(c.examples) == 5 for c in s.heldout)


def test_new_options_are_validated():
    assert RunConfig().split == "reference" and not RunConfig().carry
    with pytest.raises(ValueError, match="split"):
        RunConfig(split="sqrt")
    with pytest.raises(ValueError, match="carry"):
        RunConfig(strategy="hetlora", carry=True)
    assert RunConfig(strategy="raflora").strategy == "raflora"
    assert experiment_settings().split == "reference"
    with pytest.raises(ValueError, match="suite"):
        experiment_settings(suite="other")
    assert ARMS["flexlora_carry"].carry and ARMS["raflora"].strategy == "raflora"


def test_flower_run_config_carries_split_and_carry():
    from server.runtimes.flower.config import to_run_config
    cfg = to_run_config({"split": "balanced", "carry": True}, num_clients=3)
    assert cfg.split == "balanced" and cfg.carry
    assert to_run_config({}, num_clients=3).split == "reference"
    with pytest.raises(ValueError, match="carry"):
        to_run_config({"carry": "yes"}, num_clients=3)
