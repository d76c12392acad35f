"""The edge client as a Flower ClientApp (``flwr`` Message API, Deployment Engine).

Wire protocol (every payload is a ``ConfigRecord`` in the Message's ``RecordDict``; adapters
travel as the safetensors + JSON bytes of ``edge_client.update``, never pickle):

* ``query``  server -> node: ``{"flexlora.query": {}}``; node -> server
  ``{"flexlora.probe": {client-id, rank, rank-pattern (JSON), num-examples, device, reasons (JSON)}}``:
  who the node is and the rank its device affords (from the probe, or from ``--node-config``).
* ``train``  server -> node: ``{"flexlora.train": {client-id, round, seed, rank, rank-pattern,
  [global: encode_global(...) bytes]}}`` (no ``global``: start a fresh adapter); node -> server
  ``{"flexlora.update": {update: encode_update(...) bytes}, "metrics": MetricRecord}``.

What a node trains on is a *local task* chosen by the run config key ``client-task``:

* ``edge`` (:class:`EdgeTask`): a real device. ``--node-config`` keys: ``data-path`` (JSONL,
  required), ``model`` (else the run config's ``model``), ``client-id`` (default
  ``node-<node id>``), ``rank`` and ``rank-pattern`` (e.g. ``"gate_proj=16,up_proj=16"``);
  without ``rank`` the rank comes from ``resources.probe`` + ``rank_policy.choose_rank`` over
  the run config's ``allowed-ranks``.
* ``simulated``: a simulated device of the embedded runtime (``server.flower.simulated``),
  selected by ``partition-id`` / ``num-partitions``; it runs exactly the simulation's local
  training so a Flower run reproduces ``flexlora simulate``. It is loaded by name only when
  asked for, so a device install of the edge client never imports the server.

Fault injection, for tests only: ``--node-config fault=garbage`` makes the node reply to every
train message with corrupt update bytes (its real update's length, random content after the
8-byte header length), which the server must reject. It is honoured only when the SuperNode's
environment has ``FLEXLORA_TEST_FAULTS=1``; otherwise such a node fails its train messages.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .update import ClientUpdate, GlobalFactors, decode_global, encode_update

__all__ = ["FAULT_ENV", "garbage_bytes", "QUERY_KEY", "PROBE_KEY", "TRAIN_KEY", "UPDATE_KEY", "METRICS_KEY", "TASKS", "NodeProbe",
           "TrainOrder", "EdgeTask", "parse_rank_pattern", "app"]

QUERY_KEY = "flexlora.query"
PROBE_KEY = "flexlora.probe"
TRAIN_KEY = "flexlora.train"
UPDATE_KEY = "flexlora.update"
METRICS_KEY = "metrics"

FAULT_ENV = "FLEXLORA_TEST_FAULTS"
NODE_FAULTS = ("garbage",)

TASKS = {"edge": "edge_client.flower_app:EdgeTask", "simulated": "server.flower.simulated:SimulatedTask"}


def parse_rank_pattern(value) -> dict[str, int]:
    """``"gate_proj=16,up_proj=16"``, a JSON object string, or a mapping -> ``{name: rank}``."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, str) and value.strip().startswith("{"):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"rank-pattern is not valid JSON: {value!r} ({exc.msg})") from None
    elif isinstance(value, str):
        items = {}
        for part in value.split(","):
            key, sep, rank = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"rank-pattern entry {part!r} is not 'module=rank'")
            items[key.strip()] = rank.strip()
    else:
        raise ValueError(f"rank-pattern must be a string or mapping, got {type(value).__name__}")
    out = {}
    for key, rank in items.items():
        text = str(rank).strip()
        if isinstance(rank, bool) or not text.isdigit() or int(text) < 1:
            raise ValueError(f"rank-pattern[{key!r}] must be an int >= 1, got {rank!r}")
        out[str(key)] = int(text)
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


@dataclass(kw_only=True)
class NodeProbe:
    """What a node tells the server about itself (reply to ``query``)."""
    client_id: str
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    num_examples: int
    device: str = ""
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"client-id must be a non-empty string, got {self.client_id!r}")
        _positive_int("rank", self.rank)
        _positive_int("num-examples", self.num_examples)
        self.rank_pattern = parse_rank_pattern(self.rank_pattern)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"client-id": self.client_id, "rank": int(self.rank),
                             "rank-pattern": json.dumps(self.rank_pattern, sort_keys=True),
                             "num-examples": int(self.num_examples), "device": self.device,
                             "reasons": json.dumps(list(self.reasons))})

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "NodeProbe":
        for key in ("client-id", "rank", "num-examples"):
            if key not in rec:
                raise ValueError(f"probe reply has no {key!r}")
        reasons = json.loads(str(rec.get("reasons", "[]")))
        return cls(client_id=rec["client-id"], rank=rec["rank"], rank_pattern=rec.get("rank-pattern", ""),
                   num_examples=rec["num-examples"], device=str(rec.get("device", "")),
                   reasons=[str(r) for r in reasons] if isinstance(reasons, list) else [])


@dataclass(kw_only=True)
class TrainOrder:
    """One round's instructions for one node (the ``train`` message)."""
    client_id: str
    round: int
    seed: int
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    global_bytes: bytes | None = None          # encode_global(...); None: fresh adapter

    def __post_init__(self) -> None:
        _positive_int("round", self.round)
        _positive_int("rank", self.rank)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        self.rank_pattern = parse_rank_pattern(self.rank_pattern)

    def to_record(self) -> ConfigRecord:
        rec = ConfigRecord({"client-id": self.client_id, "round": self.round, "seed": self.seed,
                            "rank": self.rank, "rank-pattern": json.dumps(self.rank_pattern, sort_keys=True)})
        if self.global_bytes is not None:
            rec["global"] = bytes(self.global_bytes)
        return rec

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "TrainOrder":
        for key in ("client-id", "round", "seed", "rank"):
            if key not in rec:
                raise ValueError(f"train message has no {key!r}")
        data = rec.get("global")
        if data is not None and not isinstance(data, bytes):
            raise ValueError(f"train message 'global' must be bytes, got {type(data).__name__}")
        return cls(client_id=str(rec["client-id"]), round=rec["round"], seed=rec["seed"], rank=rec["rank"],
                   rank_pattern=rec.get("rank-pattern", ""), global_bytes=data)

    def init(self) -> GlobalFactors | None:
        return decode_global(self.global_bytes) if self.global_bytes is not None else None


class EdgeTask:
    """A real device: local JSONL data, the edge ``LocalTrainer``, rank from node config or probe."""

    def __init__(self, node_config: Mapping, run_config: Mapping, node_id: int) -> None:
        from .data import load_jsonl

        path = node_config.get("data-path")
        if not path:
            raise ValueError("client-task 'edge' needs --node-config data-path=<local JSONL file>")
        self.records = load_jsonl(str(path))
        self.model_name = str(node_config.get("model") or run_config.get("model") or "")
        if not self.model_name:
            raise ValueError("client-task 'edge' needs a model: run config 'model' or --node-config model=<path>")
        self.client_id = str(node_config.get("client-id") or f"node-{node_id}")
        self.run_config = dict(run_config)
        self.node_config = dict(node_config)
        self._trainer = None

    def _trainer_for(self, rank: int, rank_pattern: Mapping[str, int], seed: int):
        from .trainer import LocalTrainer, TrainConfig

        cfg = TrainConfig(rank=rank, rank_pattern=dict(rank_pattern), alpha=float(self.run_config.get("alpha", 16.0)),
                          target_modules=tuple(str(self.run_config.get("target-modules", "q_proj,v_proj")).split(",")),
                          learning_rate=float(self.run_config.get("lr", 3e-4)),
                          batch_size=int(self.run_config.get("batch-size", 4)),
                          max_seq_len=int(self.run_config.get("max-length", 256)),
                          max_steps=int(self.run_config.get("local-steps", 10)), seed=seed)
        if self._trainer is None:
            self._trainer = LocalTrainer.from_pretrained(self.model_name, config=cfg, client_id=self.client_id)
        else:
            self._trainer.configure(cfg)
        return self._trainer

    def describe(self) -> NodeProbe:
        if "rank" in self.node_config:
            return NodeProbe(client_id=self.client_id, rank=self.node_config["rank"],
                             rank_pattern=self.node_config.get("rank-pattern", ""),
                             num_examples=len(self.records), device="node-config",
                             reasons=["rank given by --node-config"])
        from transformers import AutoConfig

        from .rank_policy import choose_rank
        from .resources import probe

        allowed = [int(r) for r in str(self.run_config.get("allowed-ranks", "4,8,16,32")).split(",")]
        targets = str(self.run_config.get("target-modules", "q_proj,v_proj")).split(",")
        choice = choose_rank(probe(), AutoConfig.from_pretrained(self.model_name), allowed, targets=targets,
                             batch=int(self.run_config.get("batch-size", 4)),
                             seq_len=int(self.run_config.get("max-length", 256)))
        return NodeProbe(client_id=self.client_id, rank=choice.rank, rank_pattern=choice.rank_pattern,
                         num_examples=len(self.records), device="probe", reasons=list(choice.reasons))

    def train(self, order: TrainOrder, state) -> ClientUpdate:
        trainer = self._trainer_for(order.rank, order.rank_pattern, order.seed)
        init = order.init()
        if init is not None:
            trainer.load_global(init)
            if not init.merge_into_base and (init.rank, init.rank_pattern) != (order.rank, order.rank_pattern):
                trainer.configure(rank=order.rank, rank_pattern=dict(order.rank_pattern))
        else:
            trainer.reset_adapter()
        update = trainer.train(self.records, round=order.round)
        update.client_id = self.client_id
        return update


def garbage_bytes(data: bytes, seed: int) -> bytes:
    """``data``'s first 8 bytes (the safetensors header length) followed by random bytes."""
    import numpy as np

    noise = np.random.default_rng(seed).integers(0, 256, size=max(0, len(data) - 8), dtype=np.uint8)
    return bytes(data[:8]) + noise.tobytes()


def _faulty(fault: str, data: bytes, order: TrainOrder) -> bytes:
    if os.environ.get(FAULT_ENV) != "1":
        raise ValueError(f"node config fault={fault!r} is for tests: the SuperNode needs {FAULT_ENV}=1")
    if fault not in NODE_FAULTS:
        raise ValueError(f"node config fault={fault!r} is not one of {NODE_FAULTS}")
    return garbage_bytes(data, order.seed)


_TASK_CACHE: dict[tuple, object] = {}


def _task(context: Context):
    name = str(context.run_config.get("client-task", "edge"))
    if name not in TASKS:
        raise ValueError(f"run config client-task={name!r} is not one of {sorted(TASKS)}")
    key = (context.run_id, context.node_id, name)
    if key not in _TASK_CACHE:
        module, attr = TASKS[name].split(":")
        cls = getattr(importlib.import_module(module), attr)
        _TASK_CACHE.clear()  # one run at a time per process
        _TASK_CACHE[key] = cls(dict(context.node_config), dict(context.run_config), context.node_id)
    return _TASK_CACHE[key]


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    probe = _task(context).describe()
    return Message(RecordDict({PROBE_KEY: probe.to_record()}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if TRAIN_KEY not in msg.content.config_records:
        raise ValueError(f"train message has no {TRAIN_KEY!r} ConfigRecord")
    order = TrainOrder.from_record(msg.content.config_records[TRAIN_KEY])
    task = _task(context)
    update = task.train(order, context.state)
    if update.client_id != order.client_id:
        raise ValueError(f"this node is {update.client_id!r}, the server addressed {order.client_id!r}")
    metrics = MetricRecord({"num-examples": int(update.num_examples),
                            **{k: float(v) for k, v in update.metrics.items()}})
    data = encode_update(update)
    fault = context.node_config.get("fault")
    if fault is not None:
        data = _faulty(str(fault), data, order)
    content = RecordDict({UPDATE_KEY: ConfigRecord({"update": data}), METRICS_KEY: metrics})
    return Message(content, reply_to=msg)
