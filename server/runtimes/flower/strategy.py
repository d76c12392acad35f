"""A Flower ``Strategy`` (Message API) that drives one of our strategies (``server.federation.strategies``).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy import Strategy as FlowerStrategyBase

from edge_client.wire import PROBE_KEY, QUERY_KEY, TRAIN_KEY, UPDATE_KEY, NodeProbe, RankSpec, TrainOrder
from server.federation import Reply, RoundEngine, RoundPlan
from server.federation.rounds import reject_reason
from server.federation.strategies import Strategy

__all__ = ["NodeInfo", "probe_nodes", "FlowerTransport", "FlexLoRAFlowerStrategy"]

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


def probe_nodes(grid: Grid, *, min_nodes: int, wait_s: float, timeout_s: float,
                max_rank: int | None = None) -> list[NodeInfo]:
    """Wait for ``min_nodes`` nodes, ask each who it is; returns them in sorted client-id order.

    One node can neither stop the run nor take another's place: any error while reading its
    probe leaves that node out, a client id already taken keeps its first node, and a rank above
    ``max_rank`` (the run's maximum) is refused."""
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
            if max_rank is not None and probe.spec.max_rank() > max_rank:
                raise ValueError(f"rank {probe.spec.max_rank()} is above the run's maximum {max_rank}")
        except Exception as exc:  # noqa: BLE001 - one node's probe never ends the ServerApp
            log.warning("node %s left out: %s", src, reject_reason(exc)[:300])
            continue
        nodes[probe.client_id] = NodeInfo(node_id=src, probe=probe)
        log.info("node %d is %s: rank %s, %d examples (%s)", src, probe.client_id,
                 RankSpec(rank=probe.rank, rank_pattern=probe.rank_pattern).label(), probe.num_examples,
                 probe.device)
    if len(nodes) < min_nodes:
        raise RuntimeError(f"{len(nodes)} of {len(node_ids)} nodes answered the probe; min-nodes={min_nodes}")
    return [nodes[cid] for cid in sorted(nodes)]


def _train_message(order, node_id: int) -> Message:
    rec = TrainOrder(client_id=order.client_id, round=order.round, seed=order.seed, rank=order.spec.rank,
                     rank_pattern=dict(order.spec.rank_pattern), global_bytes=order.wire).to_record()
    return Message(RecordDict({TRAIN_KEY: rec}), dst_node_id=node_id, message_type=MessageType.TRAIN)


def _reply(node: NodeInfo, message: Message) -> Reply:
    try:
        return _read_reply(node, message)
    except Exception as exc:  # noqa: BLE001 - one node's malformed message drops that client only
        return Reply(client_id=node.client_id, error=f"unreadable reply: {reject_reason(exc)}"[:400])


def _read_reply(node: NodeInfo, message: Message) -> Reply:
    if message.has_error():
        return Reply(client_id=node.client_id, error=f"client failed: {message.error.reason}")
    records = message.content.config_records
    if UPDATE_KEY not in records or not isinstance(records[UPDATE_KEY].get("update"), bytes):
        return Reply(client_id=node.client_id, error=f"reply has no {UPDATE_KEY!r} ConfigRecord with bytes 'update'")
    return Reply(client_id=node.client_id, data=records[UPDATE_KEY]["update"])


class FlowerTransport:
    """The round engine's transport over a Flower ``Grid``: one ``train`` message per order to the
    node of that client, replies mapped back to client ids (unknown senders are ignored)."""

    def __init__(self, grid: Grid, nodes: list[NodeInfo], *, timeout_s: float) -> None:
        self.grid = grid
        self.by_client = {n.client_id: n for n in nodes}
        self.timeout_s = timeout_s

    def messages(self, plan: RoundPlan, connected: set[int]) -> tuple[list[Message], list[Reply]]:
        """The train messages of ``plan`` and the replies of clients whose node is not connected."""
        messages, skipped = [], []
        for order in plan.orders:
            node = self.by_client[order.client_id]
            if node.node_id not in connected:
                skipped.append(Reply(client_id=node.client_id, error="node not connected; skipped"))
            else:
                messages.append(_train_message(order, node.node_id))
        return messages, skipped

    def replies(self, plan: RoundPlan, messages: Iterable[Message]) -> list[Reply]:
        by_node = {n.node_id: n for n in self.by_client.values()}
        asked = {o.client_id for o in plan.orders}
        out = []
        for message in messages:
            node = by_node.get(message.metadata.src_node_id)
            if node is None or node.client_id not in asked:
                log.warning("round %d: reply from node %d ignored%s", plan.round, message.metadata.src_node_id,
                            "" if node is not None else " (unknown)")
                continue
            out.append(_reply(node, message))
        got = {r.client_id for r in out}
        out += [Reply(client_id=cid, error=f"no reply within {self.timeout_s:g} s; dropped")
                for cid in sorted(asked - got)]
        return out

    def exchange(self, plan: RoundPlan) -> list[Reply]:
        messages, skipped = self.messages(plan, set(self.grid.get_node_ids()))
        # a list, not a generator: Flower's grid iterates the messages twice
        received = self.grid.send_and_receive(messages=messages, timeout=self.timeout_s)
        return [*skipped, *[r for r in self.replies(plan, received) if r.client_id not in
                            {s.client_id for s in skipped}]]


class FlexLoRAFlowerStrategy(FlowerStrategyBase):
    """A Flower ``Strategy`` over the federation core: ``configure_train`` is the round engine's
    ``plan`` (as train messages), ``aggregate_train`` its ``complete``.

    ``engine`` carries evaluation and checkpoints (the ServerApp builds one); without it a bare
    engine over ``strategy`` and the probed ``nodes`` is made. ``on_round(round, entry)`` is
    called after each round; ``first_round`` > 1 resumes a run whose earlier rounds are already in
    the engine; ``clients_per_round`` samples that many nodes each round with ``rng`` (default
    ``random.Random(f"runtime-{seed}")``, the embedded runtime's).
    """

    def __init__(self, strategy: Strategy, nodes: list[NodeInfo], *, seed: int, round_timeout_s: float,
                 on_round: Callable[[int, dict], None] | None = None, first_round: int = 1,
                 clients_per_round: int | None = None, rng: random.Random | None = None,
                 engine: RoundEngine | None = None) -> None:
        if not nodes:
            raise ValueError("nodes must be non-empty")
        self.nodes = sorted(nodes, key=lambda n: n.client_id)
        self.engine = engine or RoundEngine(strategy, {n.client_id: n.spec for n in self.nodes}, seed=seed,
                                            clients_per_round=clients_per_round, rng=rng, runtime="flower",
                                            logger=log)
        self.strategy = self.engine.strategy
        self.round_timeout_s = round_timeout_s
        self.on_round = on_round
        self.first_round = first_round
        self._plan: RoundPlan | None = None
        self._skipped: list[Reply] = []
        self.last_entry: dict | None = None

    def summary(self) -> None:
        log.info("FlexLoRA Flower strategy: %s over %d nodes (%s), min_clients=%d", self.strategy.name,
                 len(self.nodes), ", ".join(f"{n.client_id}@{n.node_id}" for n in self.nodes),
                 self.strategy.config.min_clients)

    def _transport(self, grid: Grid | None) -> FlowerTransport:
        return FlowerTransport(grid, self.nodes, timeout_s=self.round_timeout_s)

    # --- training ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._plan = self.engine.plan(server_round)
        messages, self._skipped = self._transport(grid).messages(self._plan, set(grid.get_node_ids()))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan, skipped = self._plan, self._skipped
        self._plan, self._skipped = None, []
        if plan is None or plan.round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        got = self._transport(None).replies(plan, replies)
        skipped_ids = {r.client_id for r in skipped}
        entry = self.engine.complete(plan, [*skipped, *[r for r in got if r.client_id not in skipped_ids]])
        self.last_entry = entry
        metrics = {"clients": entry["clients"], "rejected": len(entry["rejected"]),
                   "aggregation-s": entry["aggregation_s"]}
        metrics.update({k: float(v) for k, v in entry.items()
                        if k in ("train_loss", "rougeL", "exact_match", "heldout_loss")})
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
        if timeout is not None:
            self.round_timeout_s = timeout
        arrays = initial_arrays if initial_arrays is not None else ArrayRecord()
        result = Result()
        self.engine.start()
        for rnd in range(self.first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", rnd, num_rounds)
            replies = grid.send_and_receive(messages=self.configure_train(rnd, arrays, ConfigRecord(), grid),
                                            timeout=self.round_timeout_s)
            _, metrics = self.aggregate_train(rnd, replies)
            result.train_metrics_clientapp[rnd] = metrics
            log.info("round %d: %s", rnd, {k: v for k, v in self.last_entry.items()
                                            if k not in ("ranks", "traffic")})
            if self.on_round is not None:
                self.on_round(rnd, self.last_entry)
        return result
