"""The Flower run configuration (``[tool.flwr.app.config]``, ``flwr run --run-config``) and how
it maps onto the one ``RunConfig`` (:mod:`server.runtimes.config`), so that every runtime takes
its defaults and validation from one place.

Keys (Flower style, hyphenated): ``strategy``, ``num-server-rounds``, ``seed``, ``num-heldout``,
``rank-distribution`` ("" = device mix + rank policy), ``fedit-rank``, ``model`` ("" = the
shipped tiny model), ``data`` ("" = the bundled suite), ``local-steps``, ``batch-size``, ``lr``,
``alpha``, ``rslora`` (rank-stabilised scaling), ``max-length``, ``min-clients``, ``min-nodes``
(nodes to wait for), ``node-wait-s``, ``round-timeout-s``, ``evaluate``, ``eval-max-new-tokens``,
``output-dir``, ``resume``, ``client-task`` (``simulated`` | ``edge``), ``threads`` (0 = torch default), ``device``
(``cpu`` | ``cuda[:N]``: where FlexLoRA/raFLoRA aggregate).

Sampling (the embedded runtime's ``--clients-per-round`` rule, seeded by ``seed``):
``clients-per-round`` (0 = every node every round) or ``fraction-train`` (0 = unused; else
``max(1, int(fraction * nodes))``); not both. Reply limits (0 = the safe default):
``max-update-bytes``, ``max-header-bytes``, ``max-delta-norm`` (``DecodeLimits``) and
``max-round-bytes`` (the per-round aggregator memory budget; 0 = none), ``max-num-examples``.
Defences (docs/security.md; 0 = off): ``clip-norm``, ``clip-adaptive``, ``max-weight-share``,
``trim-fraction``, ``direction-trim``, ``max-norm-growth``; ``keep-checkpoints`` round checkpoints are kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from server.runtimes.config import RunConfig

__all__ = ["FlowerRunConfig", "NUM_ROUNDS", "OUTPUT_DIR", "to_run_config", "run_config_defaults", "clients_per_round", "limit_settings"]


def _get(cfg: Mapping, key: str, default, kind):
    value = cfg.get(key, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"run config {key!r} must be true or false, got {value!r}")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"run config {key!r} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"run config {key!r} must be a number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ValueError(f"run config {key!r} must be a string, got {value!r}")
    return value


NUM_ROUNDS = 3          # num-server-rounds when absent
OUTPUT_DIR = "runs/flower"


@dataclass(kw_only=True)
class FlowerRunConfig:
    """How the ServerApp reaches its nodes, the settings a Flower run has beyond ``RunConfig``
    (rounds, resume and the output folder, ``checkpoint_dir``, are ``RunConfig``'s)."""
    min_nodes: int = 2
    node_wait_s: float = 120.0
    round_timeout_s: float = 600.0
    evaluate: bool = True
    client_task: str = "simulated"

    def __post_init__(self) -> None:
        if isinstance(self.min_nodes, bool) or not isinstance(self.min_nodes, int) or self.min_nodes < 1:
            raise ValueError(f"min_nodes must be an int >= 1, got {self.min_nodes!r}")
        for name in ("node_wait_s", "round_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.client_task not in ("simulated", "edge"):
            raise ValueError(f"client_task must be 'simulated' or 'edge', got {self.client_task!r}")

    @classmethod
    def from_run_config(cls, cfg: Mapping) -> "FlowerRunConfig":
        return cls(min_nodes=_get(cfg, "min-nodes", 2, int), node_wait_s=_get(cfg, "node-wait-s", 120.0, float),
                   round_timeout_s=_get(cfg, "round-timeout-s", 600.0, float),
                   evaluate=_get(cfg, "evaluate", True, bool), client_task=_get(cfg, "client-task", "simulated", str))


def clients_per_round(cfg: Mapping, *, num_clients: int) -> int | None:
    """Clients sampled per round from ``clients-per-round`` / ``fraction-train`` (None: all)."""
    k = _get(cfg, "clients-per-round", 0, int)
    fraction = _get(cfg, "fraction-train", 0.0, float)
    if k < 0:
        raise ValueError(f"run config 'clients-per-round' must be >= 0 (0 = all), got {k}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"run config 'fraction-train' must be in [0, 1] (0 = unused), got {fraction}")
    if k and fraction:
        raise ValueError("run config: set 'clients-per-round' or 'fraction-train', not both")
    if fraction:
        k = max(1, int(fraction * num_clients))
    if k > num_clients:
        raise ValueError(f"run config 'clients-per-round'={k} is above the {num_clients} clients (nodes) "
                         f"of the federation")
    return k or None


def limit_settings(cfg: Mapping) -> dict:
    """``RunConfig`` reply limits from ``max-update-bytes`` / ``max-header-bytes`` /
    ``max-delta-norm`` / ``max-num-examples`` (0 = the decoder's default) and ``max-round-bytes``
    (0 = no budget)."""
    keys = {"max-update-bytes": ("max_reply_bytes", int), "max-header-bytes": ("max_header_bytes", int),
            "max-delta-norm": ("max_delta_norm", float), "max-num-examples": ("max_num_examples", int),
            "max-round-bytes": ("max_round_bytes", int)}
    given = {}
    for key, (name, kind) in keys.items():
        value = _get(cfg, key, kind(0), kind)
        if value < 0:
            raise ValueError(f"run config {key!r} must be >= 0 (0 = the default), got {value}")
        given[name] = value
    return {k: v or None for k, v in given.items()}


_SIM_KEYS = {  # run config key -> RunConfig field (the embedded runtime's defaults apply)
    "strategy": "strategy", "num-heldout": "num_heldout", "seed": "seed", "fedit-rank": "fedit_rank",
    "local-steps": "local_steps", "batch-size": "batch_size", "lr": "lr", "alpha": "alpha", "rslora": "rslora",
    "max-length": "max_length", "min-clients": "min_clients", "eval-max-new-tokens": "eval_max_new_tokens",
    "target-modules": "target_modules", "trim-fraction": "trim_fraction", "direction-trim": "direction_trim",
    "keep-checkpoints": "keep_checkpoints",
    "split": "split", "carry": "carry", "device": "device", "suite": "suite", "shards": "shards"}
_OFF_KEYS = {"clip-norm": "clip_norm", "clip-adaptive": "clip_adaptive", "max-weight-share": "max_weight_share",
             "max-norm-growth": "max_norm_growth", "sanity-ratio": "sanity_ratio"}   # 0.0 = None (off) there


def run_config_defaults() -> dict:
    """The run config defaults that map onto ``RunConfig`` fields: the embedded runtime's
    own defaults, so a key left out of a Flower run config means what ``flexlora simulate``
    means by it (``[tool.flwr.app.config]`` in pyproject.toml must agree; a test checks)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    out = {key: fields[name].default for key, name in _SIM_KEYS.items()}
    out.update({"rank-distribution": "", "model": "", "data": ""})   # "" = None there
    out.update({key: 0.0 if fields[name].default is None else float(fields[name].default)
                for key, name in _OFF_KEYS.items()})
    out["target-modules"] = ",".join(out["target-modules"])
    return out


def _output_dir(cfg: Mapping) -> str:
    out = _get(cfg, "output-dir", OUTPUT_DIR, str)
    if not out:
        raise ValueError("run config 'output-dir' must be a non-empty path")
    return out


def to_run_config(cfg: Mapping, *, num_clients: int) -> RunConfig:
    """The ``RunConfig`` these Flower settings describe (what ``flexlora simulate`` would run)."""
    d = run_config_defaults()

    def get(key: str, kind):
        return _get(cfg, key, d[key], kind)

    def opt_str(key: str) -> str | None:
        return get(key, str) or None

    threads = _get(cfg, "threads", 0, int)
    return RunConfig(
        strategy=get("strategy", str), rounds=_get(cfg, "num-server-rounds", NUM_ROUNDS, int),
        checkpoint_dir=_output_dir(cfg), resume=_get(cfg, "resume", False, bool),
        num_clients=num_clients, clients_per_round=clients_per_round(cfg, num_clients=num_clients),
        **limit_settings(cfg), num_heldout=get("num-heldout", int), seed=get("seed", int),
        rank_distribution=opt_str("rank-distribution"), fedit_rank=get("fedit-rank", str),
        model=opt_str("model"), data=opt_str("data"), local_steps=get("local-steps", int),
        batch_size=get("batch-size", int), lr=get("lr", float), alpha=get("alpha", float),
        rslora=get("rslora", bool),
        max_length=get("max-length", int), min_clients=get("min-clients", int),
        target_modules=tuple(t.strip() for t in get("target-modules", str).split(",") if t.strip()) or ("auto",),
        eval_max_new_tokens=get("eval-max-new-tokens", int), threads=threads or None, progress=False,
        split=get("split", str), carry=get("carry", bool), device=get("device", str), suite=get("suite", str),
        shards=get("shards", int),
        trim_fraction=get("trim-fraction", float), direction_trim=get("direction-trim", float),
        keep_checkpoints=get("keep-checkpoints", int),
        **{name: get(key, float) or None for key, name in _OFF_KEYS.items()})
