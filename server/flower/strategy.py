"""A Flower ``Strategy`` (Message API) that drives one of our strategies (``server.strategies``).

Each node first answers a ``query`` with who it is and the rank its device affords
(:func:`probe_nodes`). Each round ``configure_train`` samples the round's clients with the
embedded runtime's rule (``clients_per_round`` drawn by ``rng`` from the sorted client ids; all
when None) and sends each its own rank-specific factors (``strategy.configure`` ->
``encode_global`` bytes in a ConfigRecord), in sorted client-id order and with the embedded
runtime's per-client seed (index within the round's sorted sample); ``aggregate_train`` takes
the replies in the same client order, decodes and validates each with
``strategy.decode_reply`` (the edge client's decoder: shapes, NaN/Inf, base-model
fingerprint, rank above the assignment, truncated bytes) plus the node's identity and round,
streams the valid ones into the round's aggregator one at a time, and logs every rejection
with its reason (any error while handling one reply rejects that reply, not the run). Fewer than ``min_clients`` valid replies raise ``RoundFailed`` and leave the
global state untouched.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy import Strategy as FlowerStrategyBase

from edge_client.flower_app import PROBE_KEY, QUERY_KEY, TRAIN_KEY, UPDATE_KEY, NodeProbe, TrainOrder
from edge_client.update import encode_global

from ..simulation.runtime import _client_seed, check_reply_identity, reject_reason, sample_clients
from ..strategies.base import RankSpec, Strategy

__all__ = ["NodeInfo", "probe_nodes", "FlexLoRAFlowerStrategy"]

log = logging.getLogger("flexlora.flower")


@dataclass(kw_only=True)
class NodeInfo:
    node_id: int
    probe: NodeProbe

    @property
    def client_id(self) -> str:
        return self.probe.client_id

    @property
    def spec(self) -> RankSpec:
        return RankSpec(rank=self.probe.rank, rank_pattern=self.probe.rank_pattern)


def probe_nodes(grid: Grid, *, min_nodes: int, wait_s: float, timeout_s: float) -> list[NodeInfo]:
    """Wait for ``min_nodes`` nodes, ask each who it is; returns them in sorted client-id order."""
    deadline = time.monotonic() + wait_s
    while len(node_ids := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of min-nodes={min_nodes} SuperNodes connected "
                               f"within {wait_s:g} s")
        time.sleep(0.5)
    messages = [Message(RecordDict({QUERY_KEY: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids]
    nodes: dict[str, NodeInfo] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        src = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d left out: its probe failed: %s", src, reply.error.reason)
            continue
        try:
            if PROBE_KEY not in reply.content.config_records:
                raise ValueError(f"probe reply has no {PROBE_KEY!r} ConfigRecord")
            probe = NodeProbe.from_record(reply.content.config_records[PROBE_KEY])
            if probe.client_id in nodes:
                raise ValueError(f"client id {probe.client_id!r} already taken by node "
                                 f"{nodes[probe.client_id].node_id}")
        except ValueError as exc:
            log.warning("node %d left out: %s", src, exc)
            continue
        nodes[probe.client_id] = NodeInfo(node_id=src, probe=probe)
        log.info("node %d is %s: rank %s, %d examples (%s)", src, probe.client_id,
                 RankSpec(rank=probe.rank, rank_pattern=probe.rank_pattern).label(), probe.num_examples,
                 probe.device)
    if len(nodes) < min_nodes:
        raise RuntimeError(f"{len(nodes)} of {len(node_ids)} nodes answered the probe; min-nodes={min_nodes}")
    return [nodes[cid] for cid in sorted(nodes)]


@dataclass(kw_only=True)
class _Round:
    assigned: dict[int, RankSpec] = field(default_factory=dict)     # node id -> spec sent
    rejected: dict[str, str] = field(default_factory=dict)           # client id -> reason
    started: float = field(default_factory=time.perf_counter)


class FlexLoRAFlowerStrategy(FlowerStrategyBase):
    """Flower strategy wrapping ``strategy`` for the ``nodes`` found by :func:`probe_nodes`.

    ``on_round(round, entry)`` is called after each round (evaluation, checkpoint, results);
    ``first_round`` > 1 resumes a run whose earlier rounds are already in ``strategy``.
    ``clients_per_round`` samples that many nodes each round with ``rng`` (default
    ``random.Random(f"runtime-{seed}")``, the embedded runtime's; a resume passes the
    checkpointed one); None trains every node every round.
    """

    def __init__(self, strategy: Strategy, nodes: list[NodeInfo], *, seed: int, round_timeout_s: float,
                 on_round: Callable[[int, dict], None] | None = None, first_round: int = 1,
                 clients_per_round: int | None = None, rng: random.Random | None = None) -> None:
        if not nodes:
            raise ValueError("nodes must be non-empty")
        if clients_per_round is not None and not 1 <= clients_per_round <= len(nodes):
            raise ValueError(f"clients_per_round must be in [1, {len(nodes)}] (the nodes), got {clients_per_round}")
        self.clients_per_round = clients_per_round
        self.rng = rng if rng is not None else random.Random(f"runtime-{seed}")
        self.strategy = strategy
        self.nodes = sorted(nodes, key=lambda n: n.client_id)
        self.seed = seed
        self.round_timeout_s = round_timeout_s
        self.on_round = on_round
        self.first_round = first_round
        self._round: _Round | None = None
        self.last_entry: dict | None = None

    def summary(self) -> None:
        log.info("FlexLoRA Flower strategy: %s over %d nodes (%s), min_clients=%d", self.strategy.name,
                 len(self.nodes), ", ".join(f"{n.client_id}@{n.node_id}" for n in self.nodes),
                 self.strategy.config.min_clients)

    # --- training ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = _Round()
        # a list, not a generator: Flower's grid iterates the messages twice
        return list(self._train_messages(server_round, set(grid.get_node_ids()), self._round))

    def _train_messages(self, server_round: int, connected: set[int], rnd: _Round) -> Iterator[Message]:
        by_id = {n.client_id: n for n in self.nodes}
        sampled = sample_clients(self.rng, list(by_id), self.clients_per_round)
        for index, node in enumerate(by_id[cid] for cid in sampled):
            if node.node_id not in connected:
                rnd.rejected[node.client_id] = "node not connected; skipped"
                log.warning("round %d: %s", server_round, rnd.rejected[node.client_id])
                continue
            spec = self.strategy.assign_rank(node.spec)
            rnd.assigned[node.node_id] = spec
            msg = self.strategy.configure(client_id=node.client_id, spec=spec, round=server_round)
            order = TrainOrder(client_id=node.client_id, round=server_round,
                               seed=_client_seed(self.seed, server_round, index), rank=spec.rank,
                               rank_pattern=dict(spec.rank_pattern),
                               global_bytes=encode_global(msg) if msg is not None else None)
            yield Message(RecordDict({TRAIN_KEY: order.to_record()}), dst_node_id=node.node_id,
                          message_type=MessageType.TRAIN)

    def _decode(self, server_round: int, node: NodeInfo, reply: Message, spec: RankSpec):
        if reply.has_error():
            raise ValueError(f"client failed: {reply.error.reason}")
        records = reply.content.config_records
        if UPDATE_KEY not in records or not isinstance(records[UPDATE_KEY].get("update"), bytes):
            raise ValueError(f"reply has no {UPDATE_KEY!r} ConfigRecord with bytes 'update'")
        update = self.strategy.decode_reply(records[UPDATE_KEY]["update"], spec=spec)
        check_reply_identity(update, client_id=node.client_id, round=server_round)
        return update

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._round if self._round is not None else _Round()
        self._round = None
        by_node: dict[int, Message] = {}
        known = {n.node_id for n in self.nodes}
        for reply in replies:
            src = reply.metadata.src_node_id
            if src not in rnd.assigned:
                log.warning("round %d: reply from node %d%s ignored", server_round, src,
                            "" if src in known else " (unknown)")
                continue
            by_node[src] = reply
        agg = self.strategy.begin_round(server_round)
        for node in self.nodes:  # the embedded runtime's order: sorted client ids
            if node.node_id not in rnd.assigned:
                continue
            reply = by_node.pop(node.node_id, None)
            if reply is None:
                rnd.rejected[node.client_id] = f"no reply within {self.round_timeout_s:g} s; dropped"
                log.warning("round %d: client %s dropped: %s", server_round, node.client_id,
                            rnd.rejected[node.client_id])
                continue
            try:
                agg.add(self._decode(server_round, node, reply, rnd.assigned[node.node_id]))
            except Exception as exc:  # noqa: BLE001 - one node's reply never ends the run
                rnd.rejected[node.client_id] = reject_reason(exc)
                log.warning("round %d: reply from %s rejected: %s", server_round, node.client_id,
                            rnd.rejected[node.client_id])
        result = agg.finalize()    # RoundFailed below min_clients; strategy state unchanged then
        self.last_entry = {"round": server_round, "clients": result.num_clients, "ranks": result.ranks,
                           "rejected": dict(rnd.rejected), "aggregation_s": result.aggregation_s,
                           "train_s": time.perf_counter() - rnd.started, **result.metrics}
        metrics = {"clients": result.num_clients, "rejected": len(rnd.rejected),
                   "aggregation-s": result.aggregation_s, "total-examples": result.total_examples}
        metrics.update({k: float(v) for k, v in result.metrics.items()})
        return None, MetricRecord(metrics)

    # --- evaluation happens on the server (held-out clients), not on the nodes --------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Rounds ``first_round..num_rounds``; ``on_round`` after each (checkpoint, results)."""
        self.summary()
        timeout = self.round_timeout_s if timeout is None else timeout
        arrays = initial_arrays if initial_arrays is not None else ArrayRecord()
        result = Result()
        for rnd in range(self.first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", rnd, num_rounds)
            started = time.perf_counter()
            replies = grid.send_and_receive(messages=self.configure_train(rnd, arrays, ConfigRecord(), grid),
                                            timeout=timeout)
            _, metrics = self.aggregate_train(rnd, replies)
            result.train_metrics_clientapp[rnd] = metrics
            entry = dict(self.last_entry or {})
            if evaluate_fn is not None:
                scores = evaluate_fn(rnd, arrays)
                if scores is not None:
                    result.evaluate_metrics_serverapp[rnd] = scores
                    entry.update({k: float(v) for k, v in scores.items()})
            entry["round_s"] = time.perf_counter() - started   # send, train, aggregate, evaluate
            log.info("round %d: %s", rnd, {k: v for k, v in entry.items() if k not in ("ranks",)})
            if self.on_round is not None:
                self.on_round(rnd, entry)
        return result
