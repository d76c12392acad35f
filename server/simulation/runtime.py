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
import random
import resource
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_client.update import DecodeLimits, decode_global, encode_global, encode_update

from ..strategies import RankSpec, RoundFailed, StrategyConfig, make_strategy
from .checkpoint import load_checkpoint, save_checkpoint
from .devices import DEMO_RANKS, assign_devices
from .evaluate import evaluate
from .faults import FAULTS, faulty_reply
from .local_train import TrainConfig, train_client
from .model import TARGET_MODULES, apply_delta, fingerprint, linear_shapes, load_base
from .suite import SuiteConfig, build_suite, load_suite_from_jsonl

__all__ = ["SimulationConfig", "SimulationError", "run_simulation"]

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

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "local_steps", "batch_size", "min_clients", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
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
            if fault not in FAULTS:
                raise ValueError(f"faults[{cid!r}]={fault!r} is not one of {FAULTS}")
        # StrategyConfig validates them; fail here, before a model is loaded
        StrategyConfig(limits=self.limits, max_round_bytes=self.max_round_bytes)

    def identity(self) -> dict:
        """Fields a resumed run must share with the checkpoint it resumes."""
        keep = ("strategy", "num_clients", "clients_per_round", "num_heldout", "seed", "rank_distribution",
                "fedit_rank", "model", "data", "local_steps", "batch_size", "lr", "alpha", "max_length")
        return {k: getattr(self, k) for k in keep}


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


def check_reply_identity(update, *, client_id: str, round: int) -> None:
    """A reply must come from the client it was asked of, for the round it was asked in."""
    if update.client_id != client_id:
        raise ValueError(f"reply from client {client_id!r} says client {update.client_id!r}")
    if update.round != round:
        raise ValueError(f"reply from client {client_id!r} is for round {update.round}, expected {round}")


def reject_reason(exc: BaseException) -> str:
    """The logged reason a reply was rejected: a ValueError's message, else the error's type too
    (an unexpected error while decoding or adding one reply rejects that reply, not the run)."""
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__} while handling the reply: {exc}"


def sample_clients(rng: random.Random, ids: list[str], k: int | None) -> list[str]:
    """The round's clients: all (``k`` None) or ``k`` drawn by ``rng`` from the sorted ``ids``, sorted.
    Both runtimes sample with this rule and a ``random.Random(f"runtime-{seed}")``."""
    ids = sorted(ids)
    return ids if k is None else sorted(rng.sample(ids, k))


def _client_seed(seed: int, round: int, index: int) -> int:
    return (seed * 1_000_003 + round * 10_007 + index) % (2**31)


class _Federation:
    """Everything one run holds: data, devices, model, strategy, history."""

    def __init__(self, cfg: SimulationConfig) -> None:
        import torch

        self.cfg = cfg
        # The shipped tiny model trains fastest on one thread (tiny matmuls); the native
        # aggregation core keeps its own thread setting.
        threads = cfg.threads or (1 if cfg.model is None else None)
        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_base(cfg.model)
        self.fingerprint = fingerprint(self.model)
        self.base_state = copy.deepcopy(self.model.state_dict())
        self.eval_model = copy.deepcopy(self.model)
        if cfg.data:
            self.suite = load_suite_from_jsonl(cfg.data, num_clients=cfg.num_clients,
                                               num_heldout=cfg.num_heldout, seed=cfg.seed)
        else:
            self.suite = build_suite(SuiteConfig(num_clients=cfg.num_clients, num_heldout=cfg.num_heldout,
                                                 seed=cfg.seed))
        self.clients = {c.client_id: c for c in self.suite.train}
        rank_map = DEMO_RANKS if cfg.model is None else None
        self.devices = {d.client_id: d for d in assign_devices(
            list(self.clients), seed=cfg.seed, rank_distribution=cfg.rank_distribution, rank_map=rank_map)}
        scfg = StrategyConfig(alpha=cfg.alpha, min_clients=cfg.min_clients, base_model=self.fingerprint,
                              module_shapes=linear_shapes(self.model, TARGET_MODULES), seed=cfg.seed,
                              limits=cfg.limits, max_round_bytes=cfg.max_round_bytes)
        options = {}
        if cfg.strategy == "fedit":
            ranks = [d.spec.module_rank("x.q_proj") for d in self.devices.values()]
            options["rank"] = min(ranks) if cfg.fedit_rank == "min" else max(
                d.spec.max_rank() for d in self.devices.values())
        self.strategy = make_strategy(cfg.strategy, scfg, **options)
        self.train_cfg = TrainConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                     alpha=cfg.alpha, max_length=cfg.max_length, target_modules=TARGET_MODULES)
        self.rng = random.Random(f"runtime-{cfg.seed}")
        self.client_delta: dict[str, np.ndarray] = {}   # FLoRA: what clients merged into their base
        self.history: list[dict] = []
        self.round = 0

    # --- state -------------------------------------------------------------------------
    def save(self) -> None:
        if not self.cfg.checkpoint_dir:
            return
        rng_state = self.rng.getstate()
        meta = {"round": self.round, "config": self.cfg.identity(), "strategy": self.strategy.state_meta(),
                "rng": [rng_state[0], list(rng_state[1]), rng_state[2]], "history": self.history,
                "base_model": self.fingerprint}
        save_checkpoint(self.cfg.checkpoint_dir, meta=meta, strategy_tensors=self.strategy.state_tensors(),
                        runtime_tensors={f"client_delta.{k}": v for k, v in self.client_delta.items()})

    def restore(self) -> bool:
        ck = load_checkpoint(self.cfg.checkpoint_dir)
        if ck is None:
            return False
        mine, theirs = self.cfg.identity(), ck.meta["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise SimulationError(f"--resume: checkpoint in {self.cfg.checkpoint_dir} was made with other "
                                  f"settings (checkpoint, now): {diff}")
        if ck.meta["base_model"] != self.fingerprint:
            raise SimulationError("--resume: checkpoint was made with another base model")
        self.strategy.load_state(ck.strategy_tensors, ck.meta["strategy"])
        version, internal, gauss = ck.meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.history = list(ck.meta["history"])
        self.round = int(ck.meta["round"])
        self.client_delta = {k[len("client_delta."):]: v for k, v in ck.runtime_tensors.items()}
        return True

    # --- one client --------------------------------------------------------------------
    def _run_client(self, cid: str, spec: RankSpec, wire, round: int, index: int, cancel: threading.Event):
        fault = self.cfg.faults.get(cid)
        if fault == "straggler":
            cancel.wait()           # never answers; released when the server gives up
            return None
        init = decode_global(wire) if wire is not None else None
        update = train_client(self.model, self.tokenizer, client_id=cid, examples=self.clients[cid].examples,
                              spec=spec, init=init, config=self.train_cfg,
                              seed=_client_seed(self.cfg.seed, round, index), base_model=self.fingerprint,
                              round=round)
        return faulty_reply(update, fault) if fault else encode_update(update)

    def _set_train_base(self) -> None:
        apply_delta(self.model, self.base_state, self.client_delta)

    # --- one round ---------------------------------------------------------------------
    def run_round(self, round: int, pool: ThreadPoolExecutor) -> dict:
        cfg = self.cfg
        ids = sample_clients(self.rng, list(self.clients), cfg.clients_per_round)
        agg = self.strategy.begin_round(round)
        rejected: dict[str, str] = {}
        assigned = {cid: self.strategy.assign_rank(self.devices[cid].spec) for cid in ids}
        merged = False
        self._set_train_base()
        bar = _progress(ids, round, cfg)
        t_round = time.perf_counter()
        for index, cid in enumerate(bar):
            spec = assigned[cid]
            msg = self.strategy.configure(client_id=cid, spec=spec, round=round)
            if msg is not None and msg.merge_into_base and not merged:
                # FLoRA: every client receives the same stack and merges it into its base weights
                for module in msg.modules():
                    a, b = msg.factors[module + ".lora_A.weight"], msg.factors[module + ".lora_B.weight"]
                    d = msg.module_scaling(module) * (b @ a)
                    self.client_delta[module] = self.client_delta.get(module, 0) + d
                self._set_train_base()
                merged = True
            wire = encode_global(msg) if msg is not None else None
            cancel = threading.Event()
            future = pool.submit(self._run_client, cid, spec, wire, round, ids.index(cid), cancel)
            try:
                reply = future.result(timeout=cfg.client_timeout_s)
            except FutureTimeout:
                cancel.set()
                future.result()  # a simulated straggler returns at once when cancelled
                rejected[cid] = f"no reply within {cfg.client_timeout_s:g} s; dropped"
                log.warning("round %d: client %s dropped: %s", round, cid, rejected[cid])
                continue
            try:
                update = self.strategy.decode_reply(reply, spec=spec)
                check_reply_identity(update, client_id=cid, round=round)
                agg.add(update)
            except Exception as exc:  # noqa: BLE001 - one client's reply never ends the run
                rejected[cid] = reject_reason(exc)
                log.warning("round %d: reply from %s rejected: %s", round, cid, rejected[cid])
        train_s = time.perf_counter() - t_round
        try:
            result = agg.finalize()
        except RoundFailed as exc:
            raise SimulationError(f"{exc} (rejected: {rejected})") from None
        t_eval = time.perf_counter()
        scores = self.evaluate()
        return {"round": round, **scores, "aggregation_s": result.aggregation_s, "clients": result.num_clients,
                "ranks": result.ranks, "rejected": rejected, "train_s": train_s,
                "eval_s": time.perf_counter() - t_eval, **result.metrics}

    def evaluate(self) -> dict[str, float]:
        apply_delta(self.eval_model, self.base_state, self.strategy.global_delta())
        return evaluate(self.eval_model, self.tokenizer, self.suite.heldout_examples(),
                        max_new_tokens=self.cfg.eval_max_new_tokens)


def _progress(ids, round: int, cfg: SimulationConfig):
    if not cfg.progress:
        return ids
    from tqdm import tqdm

    return tqdm(ids, desc=f"round {round}/{cfg.rounds}", unit="client", file=sys.stderr, leave=False)


def run_simulation(cfg: SimulationConfig, *, stop_after: int | None = None) -> dict:
    """Run (or resume) the federation; returns the results document (also what --json prints).

    ``stop_after`` ends the run after that many rounds of this invocation (tests).
    """
    t0 = time.perf_counter()
    fed = _Federation(cfg)
    resumed = bool(cfg.resume and fed.restore())
    if fed.history and "base" in fed.history[0]:
        base = fed.history[0]["base"]
    else:
        base = fed.evaluate() if not resumed else {}
    if not resumed or not fed.history:
        fed.history = [{"base": base}]
    setup_peak = _peak_rss_bytes()
    _release_free_memory()
    reset = _reset_peak_rss()
    done_now = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="client") as pool:
        for rnd in range(fed.round + 1, cfg.rounds + 1):
            if stop_after is not None and done_now >= stop_after:
                break
            entry = fed.run_round(rnd, pool)
            fed.history.append(entry)
            fed.round = rnd
            fed.save()
            done_now += 1
            log.info("round %d: rougeL %.4f exact %.4f agg %.3fs", rnd, entry["rougeL"], entry["exact_match"],
                     entry["aggregation_s"])
    rounds = fed.history[1:]
    return {
        "strategy": cfg.strategy, "config": asdict(cfg), "base_model": fed.fingerprint,
        "base": fed.history[0]["base"], "rounds": rounds, "rounds_completed": fed.round, "resumed": resumed,
        "devices": [d.to_json() for d in fed.devices.values()],
        "heldout_examples": len(fed.suite.heldout_examples()),
        "heldout_families": [c.families for c in fed.suite.heldout],
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
    lines.append(f"{'round':>5}  {'rougeL':>7}  {'exact':>6}  {'clients':>7}  {'rejected':>8}  "
                 f"{'train_loss':>10}  {'agg_s':>7}  {'train_s':>7}")
    b = doc["base"]
    if b:
        lines.append(f"{'base':>5}  {b['rougeL']:7.4f}  {b['exact_match']:6.3f}")
    for r in doc["rounds"]:
        lines.append(f"{r['round']:>5}  {r['rougeL']:7.4f}  {r['exact_match']:6.3f}  {r['clients']:>7}  "
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
