"""The edge client as a Flower ClientApp (``flwr`` Message API, Deployment Engine).

Wire protocol (every payload is a ``ConfigRecord`` in the Message's ``RecordDict``; adapters
travel as the safetensors + JSON bytes of ``edge_client.wire``, never pickle):

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
* any task another package registers under the ``flexlora.client_tasks`` entry-point group
  (a class taking ``(node_config, run_config, node_id)`` with ``describe()`` and ``train(order,
  state)``), or :func:`register_task` in-process. The server registers ``simulated``, a
  simulated device of its embedded runtime selected by ``partition-id`` / ``num-partitions``
  that runs exactly the simulation's local training, so a Flower run reproduces ``flexlora
  simulate``. A task is loaded only when asked for: this package names no server module, and a
  device install of the edge client never imports the server.

Fault injection, for tests only: ``--node-config fault=garbage`` makes the node reply to every
train message with corrupt update bytes (its real update's length, random content after the
8-byte header length), which the server must reject. It is honoured only when the SuperNode's
environment has ``FLEXLORA_TEST_FAULTS=1``; otherwise such a node fails its train messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .wire import METRICS_KEY, PROBE_KEY, TRAIN_KEY, UPDATE_KEY, ClientUpdate, NodeProbe, TrainOrder, encode_update

__all__ = ["FAULT_ENV", "CLIENT_TASK_DEFAULT", "TASK_ENTRY_POINTS", "garbage_bytes", "register_task", "task_factory",
           "EdgeTask", "app"]

FAULT_ENV = "FLEXLORA_TEST_FAULTS"
NODE_FAULTS = ("garbage",)

TASK_ENTRY_POINTS = "flexlora.client_tasks"   # entry-point group of the tasks other packages provide
CLIENT_TASK_DEFAULT = "simulated"     # the run config's ``client-task`` when absent (ServerApp too)
_TASKS: dict[str, Callable] = {}      # name -> task class: built-in, registered or loaded from an entry point


def register_task(name: str, factory: Callable) -> None:
    """Make ``client-task=<name>`` run ``factory(node_config, run_config, node_id)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    _TASKS[name] = factory


def task_factory(name: str) -> Callable:
    """The task class for ``client-task=<name>``: registered, else the entry point of that name."""
    if name not in _TASKS:
        found = [ep for ep in entry_points(group=TASK_ENTRY_POINTS) if ep.name == name]
        if not found:
            known = sorted(set(_TASKS) | {ep.name for ep in entry_points(group=TASK_ENTRY_POINTS)})
            raise ValueError(f"run config client-task={name!r} is not one of {known}")
        _TASKS[name] = found[0].load()
    return _TASKS[name]


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
        self._trainer_obj = None

    def _trainer(self):
        from .trainer import LocalTrainer, TrainConfig

        if self._trainer_obj is None:
            self._trainer_obj = LocalTrainer.from_pretrained(self.model_name,
                                                             config=TrainConfig.from_run_config(self.run_config),
                                                             client_id=self.client_id)
        return self._trainer_obj

    def describe(self) -> NodeProbe:
        if "rank" in self.node_config:
            return NodeProbe(client_id=self.client_id, rank=self.node_config["rank"],
                             rank_pattern=self.node_config.get("rank-pattern", ""),
                             num_examples=len(self.records), device="node-config",
                             reasons=["rank given by --node-config"])
        from .models import load_config
        from .rank_policy import choose_rank
        from .resources import probe
        from .trainer import TrainConfig

        tcfg = TrainConfig.from_run_config(self.run_config)
        allowed = [int(r) for r in str(self.run_config.get("allowed-ranks", "4,8,16,32")).split(",")]
        choice = choose_rank(probe(), load_config(self.model_name), allowed,
                             targets=list(tcfg.target_modules), batch=tcfg.batch_size, seq_len=tcfg.max_length)
        return NodeProbe(client_id=self.client_id, rank=choice.rank, rank_pattern=choice.rank_pattern,
                         num_examples=len(self.records), device="probe", reasons=list(choice.reasons))

    def train(self, order: TrainOrder, state) -> ClientUpdate:
        trainer = self._trainer()
        trainer.load_global(order.init())        # FLoRA's merge goes into this device's base weights
        return trainer.train(self.records, round=order.round, seed=order.seed, spec=order.spec,
                             client_id=self.client_id)


register_task("edge", EdgeTask)


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
    name = str(context.run_config.get("client-task", CLIENT_TASK_DEFAULT))
    cls = task_factory(name)
    key = (context.run_id, context.node_id, name)
    if key not in _TASK_CACHE:
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
