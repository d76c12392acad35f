"""Aggregation sharded over Ray actors (a local Ray cluster of worker processes): the same
result as one process, bit for bit; a killed worker loses no accepted update; a client refused
by one shard reaches none."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from server.core.aggregation import Aggregator

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

SHAPES = {"l0.q_proj": (24, 16), "l0.down_proj": (16, 40), "l1.q_proj": (24, 16), "l1.up_proj": (40, 16),
          "l2.v_proj": (8, 16)}


def _client(rng, rank: int, modules=SHAPES) -> dict[str, np.ndarray]:
    out = {}
    for m, (d_out, d_in) in modules.items():
        out[f"{m}.lora_B.weight"] = rng.normal(size=(d_out, rank)).astype(np.float32)
        out[f"{m}.lora_A.weight"] = rng.normal(size=(rank, d_in)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def _clients(n=6, seed=0):
    rng = np.random.default_rng(seed)
    ranks = [2, 4, 8, 3, 16, 5, 2, 6][:n]
    return [(_client(rng, r), 10 + 7 * k, r, f"c{k}") for k, r in enumerate(ranks)]


def _single(clients, **kw):
    agg = Aggregator(8, threads=1, seed=3, **kw)
    for f, n, r, cid in clients:
        agg.add(f, num_examples=n, alpha=16.0, rank=r, client_id=cid)
    return agg.finalize()


def _same(a, b):
    assert sorted(a.modules) == sorted(b.modules) and a.routes == b.routes
    for m in a.modules:
        for x, y in zip(a.modules[m], b.modules[m]):
            assert np.array_equal(x, y), m


@pytest.mark.parametrize("method", ["auto", "exact", "dense", "randomized"])
def test_sharded_equals_one_process_bit_for_bit(cluster, method):
    from server.core.sharded import ShardedAggregator

    clients = _clients()
    with ShardedAggregator(8, shards=3, threads=1, seed=3, method=method) as sharded:
        for f, n, r, cid in clients:
            sharded.add(f, num_examples=n, alpha=16.0, rank=r, client_id=cid)
        assert len(set(sharded.owners().values())) == 3      # the modules are spread over every shard
        got = sharded.finalize()
        infos = sharded.shard_info()
    _same(got, _single(clients, method=method))
    assert {i["pid"] for i in infos} and os.getpid() not in {i["pid"] for i in infos}   # other processes


def test_a_killed_worker_loses_no_accepted_update(cluster):
    from server.core.sharded import ShardedAggregator

    clients = _clients()
    with ShardedAggregator(8, shards=2, threads=1, seed=3) as sharded:
        for f, n, r, cid in clients[:3]:
            sharded.add(f, num_examples=n, alpha=16.0, rank=r, client_id=cid)
        victim = sharded.shard_info()[0]
        os.kill(victim["pid"], signal.SIGKILL)             # mid-round, between two clients
        for f, n, r, cid in clients[3:5]:
            sharded.add(f, num_examples=n, alpha=16.0, rank=r, client_id=cid)
        os.kill(sharded.shard_info()[1]["pid"], signal.SIGKILL)   # and just before finalize
        sharded.add(*clients[5][:1], num_examples=clients[5][1], alpha=16.0, rank=clients[5][2],
                    client_id=clients[5][3])
        got = sharded.finalize()
        assert sharded.rebuilds >= 2
    _same(got, _single(clients))


def test_a_refused_client_reaches_no_shard(cluster):
    from server.core.sharded import ShardedAggregator

    clients = _clients(4)
    rng = np.random.default_rng(9)
    bad = _client(rng, 2)
    bad["l1.up_proj.lora_B.weight"] = np.full((40, 2), np.nan, np.float32)
    wrong_shape = _client(rng, 2, {**SHAPES, "l0.q_proj": (24, 17)})
    with ShardedAggregator(8, shards=2, threads=1, seed=3) as sharded:
        for f, n, r, cid in clients[:2]:
            sharded.add(f, num_examples=n, alpha=16.0, rank=r, client_id=cid)
        for f, match in ((bad, "NaN or Inf"), (wrong_shape, "other clients sent")):
            with pytest.raises(ValueError, match=match):
                sharded.add(f, num_examples=5, alpha=16.0, rank=2, client_id="bad")
        for f, n, r, cid in clients[2:]:
            sharded.add(f, num_examples=n, alpha=16.0, rank=r, client_id=cid)
        got = sharded.finalize()
        assert sharded.num_clients == 4 and "bad" not in sharded.client_ids
    _same(got, _single(clients))


@pytest.mark.parametrize("name", ["flexlora", "raflora"])
def test_a_sharded_strategy_round_equals_the_in_process_one(cluster, name):
    """`--shards N` reaches the strategy: the same global adapter as the in-process aggregator."""
    from edge_client.wire import ClientUpdate
    from server.federation.strategies import StrategyConfig, build_strategy

    rng = np.random.default_rng(4)
    updates = [ClientUpdate(client_id=f"c{k}", factors=_client(rng, r), num_examples=5 + k, rank=r, alpha=16.0,
                            base_model="b", target_modules=["q_proj", "down_proj", "up_proj", "v_proj"])
               for k, r in enumerate((2, 4, 8))]
    deltas = []
    for shards in (0, 2):
        st = build_strategy(name, StrategyConfig(seed=1), specs=[], shards=shards)
        st.aggregate(updates, round=1)
        deltas.append(st.global_delta())
    assert deltas[0].keys() == deltas[1].keys()
    for m in deltas[0]:
        np.testing.assert_allclose(deltas[1][m], deltas[0][m], rtol=1e-5, atol=1e-6)


def test_run_config_shards_checks():
    from server.runtimes.config import RunConfig

    assert RunConfig(shards=2).shards == 2
    with pytest.raises(ValueError, match="only flexlora and raflora shard"):
        RunConfig(shards=2, strategy="hetlora")
    with pytest.raises(ValueError, match="shards must be an int >= 0"):
        RunConfig(shards=-1)
