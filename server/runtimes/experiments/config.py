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
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

__all__ = ["ARMS", "DISTRIBUTIONS", "Arm", "CellSettings", "ExperimentConfig", "Cell",
           "load_config_file"]

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


def _positive_int(obj, name: str, minimum: int = 1) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def _positive_float(obj, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


_DEFENCE_FIELDS = ("clip_norm", "clip_adaptive", "max_weight_share", "trim_fraction", "max_norm_growth",
                   "max_num_examples", "max_delta_norm", "faults")


@dataclass(kw_only=True)
class CellSettings:
    """The federation every cell runs (only strategy, distribution and seed vary)."""
    num_clients: int = 16
    clients_per_round: int | None = None   # None: every client every round
    num_heldout: int = 4
    heldout_examples: int = 16             # per held-out client
    rounds: int = 6
    local_steps: int = 8
    batch_size: int = 8
    lr: float = 1e-2
    alpha: float = 16.0
    max_length: int = 64
    eval_max_new_tokens: int = 16
    model: str | None = None               # None: the shipped tiny model (demo ranks)
    data: str | None = None                # client JSONL (instruction, input, output, category)
    collapse_threshold: float = 0.9        # spectrum warning: share of ||dW||^2 at the smallest rank
    # defences and decoder limits (docs/security.md; off / library defaults unless set)
    clip_norm: float | None = None
    clip_adaptive: float | None = None
    max_weight_share: float | None = None
    trim_fraction: float = 0.0
    max_norm_growth: float | None = None
    max_num_examples: int | None = None
    max_delta_norm: float | None = None
    faults: dict = field(default_factory=dict)   # client id -> fault kind or python:MODULE:FUNCTION
    split: str = "reference"               # FlexLoRA/raFLoRA factor split: official "reference" or "balanced"
    suite: str = "bundled"                 # without data: "bundled" demo suite or "rank" (server.workloads.rank_suite)

    def __post_init__(self) -> None:
        for name in ("num_clients", "heldout_examples", "rounds", "local_steps", "batch_size",
                     "max_length", "eval_max_new_tokens"):
            _positive_int(self, name)
        _positive_int(self, "num_heldout", 1)
        for name in ("lr", "alpha"):
            _positive_float(self, name)
        if self.clients_per_round is not None:
            _positive_int(self, "clients_per_round")
            if self.clients_per_round > self.num_clients:
                raise ValueError(f"clients_per_round must be <= num_clients={self.num_clients}, "
                                 f"got {self.clients_per_round}")
        if self.suite not in ("bundled", "rank"):
            raise ValueError(f"suite must be 'bundled' or 'rank', got {self.suite!r}")
        if self.split not in ("reference", "balanced"):
            raise ValueError(f"split must be 'reference' or 'balanced', got {self.split!r}")
        if not (isinstance(self.collapse_threshold, (int, float)) and 0 < self.collapse_threshold <= 1):
            raise ValueError(f"collapse_threshold must be in (0, 1], got {self.collapse_threshold!r}")
        from server.federation.strategies import RobustConfig
        from server.runtimes.faults import check_fault
        RobustConfig(clip_norm=self.clip_norm, clip_adaptive=self.clip_adaptive,
                     max_weight_share=self.max_weight_share, trim_fraction=self.trim_fraction)
        self.decode_limits()
        for cid, fault in dict(self.faults).items():
            check_fault(cid, fault)

    def decode_limits(self):
        from edge_client.wire import DecodeLimits
        lim = {k: getattr(self, k) for k in ("max_num_examples", "max_delta_norm") if getattr(self, k) is not None}
        return DecodeLimits(**lim) if lim else None


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
    settings: CellSettings = field(default_factory=CellSettings)
    threads: int | None = 1

    def __post_init__(self) -> None:
        if isinstance(self.settings, Mapping):
            self.settings = CellSettings(**self.settings)
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
        if self.threads is not None:
            _positive_int(self, "threads")

    def cells(self) -> list[Cell]:
        """Seed-major order, so a partial grid already has every arm and distribution."""
        return [Cell(arm=a, distribution=d, seed=s)
                for s in self.seeds for d in self.distributions for a in self.arms]

    def identity(self) -> dict:
        """What a stored cell must match to be reused (settings, not the grid's extent)."""
        doc = asdict(self.settings)
        # defence fields at their defaults leave the identity (and stored cells) as before
        for f in fields(CellSettings):
            if f.name in _DEFENCE_FIELDS and doc[f.name] == (f.default_factory() if callable(f.default_factory)
                                                            else f.default):
                del doc[f.name]
        return doc

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"arms": list(self.arms), "distributions": list(self.distributions), "seeds": list(self.seeds),
                "settings": asdict(self.settings), "threads": self.threads}


def load_config_file(path: str) -> dict:
    """A JSON file with any of ``arms``, ``distributions``, ``seeds``, ``threads`` and
    ``settings`` (a dict of ``CellSettings`` fields); unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"config {path}: expected a JSON object, got {type(doc).__name__}")
    known = {"arms", "distributions", "seeds", "threads", "settings"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown keys {unknown}; expected some of {sorted(known)}")
    settings = doc.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError(f"config {path}: 'settings' must be an object")
    names = {f.name for f in fields(CellSettings)}
    bad = sorted(set(settings) - names)
    if bad:
        raise ValueError(f"config {path}: unknown settings {bad}; expected some of {sorted(names)}")
    return doc
