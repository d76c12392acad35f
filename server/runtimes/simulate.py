"""The embedded runtime: a whole federation in one process (``flexlora simulate``).

Each round every sampled client is sent its rank-specific ``GlobalFactors`` (through the wire
encoding), trains locally, and replies with an encoded ``ClientUpdate``; the server decodes
and validates each reply against what it assigned (rejections are logged with their reason),
streams the valid ones into the strategy, evaluates the global model on the held-out clients,
and writes an atomic checkpoint. A client that does not reply within ``client_timeout_s`` is
dropped. Fewer than ``min_clients`` valid replies fail the run with the state of the last
completed round intact on disk.
"""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from edge_client.targets import AUTO, ffn_pattern_keys
from edge_client.trainer import LocalTrainer, TrainConfig
from edge_client.wire import DecodeLimits
from server.federation import ResumeError, RoundEngine
from server.federation.strategies import RobustConfig, RoundFailed, StrategyConfig, build_strategy
from server.runtimes.clients import InProcessClients
from server.runtimes.faults import check_fault
from server.workloads.devices import DEMO_RANKS, LLAMA_FFN_KEYS, assign_devices
from server.workloads.evaluate import Evaluator
from server.workloads.model import fingerprint, linear_shapes, load_base
from server.workloads.suite import Suite, SuiteConfig, build_suite, load_suite_from_jsonl

__all__ = ["SimulationConfig", "SimulationError", "run_simulation", "results_summary", "build_suite_for",
           "train_config_for", "strategy_for"]

log = logging.getLogger("flexlora.simulate")


class SimulationError(RuntimeError):
    """A run could not go on (e.g. a round below min_clients); the message says why."""


@dataclass(kw_only=True)
class SimulationConfig:
    strategy: str = "flexlora"
    rounds: int = 5
    num_clients: int = 20
    clients_per_round: int | None = None      # None: every client every round
    num_heldout: int = 4
    seed: int = 0
    rank_distribution: str | None = None      # workloads.json name; None: device mix + rank policy
    fedit_rank: str = "min"                   # FedIT's homogeneous rank: "min" or "max" of the federation
    model: str | None = None                  # None: the shipped tiny model
    data: str | None = None                   # JSONL; None: the bundled synthetic suite
    local_steps: int = 30
    batch_size: int = 8
    lr: float = 5e-3
    alpha: float = 16.0
    max_length: int = 64
    target_modules: tuple[str, ...] = AUTO   # short names of the layers that get LoRA; ("auto",): discovered
    min_clients: int = 1
    client_timeout_s: float | None = 60.0
    eval_max_new_tokens: int = 16
    checkpoint_dir: str | None = None
    resume: bool = False
    faults: dict[str, str] = field(default_factory=dict)   # client id -> fault (tests, demos)
    threads: int | None = None
    progress: bool = True
    limits: DecodeLimits | None = None        # reply decoder bounds (None: DecodeLimits() defaults)
    max_round_bytes: int | None = None        # per-round aggregator memory budget (None: none)
    # defences (docs/security.md); all off by default
    clip_norm: float | None = None            # clip each client's effective update to this norm
    clip_adaptive: float | None = None        # ... or to this multiple of the round's median norm
    max_weight_share: float | None = None     # cap on any client's share of the aggregation weight
    trim_fraction: float = 0.0                # drop this fraction of clients farthest from the rest
    max_norm_growth: float | None = None      # a round whose global norm grows more is not committed
    keep_checkpoints: int = 3                 # round checkpoints kept in checkpoint_dir
    # on by default: a round whose global norm grows more than this x the median accepted reply
    # norm is not committed (None: off); see server/federation/rounds.py
    sanity_ratio: float | None = 100.0
    resume_round: int | None = None           # resume from this kept round's file (a known-good state)
    overwrite: bool = False                   # start over an existing checkpoint (else refuse)
    split: str = "reference"                  # FlexLoRA/raFLoRA factor split: official "reference" or "balanced"
    carry: bool = False                       # FlexLoRA with carry (strategy "flexlora" only)

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "local_steps", "batch_size", "min_clients", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.target_modules, str) or not self.target_modules or not all(
                isinstance(t, str) and t.isidentifier() for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"clients_per_round must be in [1, num_clients={self.num_clients}], "
                             f"got {self.clients_per_round}")
        if self.fedit_rank not in ("min", "max"):
            raise ValueError(f"fedit_rank must be 'min' or 'max', got {self.fedit_rank!r}")
        if self.client_timeout_s is not None and not self.client_timeout_s > 0:
            raise ValueError(f"client_timeout_s must be > 0, got {self.client_timeout_s!r}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir")
        for cid, fault in self.faults.items():
            check_fault(cid, fault)
        if self.split not in ("reference", "balanced"):
            raise ValueError(f"split must be 'reference' or 'balanced', got {self.split!r}")
        if self.carry and self.strategy != "flexlora":
            raise ValueError(f"carry is an option of strategy 'flexlora', not {self.strategy!r}")
        # StrategyConfig / RobustConfig / RoundEngine validate them; fail here, before a model is loaded
        StrategyConfig(limits=self.limits, max_round_bytes=self.max_round_bytes, robust=self.robust())
        if self.max_norm_growth is not None and not (isinstance(self.max_norm_growth, (int, float))
                                                     and 1 < self.max_norm_growth < float("inf")):
            raise ValueError(f"max_norm_growth must be a finite number > 1, got {self.max_norm_growth!r}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) \
                or not 1 <= self.keep_checkpoints <= 1000:
            raise ValueError(f"keep_checkpoints must be an int in [1, 1000], got {self.keep_checkpoints!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.resume_round is not None and (not self.resume or isinstance(self.resume_round, bool)
                                              or not isinstance(self.resume_round, int) or self.resume_round < 1):
            raise ValueError(f"resume_round must be an int >= 1 and needs resume, got {self.resume_round!r}")

    def robust(self) -> RobustConfig:
        return RobustConfig(clip_norm=self.clip_norm, clip_adaptive=self.clip_adaptive,
                            max_weight_share=self.max_weight_share, trim_fraction=self.trim_fraction)

    def identity(self) -> dict:
        """Fields a resumed run must share with the checkpoint it resumes."""
        keep = ("strategy", "num_clients", "clients_per_round", "num_heldout", "seed", "rank_distribution",
                "fedit_rank", "model", "data", "local_steps", "batch_size", "lr", "alpha", "max_length",
                "target_modules", "split", "carry")
        out = {k: getattr(self, k) for k in keep}
        out["target_modules"] = list(self.target_modules)
        return out


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so setup garbage does not count as server RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: VmHWM) so later peaks exclude the setup."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _progress(cfg: SimulationConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return lambda orders, rnd: tqdm(orders, desc=f"round {rnd}/{cfg.rounds}", unit="client", file=sys.stderr,
                                    leave=False)


def build_suite_for(cfg: SimulationConfig) -> Suite:
    """The suite (training and held-out clients) a run with ``cfg`` uses."""
    if cfg.data:
        return load_suite_from_jsonl(cfg.data, num_clients=cfg.num_clients, num_heldout=cfg.num_heldout,
                                     seed=cfg.seed)
    return build_suite(SuiteConfig(num_clients=cfg.num_clients, num_heldout=cfg.num_heldout, seed=cfg.seed))


def _capped_ranks(shapes) -> dict[int, int]:
    """Client types' ranks capped at the smallest targeted module's size (tiny test models)."""
    cap = min(min(s) for s in shapes.values())
    return {r: min(r, cap) for r in (8, 30, 200)}


def train_config_for(cfg: SimulationConfig) -> TrainConfig:
    return TrainConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, alpha=cfg.alpha,
                       max_length=cfg.max_length, target_modules=tuple(cfg.target_modules))


def strategy_for(cfg: SimulationConfig, specs, *, base_model: str, module_shapes) -> object:
    scfg = StrategyConfig(alpha=cfg.alpha, min_clients=cfg.min_clients, base_model=base_model,
                          module_shapes=module_shapes, seed=cfg.seed, limits=cfg.limits,
                          max_round_bytes=cfg.max_round_bytes, robust=cfg.robust())
    return build_strategy(cfg.strategy, scfg, specs=specs, fedit_rank=cfg.fedit_rank, split=cfg.split,
                          carry=cfg.carry)


def run_simulation(cfg: SimulationConfig, *, stop_after: int | None = None) -> dict:
    """Run (or resume) the federation; returns the results document (also what --json prints).

    ``stop_after`` ends the run after that many rounds of this invocation (tests).
    """
    import torch

    t0 = time.perf_counter()
    # The shipped tiny model trains fastest on one thread (tiny matmuls); the native
    # aggregation core keeps its own thread setting.
    threads = cfg.threads or (1 if cfg.model is None else None)
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_base(cfg.model)
    base_model = fingerprint(model)
    base_state = copy.deepcopy(model.state_dict())
    suite = build_suite_for(cfg)
    clients = {c.client_id: c for c in suite.train}
    unknown = sorted(set(cfg.faults) - set(clients))
    if unknown:
        raise ValueError(f"--fault names unknown clients {unknown[:5]}; the clients are "
                         f"{sorted(clients)[0]} .. {sorted(clients)[-1]}")
    devices = {d.client_id: d for d in assign_devices(
        list(clients), seed=cfg.seed, rank_distribution=cfg.rank_distribution,
        rank_map=DEMO_RANKS if cfg.model is None else _capped_ranks(linear_shapes(model, cfg.target_modules)),
        ffn_keys=LLAMA_FFN_KEYS if cfg.model is None else ffn_pattern_keys(model, cfg.target_modules))}
    specs = {cid: d.spec for cid, d in devices.items()}
    strategy = strategy_for(cfg, specs.values(), base_model=base_model,
                            module_shapes=linear_shapes(model, cfg.target_modules))
    evaluator = Evaluator(copy.deepcopy(model), tokenizer, base_state, suite.heldout_examples(),
                          max_new_tokens=cfg.eval_max_new_tokens)
    trainer = LocalTrainer(model, tokenizer, config=train_config_for(cfg), base_model_id=base_model)
    with InProcessClients(trainer, {cid: c.examples for cid, c in clients.items()}, base_state=base_state,
                          timeout_s=cfg.client_timeout_s, faults=cfg.faults, progress=_progress(cfg)) as transport:
        engine = RoundEngine(strategy, specs, seed=cfg.seed, clients_per_round=cfg.clients_per_round,
                             evaluate=lambda s: evaluator(s.global_delta()), checkpoint_dir=cfg.checkpoint_dir,
                             identity=cfg.identity(), base_model=base_model, runtime_state=transport,
                             runtime="embedded", logger=log, max_norm_growth=cfg.max_norm_growth,
                             overwrite=cfg.overwrite, keep_checkpoints=cfg.keep_checkpoints,
                             sanity_ratio=cfg.sanity_ratio)
        try:
            resumed = bool(cfg.resume and engine.restore(cfg.resume_round))
            engine.start()
        except ResumeError as exc:
            engine.close()
            raise SimulationError(f"--{exc}") from None
        except BaseException:
            engine.close()
            raise
        setup_peak = _peak_rss_bytes()
        _release_free_memory()
        reset = _reset_peak_rss()
        try:
            engine.run(transport, cfg.rounds, stop_after=stop_after)
        except RoundFailed as exc:
            raise SimulationError(str(exc)) from None
        finally:
            engine.close()
    return {
        "strategy": cfg.strategy, "config": asdict(cfg), "base_model": base_model,
        "base": engine.base, "rounds": engine.history, "rounds_completed": engine.round, "resumed": resumed,
        "devices": [d.to_json() for d in devices.values()],
        "heldout_examples": len(suite.heldout_examples()),
        "heldout_families": [c.families for c in suite.heldout],
        # ru_maxrss is reset with VmHWM on Linux, hence the max with the setup's peak
        "peak_rss_bytes": max(setup_peak, _peak_rss_bytes()), "setup_peak_rss_bytes": setup_peak,
        # peak RSS while rounds ran (server + simulated clients), setup (model load, rank policy) excluded
        "rounds_peak_rss_bytes": _vm_hwm_bytes() if reset else None,
        "wall_s": time.perf_counter() - t0,
    }


def results_summary(doc: Mapping) -> str:
    """The human-readable closing summary."""
    lines = [f"strategy {doc['strategy']}: {doc['rounds_completed']} rounds, "
             f"{len(doc['devices'])} clients, {doc['heldout_examples']} held-out examples "
             f"(families {', '.join('+'.join(f) for f in doc['heldout_families'])})"]
    counts: dict[str, int] = {}
    for d in doc["devices"]:
        key = f"{d['device']} -> {d['client_type']} (rank {d['rank']})"
        counts[key] = counts.get(key, 0) + 1
    lines.append("devices and ranks: " + "; ".join(f"{n} x {k}" for k, n in sorted(counts.items())))
    lines.append(f"{'round':>5}  {'rougeL':>7}  {'exact':>6}  {'ho_loss':>7}  {'clients':>7}  {'rejected':>8}  "
                 f"{'train_loss':>10}  {'agg_s':>7}  {'train_s':>7}")
    b = doc["base"]
    if b:
        lines.append(f"{'base':>5}  {b['rougeL']:7.4f}  {b['exact_match']:6.3f}  "
                     f"{b.get('heldout_loss', float('nan')):7.4f}")
    for r in doc["rounds"]:
        lines.append(f"{r['round']:>5}  {r['rougeL']:7.4f}  {r['exact_match']:6.3f}  "
                     f"{r.get('heldout_loss', float('nan')):7.4f}  {r['clients']:>7}  "
                     f"{len(r['rejected']):>8}  {r.get('train_loss', float('nan')):10.4f}  "
                     f"{r['aggregation_s']:7.3f}  {r['train_s']:7.1f}")
    rounds_peak = doc.get("rounds_peak_rss_bytes")
    during = f", {rounds_peak / 2**20:.0f} MiB during the rounds" if rounds_peak else ""
    agg = sum(r["aggregation_s"] for r in doc["rounds"])
    lines.append(f"server aggregation {agg:.3f} s in total; peak RSS {doc['peak_rss_bytes'] / 2**20:.0f} MiB"
                 f" (setup: model, rank policy){during}; wall {doc['wall_s']:.1f} s")
    if doc["rounds"] and b:
        last = doc["rounds"][-1]["rougeL"]
        lines.append(f"held-out Rouge-L {b['rougeL']:.4f} (base) -> {last:.4f} after round "
                     f"{doc['rounds'][-1]['round']} ({last - b['rougeL']:+.4f})")
    return "\n".join(lines)
