"""A whole aggregation round (server/bench/rounds.py) through every route, and its report
(server/bench/round_report.py): what benchmarks/bench_aggregation.py is made of."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.bench import flops as F
from server.bench import rounds
from server.bench.round_report import acceptance, markdown

RESULTS = Path(__file__).resolve().parents[2] / "results"

# a round small enough for a unit test: 2 targets of a 48 x 32 model, 5 clients
TINY_WL = {
    "models": {"tiny": {"hidden": 32, "ffn": 48, "kv_dim": 16, "layers": 1}},
    "lora_targets": ["k_proj", "down_proj"],
    "lora_alpha": 16,
    "client_types": {"small": {"attn": 2, "ffn": 3}, "large": {"attn": 6, "ffn": 8}},
    "rank_distributions": {"mix": {"small": 0.6, "large": 0.4}},
    "bench_scales": {"t": {"model": "tiny", "layers": 1, "clients_per_round": 5}},
}


def test_a_tiny_round_through_every_route():
    modules, types = rounds.make_round(TINY_WL, "t", "mix", seed=1)
    assert types == ["small"] * 3 + ["large"] * 2
    assert [m[0] for m in modules] == ["layers.0.k_proj", "layers.0.down_proj"]
    assert [rounds.dims(m) for m in modules] == [(16, 32, 18), (32, 48, 25)]
    rank = 4
    ref, spectra = rounds.run_reference(modules, rank)
    tails = rounds.optimum_tails(modules, rank, spectra)
    assert rounds.error_ratio(tails, ref) == pytest.approx(1.0, rel=1e-4)
    # the optimum from the reference's spectrum is the one from svdvals
    for (_, a), (_, b) in zip(tails, rounds.optimum_tails(modules, rank)):
        assert a == pytest.approx(b, rel=1e-4)
    for method in ("exact", "auto"):
        assert rounds.error_ratio(tails, rounds.run_ours(modules, rank, method, 1)) == pytest.approx(1.0, rel=1e-3)
    assert rounds.error_ratio(tails, rounds.run_torch(modules, rank)) >= 1 - 1e-4
    fl, fl64 = rounds.route_flops(modules, rank, "reference")
    assert fl == sum(F.form_factored(*rounds.dims(m)) + F.svd_sigma_v(*rounds.dims(m)[:2]) for m in modules)
    assert fl64 == 0.0
    for route in ("auto", "exact", "randomized", "dense", "sketch", "torch"):
        assert rounds.route_flops(modules, rank, route)[0] > 0
    assert set(rounds.auto_routes(modules, rank)) <= {"exact", "randomized", "dense", "sketch"}
    assert [s[2:] for s in rounds.first_of_each_shape(modules, tails)] == [(16, 32), (32, 48)]


def test_report_reproduces_a_stored_run():
    stem = RESULTS / "bench_aggregation.strong_quiet"
    res = json.loads(Path(f"{stem}.json").read_text())
    assert markdown(res) + "\n" + acceptance(res) + "\n" == Path(f"{stem}.md").read_text()
