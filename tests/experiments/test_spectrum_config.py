"""Spectrum diagnostic, grid configuration and client-type allotment."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.runtimes.experiments.config import ARMS, ExperimentConfig, experiment_settings, load_config_file
from server.runtimes.experiments.spectrum import collapse_warning, module_spectrum, retained_energy
from server.workloads.devices import DEMO_RANKS, allot_types, type_spec


def _with_singular_values(s, d_out=12, d_in=9, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, len(s))))
    return (u * np.asarray(s)) @ v.T


def test_retained_energy_matches_the_singular_values():
    s = np.array([4.0, 2.0, 1.0, 0.0])
    got = retained_energy(s, [1, 2, 3, 10])
    assert got == pytest.approx({1: 16 / 21, 2: 20 / 21, 3: 1.0, 10: 1.0}, rel=1e-12, abs=0)
    assert retained_energy(np.zeros(3), [1]) == {1: 0.0}
    with pytest.raises(ValueError, match="ranks"):
        retained_energy(s, [0])
    with pytest.raises(ValueError, match="singular_values"):
        retained_energy(np.array([1.0, np.nan]), [1])


def test_module_spectrum_uses_the_svd_of_each_module():
    dw = _with_singular_values([3.0, 2.0, 1.0, 0.5])
    out = module_spectrum({"m.q_proj": dw}, {"m.q_proj": [2, 4, 2]})
    total = 9 + 4 + 1 + 0.25
    assert out["m.q_proj"]["retained"] == pytest.approx({"2": 13 / total, "4": 1.0}, rel=1e-9, abs=1e-12)
    assert out["m.q_proj"]["energy"] == pytest.approx(total, rel=1e-9, abs=0)
    assert 1.0 < out["m.q_proj"]["effective_rank"] < 4.0
    with pytest.raises(ValueError, match="m.q_proj"):
        module_spectrum({"m.q_proj": dw}, {})


def test_collapse_warning_fires_only_when_the_smallest_rank_holds_the_energy():
    spiky = _with_singular_values([10.0, 0.1, 0.1, 0.1])
    flat = _with_singular_values([1.0, 1.0, 1.0, 1.0])
    ranks = {"a": [1, 4], "b": [1, 4]}
    msg = collapse_warning(module_spectrum({"a": spiky, "b": spiky}, ranks), 0.9)
    assert msg is not None and "rank collapse" in msg and "(1)" in msg
    assert collapse_warning(module_spectrum({"a": flat, "b": flat}, ranks), 0.9) is None
    # one rank only (homogeneous federation): nothing to collapse onto
    assert collapse_warning(module_spectrum({"a": spiky}, {"a": [2]}), 0.9) is None


@pytest.mark.parametrize("n", [1, 5, 8, 16, 80])
def test_allot_types_follows_the_shares(n):
    shares = {"r8": 0.8, "r30": 0.0667, "r30_200": 0.0667, "r200": 0.0666}
    types = allot_types(shares, n, seed=3)
    assert len(types) == n
    for t, p in shares.items():
        assert abs(types.count(t) - p * n) < 1.0
    assert types == allot_types(shares, n, seed=3)


def test_type_spec_maps_workload_types_to_ranks():
    assert type_spec("r8", rank_map=DEMO_RANKS).rank == 2
    mixed = type_spec("r30_200")
    assert mixed.module_rank("x.q_proj") == 30 and mixed.module_rank("x.down_proj") == 200
    with pytest.raises(ValueError, match="client_type"):
        type_spec("r7", rank_map=DEMO_RANKS)


@pytest.mark.parametrize("kw,match", [
    ({"arms": ["fedit"]}, r"arms\[0\]"), ({"distributions": ["zipf"]}, r"distributions\[0\]"),
    ({"seeds": [0, 0]}, "duplicates"), ({"seeds": [-1]}, r"seeds\[0\]"), ({"arms": []}, "non-empty"),
])
def test_experiment_config_rejects_bad_grids(kw, match):
    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"rounds": 0}, "rounds"), ({"lr": -1.0}, "lr"), ({"clients_per_round": 20}, "clients_per_round"),
    ({"collapse_threshold": 1.5}, "collapse_threshold"), ({"num_heldout": 0}, "num_heldout"),
])
def test_cell_settings_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        experiment_settings(**kw)


def test_config_file_rejects_unknown_keys(tmp_path):
    p = tmp_path / "grid.json"
    p.write_text(json.dumps({"seeds": [0], "settings": {"rounds": 2, "round": 3}}), encoding="utf-8")
    with pytest.raises(ValueError, match="round"):
        load_config_file(str(p))
    p.write_text(json.dumps({"seeds": [0], "settings": {"rounds": 2}}), encoding="utf-8")
    cfg = ExperimentConfig(**load_config_file(str(p)))
    assert cfg.settings.rounds == 2 and len(cfg.cells()) == len(ARMS) * 4
    assert cfg.identity_hash() != ExperimentConfig().identity_hash()


def test_paired_intervals_are_t_intervals_over_the_shared_seeds():
    from server.runtimes.experiments.report import _paired_intervals, paired_interval

    r = paired_interval([1.0, 2.0, 3.0])          # mean 2, sd 1, t(0.975, 2) = 4.303
    assert r["mean"] == 2.0 and r["n"] == 3
    assert (r["lo"], r["hi"]) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))
    assert "lo" not in paired_interval([0.5])    # one pair: no interval
    table = {"flexlora": {"u": {"seeds": [0, 3, 4], "values": [0.5, 0.7, 0.9]}},
             "hetlora": {"u": {"seeds": [0, 4], "values": [0.4, 0.5]}},
             "raflora": {"u": {"seeds": [3], "values": [0.1]}}}
    rows = _paired_intervals(table, ["u"])
    assert [(x["x"], x["y"]) for x in rows] == [("flexlora", "hetlora"), ("raflora", "flexlora")]
    assert rows[0]["diffs"] == pytest.approx([0.1, 0.4]) and rows[0]["n"] == 2      # seeds 0 and 4 only
    assert rows[1]["diffs"] == pytest.approx([0.1 - 0.7]) and "lo" not in rows[1]
