"""A simulated device of the embedded runtime behind a Flower SuperNode (``client-task=simulated``).

SuperNode ``--node-config "partition-id=P num-partitions=N"`` makes the node the P-th client
(in sorted client-id order) of the federation ``build_workload`` builds for N clients with the
run's settings: the same suite (or ``data`` JSONL), the same devices and ranks, the same base
model and the same trainer (``edge_client.trainer.LocalTrainer``) with the per-client seed the
server sends. That is what makes a Flower run reproduce the embedded run's adapter for the
same seed. FLoRA's merged stacks (``MergedStacks``) persist across rounds in the node's Flower
``Context.state``.

The edge client's Flower ClientApp finds this task through the ``flexlora.client_tasks`` entry
point that the server package declares (pyproject.toml); the client package names no server
module.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.wire import ClientUpdate, NodeProbe, RankSpec, TrainOrder, parse_rank_pattern
from server.runtimes.build import SharedBase, build_workload, load_shared_base, train_config_for
from server.runtimes.clients import MergedStacks, fresh_or_global
from server.runtimes.flower.config import to_run_config

__all__ = ["SimulatedTask"]

_STACKS_KEY = "flexlora.flora-stacks"


def _node_int(node_config: Mapping, key: str) -> int:
    if key not in node_config:
        raise ValueError(f"client-task 'simulated' needs --node-config {key}=<int>")
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"node config {key!r} must be an integer, got {value!r}")
    return int(value)


# One process (a SuperNode's ClientApp, or a Ray actor of the Simulation Engine serving many
# nodes) loads the base model and builds the workload once per run settings, not per node:
# with 1613 simulated nodes, rebuilding them for every message would dominate the run.
_BASES: dict[str | None, SharedBase] = {}
_WORKLOADS: dict[str, object] = {}


def _base(model_name: str | None) -> SharedBase:
    if model_name not in _BASES:
        _BASES.clear()
        _BASES[model_name] = load_shared_base(model_name, evaluation=False)
    return _BASES[model_name]


def _workload(cfg):
    key = repr(cfg.identity())
    if key not in _WORKLOADS:
        workload = build_workload(cfg, _base(cfg.model))
        _WORKLOADS.clear()
        _WORKLOADS[key] = workload
    return _WORKLOADS[key]


class SimulatedTask:
    def __init__(self, node_config: Mapping, run_config: Mapping, node_id: int) -> None:
        import torch

        num = _node_int(node_config, "num-partitions")
        part = _node_int(node_config, "partition-id")
        if num < 1 or not 0 <= part < num:
            raise ValueError(f"partition-id must be in [0, num-partitions={num}), got {part}")
        self.cfg = to_run_config(run_config, num_clients=num)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        workload = _workload(self.cfg)
        ids = sorted(workload.examples)
        if part >= len(ids):
            raise ValueError(f"partition-id {part}: the data gives only {len(ids)} clients")
        self.client_id = ids[part]
        self.examples = workload.examples[self.client_id]
        self.device = workload.devices[self.client_id]
        if "rank" in node_config:  # an explicit rank overrides the simulated device
            self.spec = RankSpec(rank=int(node_config["rank"]),
                                 rank_pattern=parse_rank_pattern(node_config.get("rank-pattern", "")))
        else:
            self.spec = self.device.spec
        self.trainer = None        # made on the first train message (a probe does not need it)

    def describe(self) -> NodeProbe:
        return NodeProbe(client_id=self.client_id, rank=self.spec.rank, rank_pattern=dict(self.spec.rank_pattern),
                         num_examples=len(self.examples), device=self.device.device,
                         reasons=list(self.device.reasons))

    def train(self, order: TrainOrder, state) -> ClientUpdate:
        from flwr.app import Array, ArrayRecord

        from edge_client.trainer import LocalTrainer

        base = _base(self.cfg.model)
        if self.trainer is None:
            self.trainer = LocalTrainer(base.model, base.tokenizer, config=train_config_for(self.cfg),
                                        base_model_id=base.fingerprint, client_id=self.client_id)
        init = order.init()
        stacks = MergedStacks()
        if _STACKS_KEY in state.array_records:
            stacks.load_state({k: v.numpy() for k, v in state.array_records[_STACKS_KEY].items()})
        if stacks.absorb(init):   # FLoRA: this node's base gains the stack, once
            state.array_records[_STACKS_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                            for k, v in stacks.state_tensors().items()})
        # the base may be shared with other nodes served by this process: reset it per message
        stacks.apply(base.model, base.state)
        self.trainer.load_global(fresh_or_global(init))
        return self.trainer.train(self.examples, round=order.round, seed=order.seed, spec=order.spec,
                                  client_id=self.client_id)
