"""The interface every federated LoRA strategy implements, and what runtimes rely on.

A strategy owns the global adapter state. Each round a runtime (the embedded simulation in
``server.runtimes.simulate`` or a Flower ``Strategy`` wrapper) does::

    spec = strategy.assign_rank(RankSpec(rank=r, rank_pattern=p))   # what the client trains at
    msg  = strategy.configure(client_id=cid, spec=spec, round=t)     # GlobalFactors or None
    ... send ``encode_global(msg)`` (None: the client starts a fresh adapter) ...
    agg  = strategy.begin_round(t)
    for data in replies:                                             # streamed, any order
        upd = strategy.decode_reply(data, spec=assigned[cid])        # ValueError: reject
        agg.add(upd)
    result = agg.finalize()           # RoundFailed below min_clients; state untouched then

``finalize`` is the only place the strategy's state changes, so a failed or abandoned round
never corrupts it. ``state_tensors`` / ``state_meta`` / ``load_state`` round-trip the state
through safetensors + JSON for checkpoints (never pickle). ``global_delta`` gives the global
model's weight change per module (peft module path -> dW, d_out x d_in) for evaluation.
"""

from __future__ import annotations

import copy
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edge_client.wire import (
    ClientUpdate,
    DecodeLimits,
    GlobalFactors,
    RankSpec,
    decode_update,
    factor_keys,
    join_factors,
    scaling,
    split_factors,
)
from server.federation.strategies.robust import (
    RobustConfig,
    change_of,
    class_report,
    clip_multipliers,
    clip_multipliers_by_class,
    effective_norms,
    effective_rank,
    inner_products,
    slot_view_scale,
    trim_by_class,
    trim_by_direction,
    weigh_slots,
)
from server.federation.strategies.robust import cap_shares as _cap_shares

__all__ = ["RankSpec", "RobustConfig", "StrategyConfig", "RoundFailed", "RoundResult", "RoundAggregation",
           "Strategy", "FactorStrategy", "factor_keys", "split_factors", "join_factors"]


class RoundFailed(RuntimeError):
    """A round could not be aggregated (e.g. fewer than ``min_clients`` valid replies)."""


@dataclass(kw_only=True)
class StrategyConfig:
    alpha: float = 16.0              # alpha of the factors the server sends
    rslora: bool = False
    min_clients: int = 1             # valid replies a round needs
    base_model: str | None = None    # fingerprint replies must carry (None: not checked)
    module_shapes: Mapping[str, tuple[int, int]] | None = None   # module -> (d_out, d_in); None: not checked
    seed: int = 0
    limits: DecodeLimits | None = None   # decoder bounds for replies (None: DecodeLimits() defaults)
    # per-round aggregator memory budget, the one memory setting of a round (None: no budget).
    # FlexLoRA on method "auto"/"sketch" (without robust buffering) hands it to its Aggregator as
    # max_state_bytes: modules whose dense state would not fit go to the one-pass sketch route,
    # sized to use the budget, and no reply is refused for memory (only when even the smallest
    # sketches cannot fit). Other strategies: bytes the round's aggregator holds plus the next
    # update's factor bytes must not exceed it, else that reply is rejected.
    max_round_bytes: int | None = None
    # robust aggregation (clipping, weight-share cap, trimming; see .robust); None: off
    robust: RobustConfig | None = None

    def __post_init__(self) -> None:
        if self.robust is not None and not isinstance(self.robust, RobustConfig):
            raise ValueError(f"robust must be a RobustConfig or None, got {type(self.robust).__name__}")
        if self.limits is not None and not isinstance(self.limits, DecodeLimits):
            raise ValueError(f"limits must be a DecodeLimits or None, got {type(self.limits).__name__}")
        if self.max_round_bytes is not None and (isinstance(self.max_round_bytes, bool)
                                                 or not isinstance(self.max_round_bytes, int)
                                                 or self.max_round_bytes < 1):
            raise ValueError(f"max_round_bytes must be an int >= 1 or None, got {self.max_round_bytes!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ValueError(f"min_clients must be an int >= 1, got {self.min_clients!r}")


@dataclass(kw_only=True)
class RoundResult:
    round: int
    num_clients: int
    total_examples: int
    aggregation_s: float
    client_ids: list[str]
    ranks: dict[str, str]            # client id -> rank label
    metrics: dict[str, float] = field(default_factory=dict)


class RoundAggregation(ABC):
    """One round's streaming aggregation; ``finalize`` commits into the strategy."""

    def __init__(self, strategy: "Strategy", round: int) -> None:
        self.strategy = strategy
        self.round = round
        self.client_ids: list[str] = []
        self.ranks: dict[str, str] = {}
        self.total_examples = 0
        self.seconds = 0.0              # server time spent in add() and finalize()
        self._losses: list[tuple[float, int]] = []
        self._done = False
        self._factor_bytes = 0          # factor bytes of the updates added so far
        robust = strategy.config.robust
        # with robust aggregation on, valid updates wait here until finalize (see .robust)
        self._pending: list[ClientUpdate] | None = [] if robust is not None and robust.enabled else None
        self.robust_report: dict = {}
        self._sent_cache: dict[str, dict | None] = {}   # client -> what it was sent, factored (robust statistics)
        self._change_mult: dict[str, float] = {}       # clipped clients' multiplier on their change (_clip)
        # True when this round's aggregator keeps itself within max_round_bytes (it chooses
        # routes and sketch sizes by it): add() then refuses no reply for memory itself
        self.budget_in_aggregator = False

    def held_bytes(self) -> int:
        """Bytes the aggregator holds now (default: every added update's factors, an upper
        bound for strategies that accumulate; strategies that know better override it)."""
        return self._factor_bytes

    def add(self, update: ClientUpdate) -> None:
        if self._done:
            raise RuntimeError("round already finalized")
        if update.client_id in self.ranks:
            raise ValueError(f"client {update.client_id!r} already replied in round {self.round}")
        new = int(sum(np.asarray(v).nbytes for v in update.factors.values()))
        budget = self.strategy.config.max_round_bytes
        if budget is not None and not self.budget_in_aggregator:
            held = int(self.held_bytes())
            if held + new > budget:
                raise ValueError(f"client {update.client_id!r}: round {self.round} aggregator holds {held} bytes, "
                                 f"this update's factors add {new}, above max_round_bytes={budget}")
        t0 = time.perf_counter()
        if self._pending is not None:
            self._pending.append(update)
        else:
            self._add(update)   # each strategy's _add is atomic: it raises before it mutates
        self.seconds += time.perf_counter() - t0
        self._factor_bytes += new
        self.client_ids.append(update.client_id)
        self.ranks[update.client_id] = RankSpec(rank=update.rank, rank_pattern=update.rank_pattern).label()
        self.total_examples += update.num_examples
        if "train_loss" in update.metrics:
            self._losses.append((float(update.metrics["train_loss"]), update.num_examples))

    def finalize(self) -> RoundResult:
        if self._done:
            raise RuntimeError("round already finalized")
        need = self.strategy.config.min_clients
        if len(self.client_ids) < need:
            raise RoundFailed(f"round {self.round}: {len(self.client_ids)} valid replies, "
                              f"min_clients={need}; global state left unchanged")
        t0 = time.perf_counter()
        if self._pending is not None:
            self._add_robustly(self._pending)
        self._finalize()
        self.seconds += time.perf_counter() - t0
        self._done = True
        self.strategy.rounds_completed = self.round
        metrics = {}
        if self._losses:
            n = sum(w for _, w in self._losses)
            metrics["train_loss"] = sum(l * w for l, w in self._losses) / n
        return RoundResult(round=self.round, num_clients=len(self.client_ids),
                           total_examples=self.total_examples, aggregation_s=self.seconds,
                           client_ids=list(self.client_ids), ranks=dict(self.ranks), metrics=metrics)

    def _add_robustly(self, updates: list[ClientUpdate]) -> None:
        """Trim, clip and cap the buffered updates (settings in ``config.robust``), then add them.

        Every statistic is on what the strategy will actually aggregate (issue 21, class 5):
        :meth:`_views` gives, per client, its contribution per unit of weight (plain FlexLoRA:
        ``s B A``; raFLoRA: ``s B diag(share_i / share_1) A`` with its per-slot shares; carry:
        the change ``s B A - T_r(G)``, since ``G_{t+1} = G_t + sum_k p_k Delta_k``) and what it
        changed against what it was sent; :meth:`_clip` bounds that contribution and
        :meth:`_cap` the weight the strategy will give it."""
        cfg = self.strategy.config.robust
        factored = [{m: (u.module_scaling(m), *u.pair(m)) for m in u.modules()} for u in updates]
        # like with like: rank classes (alpha / r makes low-rank updates larger), and what each
        # client changed (its reply minus what it was sent) for the distances
        classes = [RankSpec(rank=u.rank, rank_pattern=u.rank_pattern).label() for u in updates]
        ranks = [effective_rank(f) for f in factored]   # where a class is too small for its own median
        keep = list(range(len(updates)))
        report: dict = {}
        trim = cfg.trim_fraction > 0 or cfg.direction_trim > 0
        if trim and len(updates) > 1:
            _contrib, changes = self._views(updates, factored)
            gram = inner_products(changes)
            if cfg.trim_fraction > 0:
                keep = trim_by_class(gram, cfg.trim_fraction, classes, ranks)
            if cfg.direction_trim > 0:
                keep = trim_by_direction(gram, cfg.direction_trim, among=keep)
            report["trimmed"] = [updates[i].client_id for i in range(len(updates)) if i not in keep]
        kept = [updates[i] for i in keep]
        mult = np.ones(len(kept))
        if cfg.clip_norm is not None or cfg.clip_adaptive is not None:
            contrib, _changes = self._views(kept, [factored[i] for i in keep], need_changes=False)
            norms = effective_norms(contrib)
            mult = clip_multipliers(norms, clip_norm=cfg.clip_norm)
            if cfg.clip_adaptive is not None:
                # the per-class bound on the client's own scale (raFLoRA's slot weights divided out)
                own = norms / self._view_scales(kept, [factored[i] for i in keep])
                mult = np.minimum(mult, clip_multipliers_by_class(
                    own, [classes[i] for i in keep], clip_adaptive=cfg.clip_adaptive,
                    eff_ranks=[ranks[i] for i in keep]))
            report["clipped"] = [u.client_id for u, c in zip(kept, mult) if c < 1]
        weights, capped_ids = self._cap(kept, cfg.max_weight_share)
        if cfg.max_weight_share is not None:
            report["capped"] = capped_ids
        for u, c, w in zip(kept, mult, weights):
            v = copy.copy(u)
            if c < 1 or w != u.num_examples:
                v.num_examples = int(w)
            if c < 1:
                v = self._clip(v, float(c))
            try:
                self._add(v)
            except Exception as exc:  # noqa: BLE001 - one update never ends the round
                report.setdefault("failed", {})[u.client_id] = str(exc)
        report["by_rank"] = class_report(classes, report, [u.client_id for u in updates])
        logging.getLogger("flexlora.robust").info("round %d: robust aggregation %s", self.round, report)
        self.robust_report = report

    # --- what the defences measure and bound: each strategy's actual contribution ----------
    def _slot_weights(self, updates: list[ClientUpdate]) -> list[dict[str, np.ndarray]] | None:
        """Per client and module, the multiplier of each rank slot relative to the client's
        weight, when the strategy weighs slots differently (raFLoRA); None: every slot 1."""
        return None

    def _view_scales(self, updates: list[ClientUpdate], factored: list) -> np.ndarray:
        """Per client, how much :meth:`_views` scales its contribution beyond its own change
        (:func:`robust.slot_view_scale` of its slot weights; 1 when the strategy has none)."""
        slots = self._slot_weights(updates)
        if slots is None:
            return np.ones(len(updates))
        return np.array([slot_view_scale(f, sl) for f, sl in zip(factored, slots)])

    def _views(self, updates: list[ClientUpdate], factored: list, *, need_changes: bool = True) -> tuple[list, list]:
        """Per client: what it contributes per unit of weight, and what it changed (its
        contribution minus the same of what it was sent), both factored."""
        slots = self._slot_weights(updates)
        if slots is not None:
            factored = [weigh_slots(f, sl) for f, sl in zip(factored, slots)]
        if not need_changes and not self._clips_change():
            return factored, []
        sent = [self._sent_cached(u) for u in updates]
        if slots is not None:
            sent = [None if x is None else weigh_slots(x, sl) for x, sl in zip(sent, slots)]
        changes = [change_of(f, x) for f, x in zip(factored, sent)]
        return (changes if self._clips_change() else factored), changes

    def _clips_change(self) -> bool:
        """True when the strategy keeps what it sent and adds each client's change (carry):
        clipping then bounds the change, not the reply."""
        return False

    def _clip(self, update: ClientUpdate, c: float) -> ClientUpdate:
        """``update`` with its contribution scaled by ``c``: when the strategy clips the change,
        ``c`` is recorded for its ``_add``/``_finalize`` to form ``sent + c Delta`` (see
        ``_change_mult``); otherwise its B factors are scaled."""
        if self._clips_change():
            self._change_mult[update.client_id] = c
            return update
        update.factors = dict(update.factors)
        for m in update.modules():
            _a_key, b_key = factor_keys(m)
            update.factors[b_key] = (update.factors[b_key].astype(np.float64) * c).astype(np.float32)
        return update

    def _cap(self, kept: list[ClientUpdate], max_share: float | None) -> tuple[list[int], list[str]]:
        """The integer weights to aggregate ``kept`` with, and the ids whose weight was capped
        (default: water-filling on the claimed examples, shares kept to 1e-6)."""
        if max_share is None:
            return [u.num_examples for u in kept], []
        raw = [float(u.num_examples) for u in kept]
        capped = _cap_shares(raw, max_share)
        total = float(sum(capped))
        weights = [max(1, round(w / total * 1_000_000)) for w in capped]
        return weights, [u.client_id for u, w, c in zip(kept, raw, capped) if c < w * (1 - 1e-9)]

    def _sent_cached(self, update: ClientUpdate) -> dict | None:
        if update.client_id not in self._sent_cache:
            self._sent_cache[update.client_id] = self._sent(update)
        return self._sent_cache[update.client_id]

    def _sent(self, update: ClientUpdate) -> dict | None:
        """What the strategy sent ``update``'s client this round, factored (None: nothing, or a
        strategy whose clients merge it into their base and send only their change)."""
        if self.strategy.merge_into_base:
            return None
        try:
            msg = self.strategy.configure(client_id=update.client_id, round=self.round,
                                          spec=RankSpec(rank=update.rank, rank_pattern=update.rank_pattern))
        except Exception:  # noqa: BLE001 - a statistic only: fall back to the reply itself
            return None
        return None if msg is None else {m: (msg.module_scaling(m), *msg.pair(m)) for m in msg.modules()}

    @abstractmethod
    def _add(self, update: ClientUpdate) -> None: ...

    @abstractmethod
    def _finalize(self) -> None: ...


class Strategy(ABC):
    """Common interface of the federated LoRA strategies (see module docstring)."""

    name: str = "base"
    merge_into_base: bool = False    # FLoRA-style: clients merge what they receive

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = config or StrategyConfig()
        self.rounds_completed = 0

    # --- what each client gets -------------------------------------------------------
    def assign_rank(self, spec: RankSpec) -> RankSpec:
        """The rank a client trains at, given what its device can afford (default: that)."""
        return spec

    @abstractmethod
    def configure(self, *, client_id: str, spec: RankSpec, round: int) -> GlobalFactors | None:
        """The message for one client, or None when there is no global adapter yet."""

    def _message(self, factors: dict[str, np.ndarray], spec: RankSpec, round: int,
                 *, alpha: float | None = None) -> GlobalFactors:
        return GlobalFactors(factors=factors, rank=spec.rank, rank_pattern=dict(spec.rank_pattern),
                             alpha=float(self.config.alpha if alpha is None else alpha),
                             rslora=self.config.rslora, round=round, strategy=self.name,
                             base_model=self.config.base_model, merge_into_base=self.merge_into_base)

    def send_scaling(self, rank: int) -> float:
        return scaling(self.config.alpha, rank, self.config.rslora)

    # --- how replies are aggregated ----------------------------------------------------
    def decode_reply(self, data: bytes, *, spec: RankSpec) -> ClientUpdate:
        """Decode and validate one reply against what was assigned; ValueError says why."""
        update = decode_update(data, limits=self.config.limits, expected_base_model=self.config.base_model)
        self.check_ranks(update, spec)
        self.check_scaling(update)
        if self.config.module_shapes is not None:
            self.check_shapes(update, self.config.module_shapes)
        return update

    def check_scaling(self, update: ClientUpdate) -> None:
        """The run sets the LoRA scaling: a reply must echo ``alpha`` and rsLoRA as sent, so a client
        cannot choose its own multiplier. (peft's per-module ``alpha_pattern``, which our trainer
        never sends, stays accepted: each module's scaling is bounded by ``DecodeLimits.max_scaling``
        and folded into ``B`` in float64 before the aggregator stores float32.)"""
        alpha, rslora = float(self.config.alpha), bool(self.config.rslora)
        if update.alpha != alpha:
            raise ValueError(f"client {update.client_id!r}: alpha {update.alpha:.6g} differs from the run's "
                             f"alpha {alpha:.6g}; replies must train at the scaling the server sets")
        if update.rslora != rslora:
            raise ValueError(f"client {update.client_id!r}: rslora={update.rslora} differs from the run's "
                             f"rslora={rslora}")

    @staticmethod
    def check_shapes(update: ClientUpdate, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Every module must exist in the base model with the factors' outer dimensions."""
        for module in update.modules():
            if module not in shapes:
                raise ValueError(f"client {update.client_id!r}: module {module!r} is not a LoRA target "
                                 f"of the base model")
            d_out, d_in = shapes[module]
            b, a = update.pair(module)
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ValueError(f"client {update.client_id!r}: module {module!r} factors are "
                                 f"B {b.shape} / A {a.shape}, the base weight is {d_out}x{d_in}")

    @staticmethod
    def check_ranks(update: ClientUpdate, spec: RankSpec) -> None:
        for module in update.modules():
            got = update.pair(module)[1].shape[0]
            allowed = spec.module_rank(module)
            if got > allowed:
                raise ValueError(f"client {update.client_id!r}: module {module!r} has rank {got}, "
                                 f"above the assigned {allowed}")

    @abstractmethod
    def begin_round(self, round: int) -> RoundAggregation: ...

    def aggregate(self, updates: Iterable[ClientUpdate], *, round: int) -> RoundResult:
        agg = self.begin_round(round)
        for update in updates:
            agg.add(update)
        return agg.finalize()

    # --- global model and state --------------------------------------------------------
    @abstractmethod
    def global_delta(self) -> dict[str, np.ndarray]:
        """peft module path -> dW (d_out x d_in) of the global model; empty before round 1."""

    @abstractmethod
    def state_tensors(self) -> dict[str, np.ndarray]: ...

    def state_meta(self) -> dict:
        return {"strategy": self.name, "rounds_completed": self.rounds_completed}

    @abstractmethod
    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None: ...

    def _check_meta(self, meta: Mapping) -> None:
        if meta.get("strategy") != self.name:
            raise ValueError(f"checkpoint is for strategy {meta.get('strategy')!r}, not {self.name!r}")
        self.rounds_completed = int(meta.get("rounds_completed", 0))


class FactorStrategy(Strategy):
    """A strategy whose global state is one ``(B, A)`` pair per module, ``s B A`` already folded
    into ``B`` (FedIT, HetLoRA): its delta, checkpoint tensors and restore are the same."""

    def __init__(self, config: StrategyConfig | None = None) -> None:
        super().__init__(config)
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # module -> (B_g, A_g)

    def global_delta(self) -> dict[str, np.ndarray]:
        return {m: (b @ a).astype(np.float32) for m, (b, a) in sorted(self.factors.items())}

    def state_tensors(self) -> dict[str, np.ndarray]:
        return join_factors(self.factors)

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None:
        self._check_meta(meta)
        self.factors = dict(split_factors(tensors))
