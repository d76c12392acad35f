"""The Flower strategy wrapper and the ClientApp protocol, in-process with a fake Grid: what each
node is sent, client order and seeds, and replies that fail validation (rejected with their
reason, the round goes on; below min_clients the state is untouched)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edge_client.wire import (
    PROBE_KEY,
    TRAIN_KEY,
    UPDATE_KEY,
    ClientUpdate,
    NodeProbe,
    TrainOrder,
    encode_update,
    parse_rank_pattern,
)
from server.federation import client_seed
from server.federation.strategies import RoundFailed, StrategyConfig, make_strategy
from server.runtimes.flower.strategy import FlexLoRAFlowerStrategy, probe_nodes

FP = "ab" * 16
MODULES = [f"base_model.model.model.layers.0.self_attn.{m}" for m in ("q_proj", "v_proj")]
D = 12


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Flower stamps messages with the running task's identity; give this process one
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def make_update(cid: str, order: TrainOrder, *, seed: int, rank: int | None = None, **changes) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    r = rank or order.rank
    factors = {}
    for m in MODULES:
        factors[m + ".lora_A.weight"] = rng.standard_normal((r, D)).astype(np.float32)
        factors[m + ".lora_B.weight"] = rng.standard_normal((D, r)).astype(np.float32)
    fields = dict(client_id=cid, factors=factors, num_examples=10 + seed, rank=r, rank_pattern={}, alpha=16.0,
                  base_model=FP, target_modules=["q_proj", "v_proj"], round=order.round)
    fields.update(changes)
    return ClientUpdate(**fields)


class FakeNode:
    def __init__(self, cid: str, rank: int, fault: str | None = None, seed: int = 0) -> None:
        self.cid, self.rank, self.fault, self.seed = cid, rank, fault, seed
        self.orders: list[TrainOrder] = []

    def handle(self, msg: Message) -> Message | None:
        if msg.metadata.message_type == "query":
            probe = NodeProbe(client_id=self.cid, rank=self.rank, num_examples=10 + self.seed, device="fake")
            return Message(RecordDict({PROBE_KEY: probe.to_record()}), reply_to=msg)
        order = TrainOrder.from_record(msg.content.config_records[TRAIN_KEY])
        self.orders.append(order)
        f = self.fault
        if f == "silent":
            return None
        if f == "error":
            return Message(Error(code=1, reason="out of memory"), reply_to=msg)
        update = make_update(self.cid, order, seed=self.seed,
                             **({"rank": order.rank * 2} if f == "rank-too-high" else {}),
                             **({"client_id": "someone-else"} if f == "wrong-id" else {}),
                             **({"base_model": "cd" * 16} if f == "wrong-base" else {}),
                             **({"round": order.round + 1} if f == "wrong-round" else {}))
        data = encode_update(update)
        if f == "truncated":
            data = data[: len(data) // 2]
        if f == "nan":  # the encoder refuses NaN, so put one into the bytes on the wire
            update.factors[MODULES[0] + ".lora_A.weight"][0, 0] = 1234.5
            marker = np.float32(1234.5).tobytes()
            data = encode_update(update)
            assert data.count(marker) == 1
            data = data.replace(marker, np.float32(np.nan).tobytes())
        return Message(RecordDict({UPDATE_KEY: ConfigRecord({"update": data})}), reply_to=msg)


class FakeGrid:
    def __init__(self, nodes: dict[int, FakeNode]) -> None:
        self.nodes = nodes
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in list(messages):
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            reply = self.nodes[msg.metadata.dst_node_id].handle(msg)
            if reply is not None:
                replies.append(reply)
        return replies[::-1]   # any order; the wrapper restores the client order


def _setup(faults: dict[str, str] | None = None, min_clients: int = 1):
    faults = faults or {}
    names = ["client-002", "client-000", "client-001"]
    grid = FakeGrid({100 + i: FakeNode(cid, rank=2 + 2 * i, fault=faults.get(cid), seed=i)
                     for i, cid in enumerate(names)})
    nodes = probe_nodes(grid, min_nodes=3, wait_s=1.0, timeout_s=1.0)
    strategy = make_strategy("flexlora", StrategyConfig(base_model=FP, min_clients=min_clients, seed=5))
    return grid, nodes, strategy


def test_probe_orders_nodes_by_client_id_and_keeps_their_ranks():
    _, nodes, _ = _setup()
    assert [n.client_id for n in nodes] == ["client-000", "client-001", "client-002"]
    assert [n.spec.rank for n in nodes] == [4, 6, 2]


def test_each_node_gets_its_own_rank_client_order_and_seed():
    grid, nodes, strategy = _setup()
    entries = []
    wrapper = FlexLoRAFlowerStrategy(strategy, nodes, seed=7, round_timeout_s=5.0,
                                     on_round=lambda r, e: entries.append(e))
    wrapper.start(grid, num_rounds=2)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    orders = [TrainOrder.from_record(m.content.config_records[TRAIN_KEY]) for m in train]
    assert [o.client_id for o in orders] == ["client-000", "client-001", "client-002"] * 2
    assert [o.seed for o in orders[:3]] == [client_seed(7, 1, i) for i in range(3)]
    assert all(o.global_bytes is None for o in orders[:3])      # round 1: fresh adapters
    from edge_client.wire import decode_global

    for order, node in zip(orders[3:], nodes):
        g = decode_global(order.global_bytes)
        assert g.rank == node.spec.rank and order.rank == node.spec.rank
        assert g.factors[MODULES[0] + ".lora_A.weight"].shape == (node.spec.rank, D)
    assert [e["round"] for e in entries] == [1, 2] and all(e["clients"] == 3 for e in entries)


@pytest.mark.parametrize("fault, reason", [
    ("truncated", "payload"), ("nan", "nan"), ("rank-too-high", "above the assigned"), ("wrong-id", "someone-else"),
    ("wrong-base", "base"), ("wrong-round", "round"), ("error", "out of memory"), ("silent", "no reply")])
def test_invalid_reply_is_rejected_with_its_reason_and_the_round_goes_on(fault, reason, caplog):
    grid, nodes, strategy = _setup({"client-001": fault})
    wrapper = FlexLoRAFlowerStrategy(strategy, nodes, seed=0, round_timeout_s=5.0)
    wrapper.start(grid, num_rounds=1)
    entry = wrapper.last_entry
    assert entry["clients"] == 2 and list(entry["rejected"]) == ["client-001"]
    assert reason in entry["rejected"]["client-001"].lower()
    assert "client-001" in caplog.text
    assert strategy.rounds_completed == 1 and strategy.global_delta()


def test_below_min_clients_the_round_fails_and_state_is_untouched():
    grid, nodes, strategy = _setup({"client-000": "nan", "client-001": "truncated"}, min_clients=2)
    wrapper = FlexLoRAFlowerStrategy(strategy, nodes, seed=0, round_timeout_s=5.0)
    wrapper.start(grid, num_rounds=1)   # the failed round is recorded; the run goes on (issue 21)
    assert "min_clients=2" in wrapper.last_entry["failed"] and wrapper.last_entry["clients"] == 0
    assert strategy.rounds_completed == 0 and strategy.global_delta() == {}
    with pytest.raises(RoundFailed, match="3 rounds in a row failed"):
        FlexLoRAFlowerStrategy(strategy, nodes, seed=0, round_timeout_s=5.0).start(grid, num_rounds=3)


def test_protocol_records_validate():
    assert parse_rank_pattern("gate_proj=16, up_proj=4") == {"gate_proj": 16, "up_proj": 4}
    assert parse_rank_pattern('{"down_proj": 8}') == {"down_proj": 8}
    with pytest.raises(ValueError, match="gate_proj"):
        parse_rank_pattern("gate_proj=0")
    with pytest.raises(ValueError, match="not 'module=rank'"):
        parse_rank_pattern("gate_proj")
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        NodeProbe(client_id="a", rank=0, num_examples=3)
    with pytest.raises(ValueError, match="no 'seed'"):
        TrainOrder.from_record(ConfigRecord({"client-id": "a", "round": 1, "rank": 2}))
    order = TrainOrder(client_id="a", round=2, seed=9, rank=4, rank_pattern={"v_proj": 8}, global_bytes=b"xy")
    assert TrainOrder.from_record(order.to_record()) == order
