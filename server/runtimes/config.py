"""One run configuration for every runtime.

``RunConfig`` says what a federation is (strategy, clients, ranks, base model, data, local
training, evaluation, defences, limits, checkpoints); ``build_federation`` (:mod:`.build`)
assembles it, and each runtime only says how clients are reached and where results go:

* ``flexlora simulate`` builds a ``RunConfig`` from its flags (the defaults here are its own);
* the experiment grid runs one ``RunConfig`` per cell (:func:`experiment_settings` gives the
  grid's defaults: 16 clients, 6 rounds, 8 local steps, client types allotted in the rank
  distribution's proportions, real data split one client per task);
* the Flower ServerApp and its simulated SuperNodes map their run config keys onto it
  (:mod:`server.runtimes.flower.config`).

Every field is validated here, before a model is loaded, with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from edge_client.targets import AUTO
from edge_client.wire import DecodeLimits
from server.core.adapter import SPLITS
from server.federation.strategies import STRATEGIES, RobustConfig, StrategyConfig
from server.workloads.model import TARGET_MODULES

__all__ = ["RunConfig", "RANK_ASSIGNMENTS", "DATA_SPLITS", "SUITES", "experiment_settings",
           "EXPERIMENT_DEFAULTS", "check_device", "parse_targets"]

RANK_ASSIGNMENTS = ("draw", "allot")          # see RunConfig.rank_assignment
DATA_SPLITS = ("round_robin", "per_category")  # see RunConfig.data_split
# without data: the bundled demo suite, the rank suite, the real multi-task suite (clients are tasks),
# or the facts suite (clients hold arbitrary facts of 4 memorisation tasks; capacity-bound, issue 20)
SUITES = ("bundled", "rank", "real", "facts")
DEVICES_HELP = "cpu, cuda or cuda:N"
# command-line help shared by `flexlora simulate` and `flexlora experiment run`
SUITES_HELP = ("without --data: the bundled demo suite, the rank suite, the real-facts multi-task suite "
               "(clients are tasks; held out: unseen tasks), or 'facts': 280 arbitrary facts of 4 memorisation "
               "tasks dealt unequally over the clients (capacity-bound; held out: unseen tasks; some seeds, e.g. "
               "1 and 2, put a facts task among the unseen ones: an error says so)")
RSLORA_HELP = "rank-stabilised LoRA: scaling alpha/sqrt(r) instead of alpha/r"
TARGETS_HELP = "comma-separated short names of the layers that get LoRA, e.g. q_proj,v_proj"


def _int(obj, name: str, minimum: int = 1) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def _positive(obj, name: str, *, optional: bool = False) -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {v!r}")


def _choice(obj, name: str, choices) -> None:
    if getattr(obj, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(obj, name)!r}")


def parse_targets(text: str) -> tuple[str, ...]:
    """A command line's comma-separated LoRA target module short names (``q_proj,v_proj``) as
    ``RunConfig.target_modules``; ValueError quoting ``text`` when a name is empty or not an identifier."""
    names = tuple(t.strip() for t in str(text).split(","))
    bad = sorted({t for t in names if not t.isidentifier()})
    if bad:
        raise ValueError(f"{text!r} is not a comma-separated list of module names such as q_proj,v_proj "
                         f"({', '.join(repr(t) if t else 'an empty name' for t in bad)})")
    return names


def check_device(device: str) -> None:
    """``"cpu"``, or a CUDA device whose backend is built and visible; the error says which
    part is missing (no CUDA build, no GPU)."""
    if device == "cpu":
        return
    if not isinstance(device, str) or not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device must be {DEVICES_HELP}, got {device!r}")
    from server.core import cuda
    ok, reason = cuda.available()
    if not ok:
        raise ValueError(f"device {device!r}: the CUDA aggregator cannot run here: {reason}")


@dataclass(kw_only=True)
class RunConfig:
    """A whole federation run. Defaults are ``flexlora simulate``'s."""
    # --- the federation
    strategy: str = "flexlora"
    rounds: int = 5
    num_clients: int = 20
    clients_per_round: int | None = None      # None: every client every round
    num_heldout: int = 4                      # held-out (unseen) clients evaluated each round
    heldout_examples: int = 24                # examples per held-out client (generated suites, per-task data)
    seed: int = 0
    # "draw": without rank_distribution, the device mix and the edge rank policy; with one, client
    # types drawn with its probabilities. "allot": client types in its proportions (largest remainder)
    rank_assignment: str = "draw"
    rank_distribution: str | None = None      # workloads.json name
    fedit_rank: str = "min"                   # FedIT's homogeneous rank: "min" or "max" of the federation
    split: str = SPLITS[0]                    # FlexLoRA/raFLoRA factor split (server.core.adapter.SPLITS)
    carry: bool = False                       # FlexLoRA with carry (strategy "flexlora" only)
    device: str = "cpu"                       # where FlexLoRA/raFLoRA aggregate: cpu or cuda[:N]
    shards: int = 0                           # FlexLoRA/raFLoRA: modules over this many Ray actors (0: in process)
    # --- the workload
    model: str | None = None                  # None: the shipped tiny model
    data: str | None = None                   # JSONL; None: a generated suite
    data_split: str = "round_robin"           # JSONL: categories round-robin over clients, or one client per category
    suite: str = "bundled"                    # without data: "bundled", "rank", "real" or "facts" (see SUITES)
    target_modules: tuple[str, ...] = AUTO    # short names of the layers that get LoRA; ("auto",): discovered
    unseen_tasks: tuple[str, ...] = ()        # suite "real": hold out exactly these tasks (num_heldout of them)
    # --- local training and evaluation
    local_steps: int = 30
    batch_size: int = 8
    lr: float = 5e-3
    alpha: float = 16.0
    rslora: bool = False                      # rank-stabilised LoRA: scaling alpha / sqrt(r) instead of alpha / r
    max_length: int = 64
    eval_max_new_tokens: int = 16
    collapse_threshold: float = 0.9           # spectrum warning: share of ||dW||^2 at the smallest rank
    # --- rounds, checkpoints, faults
    min_clients: int = 1
    client_timeout_s: float | None = 60.0
    checkpoint_dir: str | None = None
    resume: bool = False
    overwrite: bool = False                   # start over an existing checkpoint (else refuse)
    keep_checkpoints: int = 3                 # round checkpoints kept in checkpoint_dir
    resume_round: int | None = None           # resume from this kept round's file (a known-good state)
    faults: dict[str, str] = field(default_factory=dict)   # client id -> fault (tests, demos, red team)
    threads: int | None = None
    progress: bool = True
    # --- reply limits (None: the decoder's defaults) and the round's memory budget
    max_reply_bytes: int | None = None
    max_header_bytes: int | None = None
    max_num_examples: int | None = None
    max_delta_norm: float | None = None
    max_round_bytes: int | None = None
    # --- defences (docs/security.md); all off by default
    clip_norm: float | None = None            # clip each client's effective update to this norm
    clip_adaptive: float | None = None        # ... or to this multiple of the round's median norm
    max_weight_share: float | None = None     # cap on any client's share of the aggregation weight
    trim_fraction: float = 0.0                # drop this fraction of clients farthest from the rest
    direction_trim: float = 0.0               # then drop this fraction whose change points away from the others'
    max_norm_growth: float | None = None      # a round whose global norm grows more is not committed
    # on by default: a round whose global norm grows more than this x the median accepted reply
    # norm is not committed (None: off); see server/federation/rounds.py
    sanity_ratio: float | None = 100.0

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "num_heldout", "heldout_examples", "local_steps", "batch_size",
                     "min_clients", "max_length", "eval_max_new_tokens"):
            _int(self, name)
        _int(self, "seed", 0)
        for name in ("lr", "alpha"):
            _positive(self, name)
        _positive(self, "client_timeout_s", optional=True)
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora must be a bool (True or False), got {self.rslora!r}")
        _choice(self, "strategy", sorted(STRATEGIES))
        _choice(self, "fedit_rank", ("min", "max"))
        _choice(self, "split", SPLITS)
        _choice(self, "rank_assignment", RANK_ASSIGNMENTS)
        _choice(self, "data_split", DATA_SPLITS)
        _choice(self, "suite", SUITES)
        if self.rank_assignment == "allot" and self.rank_distribution is None:
            raise ValueError("rank_assignment 'allot' needs a rank_distribution")
        if isinstance(self.target_modules, str) or not self.target_modules or not all(
                isinstance(t, str) and t.isidentifier() for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.unseen_tasks, str) or not all(isinstance(t, str) for t in self.unseen_tasks):
            raise ValueError(f"unseen_tasks must be a list of task names, got {self.unseen_tasks!r}")
        self.unseen_tasks = tuple(self.unseen_tasks)
        if self.unseen_tasks:
            if self.suite != "real" or self.data:
                raise ValueError("unseen_tasks chooses the real suite's unseen tasks: it needs suite 'real' "
                                 f"and no data (got suite {self.suite!r}, data {self.data!r})")
            from server.workloads.real_tasks import TASKS
            unknown = [t for t in self.unseen_tasks if t not in TASKS]
            if unknown:
                raise ValueError(f"unseen_tasks has unknown tasks {unknown}; known: {sorted(TASKS)}")
            if len(set(self.unseen_tasks)) != len(self.unseen_tasks):
                raise ValueError(f"unseen_tasks has duplicates: {list(self.unseen_tasks)}")
            if self.num_heldout != len(self.unseen_tasks):
                raise ValueError(f"unseen_tasks names {len(self.unseen_tasks)} tasks but num_heldout is "
                                 f"{self.num_heldout}; they must agree")
        if self.clients_per_round is not None:
            _int(self, "clients_per_round")
            if self.clients_per_round > self.num_clients:
                raise ValueError(f"clients_per_round must be in [1, num_clients={self.num_clients}], "
                                 f"got {self.clients_per_round}")
        if not (isinstance(self.collapse_threshold, (int, float)) and 0 < self.collapse_threshold <= 1):
            raise ValueError(f"collapse_threshold must be in (0, 1], got {self.collapse_threshold!r}")
        if self.resume_round is not None and (not self.resume or isinstance(self.resume_round, bool)
                                              or not isinstance(self.resume_round, int) or self.resume_round < 1):
            raise ValueError(f"resume_round must be an int >= 1 and needs resume, got {self.resume_round!r}")
        _positive(self, "sanity_ratio", optional=True)
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.carry and self.strategy != "flexlora":
            raise ValueError(f"carry is an option of strategy 'flexlora', not {self.strategy!r}")
        if self.device != "cpu" and self.strategy not in ("flexlora", "raflora"):
            raise ValueError(f"device {self.device!r}: only flexlora and raflora aggregate on a GPU, "
                             f"strategy {self.strategy!r} runs on the CPU")
        check_device(self.device)
        _int(self, "shards", 0)
        if self.shards:
            if self.strategy not in ("flexlora", "raflora"):
                raise ValueError(f"shards {self.shards}: only flexlora and raflora shard their aggregation, "
                                 f"not {self.strategy!r}")
            if self.device != "cpu":
                raise ValueError("shards and device 'cuda' exclude each other (each shard aggregates on the CPU)")
            from server.core.sharded import ray_available
            ok, why = ray_available()
            if not ok:
                raise ValueError(f"shards {self.shards}: {why}")
        from server.runtimes.faults import check_fault
        for cid, fault in dict(self.faults).items():
            check_fault(cid, fault)
        # StrategyConfig / RobustConfig / DecodeLimits validate the rest; fail here, before a model is loaded
        self.strategy_config(base_model=None, module_shapes=None)
        if self.max_norm_growth is not None and not (isinstance(self.max_norm_growth, (int, float))
                                                     and 1 < self.max_norm_growth < float("inf")):
            raise ValueError(f"max_norm_growth must be a finite number > 1, got {self.max_norm_growth!r}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) \
                or not 1 <= self.keep_checkpoints <= 1000:
            raise ValueError(f"keep_checkpoints must be an int in [1, 1000], got {self.keep_checkpoints!r}")

    # --- what the parts are built from
    def robust(self) -> RobustConfig:
        return RobustConfig(clip_norm=self.clip_norm, clip_adaptive=self.clip_adaptive,
                            max_weight_share=self.max_weight_share, trim_fraction=self.trim_fraction,
                            direction_trim=self.direction_trim)

    def decode_limits(self) -> DecodeLimits | None:
        """The reply decoder's bounds (None: its defaults)."""
        given = {"max_bytes": self.max_reply_bytes, "max_header_bytes": self.max_header_bytes,
                 "max_num_examples": self.max_num_examples, "max_delta_norm": self.max_delta_norm}
        given = {k: v for k, v in given.items() if v is not None}
        return DecodeLimits(**given) if given else None

    def strategy_config(self, *, base_model: str | None, module_shapes) -> StrategyConfig:
        return StrategyConfig(alpha=self.alpha, rslora=self.rslora, min_clients=self.min_clients,
                              base_model=base_model, module_shapes=module_shapes, seed=self.seed,
                              limits=self.decode_limits(), max_round_bytes=self.max_round_bytes, robust=self.robust())

    def identity(self) -> dict:
        """Fields a resumed run must share with the checkpoint it resumes (the fields added
        after checkpoints existed count only when set, so older checkpoints still resume)."""
        keep = ("strategy", "num_clients", "clients_per_round", "num_heldout", "seed", "rank_distribution",
                "fedit_rank", "model", "data", "local_steps", "batch_size", "lr", "alpha", "max_length",
                "target_modules", "split", "carry")
        out = {k: getattr(self, k) for k in keep}
        out["target_modules"] = list(self.target_modules)
        for name in ("rank_assignment", "data_split", "suite", "heldout_examples", "rslora", "unseen_tasks"):
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                out[name] = list(value) if isinstance(value, tuple) else value   # as JSON reads it back
        return out

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}

# The experiment grid's defaults (``flexlora experiment run``); only strategy, distribution and
# seed vary between its cells.
EXPERIMENT_DEFAULTS = dict(num_clients=16, rounds=6, local_steps=8, lr=1e-2, heldout_examples=16,
                           rank_assignment="allot", data_split="per_category",
                           target_modules=tuple(TARGET_MODULES), client_timeout_s=None, progress=False)


def experiment_settings(**overrides) -> RunConfig:
    """A ``RunConfig`` with the experiment grid's defaults; a cell sets strategy, rank
    distribution and seed (see :mod:`server.runtimes.experiments.config`)."""
    rank_distribution = overrides.pop("rank_distribution", "uniform")
    return RunConfig(**{**EXPERIMENT_DEFAULTS, "rank_distribution": rank_distribution, **overrides})
