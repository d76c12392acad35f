"""What an experiment grid is: the per-cell federation settings and the grid over
strategies x rank distributions x seeds.

A *cell* is one federation run (one strategy arm, one rank distribution, one seed). Its
identity is everything that changes its numbers; the runner stores each finished cell as
``cells/<key>.json`` together with that identity and skips a cell whose file exists with the
same identity (resume).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from server.runtimes.config import RunConfig, experiment_settings
from server.workloads.catalog import read_json

__all__ = ["ARMS", "DISTRIBUTIONS", "Arm", "ExperimentConfig", "Cell", "CELL_FIELDS", "SETTING_FIELDS",
           "load_config_file", "experiment_settings"]

DISTRIBUTIONS = ("uniform", "heavy_tail_light", "heavy_tail_strong", "normal")


@dataclass(kw_only=True, frozen=True)
class Arm:
    """One strategy as compared in the table (FedIT twice: smallest and largest rank)."""
    label: str
    strategy: str
    fedit_rank: str | None = None      # "min" | "max" for FedIT, None otherwise
    carry: bool = False                # FlexLoRA with carry
    description: str = ""


ARMS: dict[str, Arm] = {a.label: a for a in (
    Arm(label="fedit_min", strategy="fedit", fedit_rank="min",
        description="FedIT, every client at the federation's smallest rank (resource-constrained)"),
    Arm(label="fedit_max", strategy="fedit", fedit_rank="max",
        description="FedIT, every client at the largest rank (resource-unaware upper bound)"),
    Arm(label="hetlora", strategy="hetlora", description="HetLoRA: zero-pad, sparsity-weighted average"),
    Arm(label="flora", strategy="flora", description="FLoRA: stack the factors, merge into the base"),
    Arm(label="flexlora", strategy="flexlora", description="FlexLoRA: average dW, truncated SVD per rank"),
    Arm(label="flexlora_carry", strategy="flexlora", carry=True,
        description="FlexLoRA with carry: the directions a client did not receive are kept (ours)"),
    Arm(label="raflora", strategy="raflora",
        description="raFLoRA: rank-partitioned aggregation (arXiv 2602.13486), FlexLoRA redistribution"),
)}


# The per-cell federation settings are a RunConfig (server.runtimes.config) with the grid's
# defaults (experiment_settings); these are the fields a stored grid has always been identified
# by. A cell sets strategy, rank distribution, seed, FedIT's rank and carry itself.
CELL_FIELDS = ("num_clients", "clients_per_round", "num_heldout", "heldout_examples", "rounds", "local_steps",
               "batch_size", "lr", "alpha", "max_length", "eval_max_new_tokens", "model", "data",
               "collapse_threshold", "clip_norm", "clip_adaptive", "max_weight_share", "trim_fraction",
               "max_norm_growth", "max_num_examples", "max_delta_norm", "faults", "split", "suite")
PER_CELL = ("strategy", "rank_distribution", "seed", "fedit_rank", "carry")
# how a process runs, not what a cell computes: never part of a cell's identity
_RUNTIME_FIELDS = ("checkpoint_dir", "resume", "overwrite", "keep_checkpoints", "threads", "progress",
                   "client_timeout_s")
_DEFENCE_FIELDS = ("clip_norm", "clip_adaptive", "max_weight_share", "trim_fraction", "max_norm_growth",
                   "max_num_examples", "max_delta_norm", "faults")
SETTING_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name not in PER_CELL + _RUNTIME_FIELDS)


@dataclass(kw_only=True, frozen=True)
class Cell:
    arm: str
    distribution: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}__{self.distribution}__s{self.seed}"


@dataclass(kw_only=True)
class ExperimentConfig:
    """The grid: arms x distributions x seeds, all with the same ``settings``."""
    arms: Sequence[str] = field(default_factory=lambda: list(ARMS))
    distributions: Sequence[str] = field(default_factory=lambda: list(DISTRIBUTIONS))
    seeds: Sequence[int] = (0, 1, 2)
    settings: RunConfig = field(default_factory=experiment_settings)
    threads: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.settings, Mapping):
            self.settings = experiment_settings(**self.settings)
        if not isinstance(self.settings, RunConfig):
            raise ValueError(f"settings must be a RunConfig or a dict of its fields, got {type(self.settings).__name__}")
        self.arms, self.distributions, self.seeds = list(self.arms), list(self.distributions), list(self.seeds)
        for i, a in enumerate(self.arms):
            if a not in ARMS:
                raise ValueError(f"arms[{i}]={a!r} is not one of {list(ARMS)}")
        for i, d in enumerate(self.distributions):
            if d not in DISTRIBUTIONS:
                raise ValueError(f"distributions[{i}]={d!r} is not one of {list(DISTRIBUTIONS)}")
        for i, s in enumerate(self.seeds):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds[{i}] must be an int >= 0, got {s!r}")
        for name, seq in (("arms", self.arms), ("distributions", self.distributions), ("seeds", self.seeds)):
            if not seq:
                raise ValueError(f"{name} must be non-empty")
            if len(set(seq)) != len(seq):
                raise ValueError(f"{name} has duplicates: {seq}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")

    def cells(self) -> list[Cell]:
        """Seed-major order, so a partial grid already has every arm and distribution."""
        return [Cell(arm=a, distribution=d, seed=s)
                for s in self.seeds for d in self.distributions for a in self.arms]

    def identity(self) -> dict:
        """What a stored cell must match to be reused (settings, not the grid's extent): the
        CELL_FIELDS (defences only when set, so older grids keep their hash) and any other
        setting that differs from the grid's default."""
        defaults = experiment_settings()
        doc = {}
        for name in SETTING_FIELDS:
            value, default = getattr(self.settings, name), getattr(defaults, name)
            if (name in CELL_FIELDS and name not in _DEFENCE_FIELDS) or value != default:
                doc[name] = list(value) if isinstance(value, tuple) else value
        return doc

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"arms": list(self.arms), "distributions": list(self.distributions), "seeds": list(self.seeds),
                "settings": self.identity(), "threads": self.threads}


def load_config_file(path: str) -> dict:
    """A JSON file with any of ``arms``, ``distributions``, ``seeds``, ``threads`` and
    ``settings`` (a dict of ``RunConfig`` fields other than those a cell sets); unknown keys are
    errors."""
    doc = read_json(path, "config")
    if not isinstance(doc, dict):
        raise ValueError(f"config {path}: expected a JSON object, got {type(doc).__name__}")
    known = {"arms", "distributions", "seeds", "threads", "settings"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown keys {unknown}; expected some of {sorted(known)}")
    settings = doc.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError(f"config {path}: 'settings' must be an object")
    names = set(SETTING_FIELDS)
    bad = sorted(set(settings) - names)
    if bad:
        raise ValueError(f"config {path}: unknown settings {bad}; expected some of {sorted(names)}")
    return doc
