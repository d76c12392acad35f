"""Per-round client sampling in the Flower ServerApp's strategy (the embedded runtime's rule,
seeded), its run-config keys, and the test-only ``fault=garbage`` node setting of the ClientApp."""

from __future__ import annotations

import random

import pytest
from test_flower_strategy import FP, FakeGrid, FakeNode, make_update, task_identity  # noqa: F401

from edge_client.flower_app import FAULT_ENV, _faulty, garbage_bytes
from edge_client.wire import TRAIN_KEY, TrainOrder, encode_update
from server.federation import client_seed, sample_clients
from server.federation.strategies import StrategyConfig, make_strategy
from server.runtimes.config import RunConfig
from server.runtimes.flower.config import clients_per_round, to_run_config
from server.runtimes.flower.strategy import FlexLoRAFlowerStrategy, probe_nodes
from server.runtimes.simulate import run_simulation

NAMES = [f"client-{i:03d}" for i in range(10)]


def _run(k, *, seed=7, rounds=3):
    grid = FakeGrid({200 + i: FakeNode(cid, rank=2 + i % 3, seed=i) for i, cid in enumerate(NAMES[::-1])})
    nodes = probe_nodes(grid, min_nodes=10, wait_s=1.0, timeout_s=1.0)
    strategy = make_strategy("flexlora", StrategyConfig(base_model=FP, seed=seed))
    entries = []
    wrapper = FlexLoRAFlowerStrategy(strategy, nodes, seed=seed, round_timeout_s=5.0, clients_per_round=k,
                                     on_round=lambda r, e: entries.append(e))
    wrapper.start(grid, num_rounds=rounds)
    orders = [TrainOrder.from_record(m.content.config_records[TRAIN_KEY])
              for m in grid.sent if m.metadata.message_type == "train"]
    return orders, entries, strategy


def test_each_round_trains_only_the_seeded_sample():
    orders, entries, _ = _run(3)
    rng = random.Random("runtime-7")
    expected = [sample_clients(rng, NAMES, 3) for _ in range(3)]
    assert [[o.client_id for o in orders if o.round == r] for r in (1, 2, 3)] == expected
    assert len({tuple(e) for e in expected}) > 1          # the sample changes between rounds
    for r, ids in enumerate(expected, start=1):
        assert [o.seed for o in orders if o.round == r] == [client_seed(7, r, i) for i in range(3)]
    assert [sorted(e["ranks"]) for e in entries] == expected
    assert all(e["clients"] == 3 and e["rejected"] == {} for e in entries)


def test_sampling_is_reproducible_and_seed_dependent():
    a, _, sa = _run(4)
    b, _, sb = _run(4)
    c, _, _ = _run(4, seed=8)
    ids = lambda orders: [(o.round, o.client_id) for o in orders]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    da, db = sa.global_delta(), sb.global_delta()
    assert sorted(da) == sorted(db) and all((da[m] == db[m]).all() for m in da)


def test_same_sample_as_the_embedded_runtime():
    orders, _, _ = _run(3, seed=4, rounds=2)
    doc = run_simulation(RunConfig(rounds=2, num_clients=10, clients_per_round=3, seed=4, num_heldout=1,
                                          local_steps=1, batch_size=2, threads=1, progress=False,
                                          eval_max_new_tokens=2))
    embedded = [sorted(r["ranks"]) for r in doc["rounds"]]
    assert [[o.client_id for o in orders if o.round == r] for r in (1, 2)] == embedded


def test_run_config_keys():
    assert clients_per_round({}, num_clients=1613) is None
    assert clients_per_round({"clients-per-round": 80}, num_clients=1613) == 80
    assert clients_per_round({"fraction-train": 0.05}, num_clients=1613) == 80
    assert clients_per_round({"fraction-train": 0.001}, num_clients=10) == 1
    assert to_run_config({"clients-per-round": 5}, num_clients=9).clients_per_round == 5
    with pytest.raises(ValueError, match="not both"):
        clients_per_round({"clients-per-round": 2, "fraction-train": 0.5}, num_clients=10)
    with pytest.raises(ValueError, match="above the 10 clients"):
        clients_per_round({"clients-per-round": 11}, num_clients=10)
    with pytest.raises(ValueError, match="fraction-train"):
        clients_per_round({"fraction-train": 1.5}, num_clients=10)
    with pytest.raises(ValueError, match="clients_per_round must be in"):
        FlexLoRAFlowerStrategy(make_strategy("flexlora"), _nodes(2), seed=0, round_timeout_s=1.0, clients_per_round=3)
    lim = to_run_config({"max-update-bytes": 1000, "max-delta-norm": 5.0}, num_clients=2).decode_limits()
    assert lim.max_bytes == 1000 and lim.max_delta_norm == 5.0 and to_run_config({}, num_clients=2).decode_limits() is None
    cfg = to_run_config({"max-round-bytes": 4096, "max-header-bytes": 2048}, num_clients=2)
    assert cfg.max_round_bytes == 4096 and cfg.decode_limits().max_header_bytes == 2048
    with pytest.raises(ValueError, match="max-round-bytes"):
        to_run_config({"max-round-bytes": -1}, num_clients=2)


def _nodes(n):
    grid = FakeGrid({i: FakeNode(NAMES[i], rank=2) for i in range(n)})
    return probe_nodes(grid, min_nodes=n, wait_s=1.0, timeout_s=1.0)


def test_garbage_fault_is_test_only_and_rejected_by_the_server(monkeypatch):
    order = TrainOrder(client_id="client-000", round=1, seed=3, rank=2)
    data = encode_update(make_update("client-000", order, seed=0))
    monkeypatch.delenv(FAULT_ENV, raising=False)
    with pytest.raises(ValueError, match=FAULT_ENV):
        _faulty("garbage", data, order)
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(ValueError, match="not one of"):
        _faulty("nonsense", data, order)
    bad = _faulty("garbage", data, order)
    assert bad == garbage_bytes(data, 3) and len(bad) == len(data) and bad != data
    with pytest.raises(ValueError):
        make_strategy("flexlora", StrategyConfig(base_model=FP)).decode_reply(bad, spec=_nodes(1)[0].spec)
