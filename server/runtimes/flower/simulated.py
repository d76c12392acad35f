"""A simulated device of the embedded runtime behind a Flower SuperNode (``client-task=simulated``).

SuperNode ``--node-config "partition-id=P num-partitions=N"`` makes the node the P-th client
(in sorted client-id order) of the federation ``flexlora simulate`` builds for N clients with
the run's seed: the same bundled suite (or ``data`` JSONL), the same device mix and rank
policy, the same base model and the same trainer
(``edge_client.trainer.LocalTrainer``) with the per-client seed the server sends.
That is what makes a Flower run reproduce the embedded run's adapter for the same seed.
FLoRA's merged updates persist across rounds in the node's Flower ``Context.state``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from edge_client.targets import ffn_pattern_keys
from edge_client.trainer import LocalTrainer
from edge_client.wire import ClientUpdate, NodeProbe, RankSpec, TrainOrder, parse_rank_pattern
from server.federation.strategies.flora import merge_once
from server.runtimes.flower.config import simulation_config
from server.runtimes.simulate import _capped_ranks, build_suite_for, train_config_for
from server.workloads.devices import DEMO_RANKS, LLAMA_FFN_KEYS, assign_devices
from server.workloads.model import apply_delta, fingerprint, linear_shapes, load_base

__all__ = ["SimulatedTask"]

_MERGED_KEY = "flexlora.client-delta"
_MERGED_ROUND_KEY = "flexlora.flora-merged-round"


def _node_int(node_config: Mapping, key: str) -> int:
    if key not in node_config:
        raise ValueError(f"client-task 'simulated' needs --node-config {key}=<int>")
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"node config {key!r} must be an integer, got {value!r}")
    return int(value)


# One process (a SuperNode's ClientApp, or a Ray actor of the Simulation Engine serving many
# nodes) builds the federation and loads the base model once per run settings, not per node:
# with 1613 simulated nodes, rebuilding them for every message would dominate the run.
_FEDERATIONS: dict[tuple, tuple[dict, dict]] = {}
_BASES: dict[str | None, tuple] = {}


def _federation(cfg) -> tuple[dict, dict]:
    key = (cfg.num_clients, cfg.num_heldout, cfg.seed, cfg.data, cfg.model, cfg.rank_distribution,
           tuple(cfg.target_modules))
    if key not in _FEDERATIONS:
        suite = build_suite_for(cfg)
        clients = {c.client_id: c for c in suite.train}
        if cfg.model is None:
            rank_map, ffn_keys = DEMO_RANKS, LLAMA_FFN_KEYS
        else:   # the same ranks and FFN keys as `flexlora simulate --model` (simulation/runtime.py)
            model = _base(cfg.model)[0]
            rank_map = _capped_ranks(linear_shapes(model, cfg.target_modules))
            ffn_keys = ffn_pattern_keys(model, cfg.target_modules)
        devices = {d.client_id: d for d in assign_devices(sorted(clients), seed=cfg.seed,
                                                          rank_distribution=cfg.rank_distribution,
                                                          rank_map=rank_map, ffn_keys=ffn_keys)}
        _FEDERATIONS.clear()
        _FEDERATIONS[key] = (clients, devices)
    return _FEDERATIONS[key]


def _base(model_name: str | None) -> tuple:
    """(model, tokenizer, fingerprint, base state); ``apply_delta`` resets the weights per client."""
    if model_name not in _BASES:
        model, tokenizer = load_base(model_name)
        _BASES.clear()
        _BASES[model_name] = (model, tokenizer, fingerprint(model), copy.deepcopy(model.state_dict()))
    return _BASES[model_name]


class SimulatedTask:
    def __init__(self, node_config: Mapping, run_config: Mapping, node_id: int) -> None:
        import torch

        num = _node_int(node_config, "num-partitions")
        part = _node_int(node_config, "partition-id")
        if num < 1 or not 0 <= part < num:
            raise ValueError(f"partition-id must be in [0, num-partitions={num}), got {part}")
        self.cfg = simulation_config(run_config, num_clients=num)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        clients, devices = _federation(self.cfg)
        ids = sorted(clients)
        if part >= len(ids):
            raise ValueError(f"partition-id {part}: the data gives only {len(ids)} clients")
        self.client_id = ids[part]
        self.examples = clients[self.client_id].examples
        self.device = devices[self.client_id]
        if "rank" in node_config:  # an explicit rank overrides the simulated device
            self.spec = RankSpec(rank=int(node_config["rank"]),
                                 rank_pattern=parse_rank_pattern(node_config.get("rank-pattern", "")))
        else:
            self.spec = self.device.spec
        self.train_cfg = train_config_for(self.cfg)
        self.model = None          # loaded on the first train message (a probe does not need it)

    def _load(self) -> None:
        if self.model is None:
            self.model, self.tokenizer, self.fingerprint, self.base_state = _base(self.cfg.model)
            self.trainer = LocalTrainer(self.model, self.tokenizer, config=self.train_cfg,
                                        base_model_id=self.fingerprint, client_id=self.client_id)

    def describe(self) -> NodeProbe:
        return NodeProbe(client_id=self.client_id, rank=self.spec.rank, rank_pattern=dict(self.spec.rank_pattern),
                         num_examples=len(self.examples), device=self.device.device,
                         reasons=list(self.device.reasons))

    def _merged(self, state) -> dict[str, np.ndarray]:
        if _MERGED_KEY not in state.array_records:
            return {}
        return {k: v.numpy() for k, v in state.array_records[_MERGED_KEY].items()}

    def train(self, order: TrainOrder, state) -> ClientUpdate:
        from flwr.app import Array, ArrayRecord

        self._load()
        init = order.init()
        merged = self._merged(state)
        merged_round = (int(state.array_records[_MERGED_ROUND_KEY]["round"].numpy().reshape(-1)[0])
                        if _MERGED_ROUND_KEY in state.array_records else -1)
        if merge_once(init, merged_round):  # FLoRA: this node's base gains the stack, once
            for module in init.modules():
                merged[module] = merged.get(module, 0) + init.module_delta(module)
            state.array_records[_MERGED_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32))
                                                            for k, v in merged.items()})
            state.array_records[_MERGED_ROUND_KEY] = ArrayRecord({"round": Array(np.array([init.round], np.int64))})
        if init is not None and init.merge_into_base:
            init = None
        # the base may be shared with other nodes served by this process: reset it per message
        apply_delta(self.model, self.base_state, merged)
        self.trainer.load_global(init)
        return self.trainer.train(self.examples, round=order.round, seed=order.seed, spec=order.spec,
                                  client_id=self.client_id)
