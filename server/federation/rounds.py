"""The round engine: sampling, per-client seeds, configure -> train -> reply checks -> aggregate,
evaluation and checkpoints, written once for every runtime.

A round is two halves so that runtimes which own the exchange (Flower's ``Grid``) can drive it:

    plan  = engine.plan(t)                        # sample, assign ranks, configure, encode
    ... deliver plan.orders to the clients, collect their replies (any order) ...
    entry = engine.complete(plan, replies)        # decode, validate, aggregate, evaluate, save

``engine.run(transport, rounds)`` does both with a :class:`ClientTransport` in between.

Replies are handled in the plan's (sorted client-id) order whatever order they arrived in, so
every runtime adds the same updates in the same order and ends with the same global state for
the same seed. One client's bad reply (any exception while decoding, checking or adding it)
rejects that client with its reason.

A round is committed only when it is sane (see :meth:`RoundEngine._insane`): its aggregate is
finite, and (on by default, ``sanity_ratio``) the global model's norm grew by at most
``sanity_ratio`` times the median norm of the round's accepted replies -- a reference taken from
the replies, not from the state being guarded, so a poisoned round is refused even in round 1.
A round with fewer than ``min_clients`` valid replies is recorded as failed and the run goes on;
with no valid reply at all the state the clients were sent is suspect and the engine rolls back
to the previous committed state (not for strategies whose clients merge what they receive into
their base weights, FLoRA). ``max_consecutive_failures`` failed rounds in a
row raise ``RoundFailed``.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from edge_client.wire import ClientUpdate, RankSpec, encode_global
from server.federation.checkpoint import (
    DEFAULT_KEEP,
    check_writable,
    checkpoint_key,
    has_checkpoint,
    load_checkpoint,
    lock_directory,
    save_checkpoint,
)
from server.federation.exchange import (
    ClientTransport,
    Order,
    Reply,
    RoundPlan,
    check_reply_identity,
    client_seed,
    reject_reason,
    sample_clients,
)
from server.federation.strategies import RoundFailed, Strategy

__all__ = ["client_seed", "sample_clients", "check_reply_identity", "reject_reason", "Order", "Reply",
           "RoundPlan", "ClientTransport", "ResumeError", "RoundEngine", "update_norm", "global_norm",
           "DEFAULT_SANITY_RATIO"]
# A round below min_clients, or whose aggregate is not finite, whose global norm grows more than
# ``sanity_ratio`` x the median reply norm or more than ``max_norm_growth`` times, is recorded with
# "failed" in its history entry and not committed (the strategy state is restored).

DEFAULT_SANITY_RATIO = 100.0
_SANITY = "sanity guard"


def update_norm(update: ClientUpdate) -> float:
    """``||dW||_F`` of a reply over all its modules (float64, from the Gram matrices)."""
    from server.federation.strategies.robust import effective_norms
    return float(effective_norms([{m: (update.module_scaling(m), *update.pair(m)) for m in update.modules()}])[0])


def global_norm(strategy: Strategy) -> float:
    """``||global delta||_F`` over all modules: from the singular values when the strategy keeps
    an SVD-factored adapter (FlexLoRA, raFLoRA; no dense delta formed), else from ``global_delta``."""
    adapter = getattr(strategy, "adapter", None)
    modules = getattr(adapter, "modules", None)
    if isinstance(modules, Mapping):
        return math.sqrt(sum(float(np.sum(np.square(np.asarray(usv[1], np.float64)))) for usv in modules.values()))
    sq = 0.0
    for delta in strategy.global_delta().values():
        sq += float(np.sum(np.square(np.asarray(delta, np.float64))))
    return math.sqrt(sq)


class ResumeError(ValueError):
    """A checkpoint cannot be resumed by this run (other settings, another base model)."""


class RoundEngine:
    """Runs rounds of ``strategy`` over the clients ``specs`` (client id -> the rank its device
    affords). ``evaluate(strategy) -> dict`` scores the global model (held-out clients);
    ``on_round(entry)`` sees each round's entry before it is checkpointed; with
    ``checkpoint_dir`` every completed round is saved atomically (``identity`` and
    ``base_model`` must match on resume); ``runtime_state`` is an object with
    ``state_tensors()`` / ``load_state(tensors)`` whose state travels in the checkpoint too."""

    def __init__(self, strategy: Strategy, specs: Mapping[str, RankSpec], *, seed: int = 0,
                 clients_per_round: int | None = None, rng: random.Random | None = None,
                 evaluate: Callable[[Strategy], dict] | None = None,
                 on_round: Callable[[dict], None] | None = None, checkpoint_dir: str | Path | None = None,
                 identity: Mapping | None = None, base_model: str | None = None, runtime_state=None,
                 runtime: str = "embedded", logger: logging.Logger | None = None,
                 max_norm_growth: float | None = None, overwrite: bool = True,
                 keep_checkpoints: int = DEFAULT_KEEP, sanity_ratio: float | None = DEFAULT_SANITY_RATIO,
                 max_consecutive_failures: int = 3) -> None:
        if not specs:
            raise ValueError("specs must name at least one client")
        if clients_per_round is not None and not 1 <= clients_per_round <= len(specs):
            raise ValueError(f"clients_per_round must be in [1, {len(specs)}] (the clients), got {clients_per_round}")
        if max_norm_growth is not None and not (isinstance(max_norm_growth, (int, float))
                                                and math.isfinite(max_norm_growth) and max_norm_growth > 1):
            raise ValueError(f"max_norm_growth must be a finite number > 1 or None, got {max_norm_growth!r}")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be an int >= 1, got {keep_checkpoints!r}")
        if sanity_ratio is not None and not (isinstance(sanity_ratio, (int, float)) and not isinstance(sanity_ratio, bool)
                                             and math.isfinite(sanity_ratio) and sanity_ratio > 0):
            raise ValueError(f"sanity_ratio must be a finite number > 0 or None, got {sanity_ratio!r}")
        if (isinstance(max_consecutive_failures, bool) or not isinstance(max_consecutive_failures, int)
                or max_consecutive_failures < 1):
            raise ValueError(f"max_consecutive_failures must be an int >= 1, got {max_consecutive_failures!r}")
        self.sanity_ratio = sanity_ratio         # None: the default sanity guard is off
        self.max_consecutive_failures = max_consecutive_failures
        self._failures = 0                       # failed rounds in a row
        # the last two committed states, oldest first: (round, tensors, meta, max_norm_growth's
        # norm, global norm or None when the guard is off); memory: two copies of the global state
        self._good: list[tuple[int, dict, dict, float | None, float | None]] = []
        self.max_norm_growth = max_norm_growth   # a round whose global norm grows more is not committed
        self.overwrite = overwrite               # False: refuse to start over an existing checkpoint
        self.keep_checkpoints = keep_checkpoints
        self._lock = None
        self._global_norm: float | None = None
        self.strategy = strategy
        self.specs = dict(specs)
        self.seed = seed
        self.clients_per_round = clients_per_round
        self.rng = rng if rng is not None else random.Random(f"runtime-{seed}")
        self.evaluate = evaluate
        self.on_round = on_round
        self.checkpoint_dir = checkpoint_dir
        self.identity = dict(identity or {})
        self.base_model = base_model
        self.runtime_state = runtime_state
        self.runtime = runtime
        self.log = logger or logging.getLogger("flexlora.rounds")
        self.round = 0
        self.base: dict = {}                 # scores of the base model (before round 1)
        self.history: list[dict] = []        # one entry per completed round
        self.resumed = False

    # --- one round ---------------------------------------------------------------------
    def plan(self, round: int) -> RoundPlan:
        ids = sample_clients(self.rng, self.specs, self.clients_per_round)
        orders = []
        for index, cid in enumerate(ids):
            spec = self.strategy.assign_rank(self.specs[cid])
            msg = self.strategy.configure(client_id=cid, spec=spec, round=round)
            orders.append(Order(client_id=cid, round=round, index=index, seed=client_seed(self.seed, round, index),
                                spec=spec, message=msg, wire=encode_global(msg) if msg is not None else None))
        return RoundPlan(round=round, orders=orders)

    def complete(self, plan: RoundPlan, replies: Iterable[Reply]) -> dict:
        """Aggregate the replies to ``plan`` and commit the round (see the module docstring)."""
        rnd = plan.round
        by_id: dict[str, Reply] = {}
        asked = {o.client_id for o in plan.orders}
        for reply in replies:
            if reply.client_id not in asked:
                self.log.warning("round %d: reply from %r, which was not asked, ignored", rnd, reply.client_id)
                continue
            by_id[reply.client_id] = reply
        if not self._good:
            self._good.append(self._committed(self.round))
        snapshot = self._snapshot()
        agg, rejected, traffic, norms = self._aggregate(plan, by_id, {})
        train_s = time.perf_counter() - plan.started
        result, failed = self._finish(agg, rnd, norms, rejected)
        if failed is not None and failed.startswith(_SANITY) and norms:
            # the guard tripped: refuse the replies that alone could explain it (own norm above
            # sanity_ratio x the median) and aggregate the round again without them
            median = float(np.median(list(norms.values())))
            outliers = {cid: (f"sanity guard: the reply's norm {n:.4g} exceeds sanity_ratio={self.sanity_ratio:g} x "
                              f"the median of the round's accepted replies ({median:.4g})")
                        for cid, n in norms.items() if n > self.sanity_ratio * median}
            if outliers:
                self.log.error("round %d: %s; aggregating again without %s", rnd, failed, sorted(outliers))
                self.strategy.load_state({k: v.copy() for k, v in snapshot[0].items()}, dict(snapshot[1]))
                agg, rejected, traffic, norms = self._aggregate(plan, by_id, outliers)
                result, failed = self._finish(agg, rnd, norms, rejected)
        rolled_back = None
        if result is None and not agg.client_ids:
            # no valid reply: the state the clients were sent is suspect (clients whose training
            # diverged on it report an error, not a reply), so go back to the one before it
            rolled_back = self._roll_back(rnd)
        if failed is not None:
            # not committed: the previous state stays, and the run goes on with the next round
            if result is not None:
                self.strategy.load_state(*snapshot)
            self.log.error("round %d failed and was not committed: %s", rnd, failed)
            self._failures += 1
        else:
            self._failures = 0
            self._good.append(self._committed(rnd))
            del self._good[:-2]   # the state now and the one a rollback returns to
        t_eval = time.perf_counter()
        scores = self.evaluate(self.strategy) if self.evaluate is not None else {}
        entry = {"round": rnd, **scores, "aggregation_s": agg.seconds if result is None else result.aggregation_s,
                 "clients": 0 if failed else result.num_clients,
                 "ranks": dict(agg.ranks) if result is None else result.ranks, "rejected": rejected,
                 "train_s": train_s, "eval_s": time.perf_counter() - t_eval, "traffic": traffic,
                 **({} if result is None else result.metrics)}
        if failed is not None:
            entry["failed"] = failed
        if rolled_back is not None:
            entry["rolled_back_to"] = rolled_back
        if getattr(agg, "robust_report", None):
            entry["robust"] = agg.robust_report
        entry["round_s"] = time.perf_counter() - plan.started
        if self.on_round is not None:
            self.on_round(entry)
        self.history.append(entry)
        self.round = rnd
        self.save()
        if self._failures >= self.max_consecutive_failures:
            raise RoundFailed(f"{self._failures} rounds in a row failed (max_consecutive_failures="
                              f"{self.max_consecutive_failures}); last: {entry['failed']}")
        return entry

    def _aggregate(self, plan: RoundPlan, by_id: Mapping[str, Reply], refused: Mapping[str, str]
                   ) -> tuple[object, dict[str, str], list[dict], dict[str, float]]:
        """Decode, check and add every reply of ``plan`` (in plan order) except ``refused`` (client
        id -> why); returns the round's aggregation, the rejections, traffic and accepted norms."""
        rnd = plan.round
        agg = self.strategy.begin_round(rnd)
        rejected: dict[str, str] = {}
        traffic = []
        norms: dict[str, float] = {}     # accepted replies' ||dW||_F, the sanity guard's reference
        for order in plan.orders:
            cid = order.client_id
            reply = by_id.get(cid, Reply(client_id=cid, error="no reply; dropped"))
            traffic.append({"client": cid, "rank": order.spec.label(), "received": len(order.wire or b""),
                            "sent": len(reply.data or b"")})
            if reply.data is None:
                rejected[cid] = reply.error or "no reply; dropped"
                self.log.warning("round %d: client %s dropped: %s", rnd, cid, rejected[cid])
                continue
            try:
                if cid in refused:
                    raise ValueError(refused[cid])
                update = self.strategy.decode_reply(reply.data, spec=order.spec)
                check_reply_identity(update, client_id=cid, round=rnd)
                agg.add(update)
            except Exception as exc:  # noqa: BLE001 - one client's reply never ends the run
                rejected[cid] = reject_reason(exc)
                self.log.warning("round %d: reply from %s rejected: %s", rnd, cid, rejected[cid])
                continue
            if self.sanity_ratio is not None:
                norms[cid] = update_norm(update)
        return agg, rejected, traffic, norms

    def _finish(self, agg, rnd: int, norms: Mapping[str, float], rejected: Mapping[str, str]):
        """``(result, None)`` for a sane aggregate, ``(result or None, why)`` for a failed round."""
        try:
            result = agg.finalize()
        except RoundFailed as exc:
            return None, f"{exc} (rejected: {dict(rejected)})"
        return result, self._insane(rnd, list(norms.values()))

    def _committed(self, rnd: int) -> tuple:
        """The record of the state just committed (or started from) that a rollback returns to."""
        norm = global_norm(self.strategy) if self.sanity_ratio is not None else None
        return (rnd, *self._snapshot(), self._global_norm, norm)

    def _roll_back(self, rnd: int) -> int | None:
        """``rnd`` had no valid reply: the state it sent is suspect, so go back to the committed
        state before it. Returns that state's round (None: nothing to go back to)."""
        if self.strategy.merge_into_base:
            return None   # FLoRA: clients merged what they received; the server cannot take it back
        if len(self._good) < 2:
            return None
        self._good.pop()
        back, tensors, meta, norm, _ = self._good[-1]
        self.strategy.load_state({k: v.copy() for k, v in tensors.items()}, dict(meta))
        self._global_norm = norm
        self.log.error("round %d: no valid reply; rolled back to the state after round %d", rnd, back)
        return back

    def _snapshot(self) -> tuple[dict, dict]:
        """A copy of the strategy's state, to restore if the round is not committed."""
        tensors = {k: v.copy() for k, v in self.strategy.state_tensors().items()}
        return tensors, dict(self.strategy.state_meta())

    def _insane(self, rnd: int, norms: list[float] | None = None) -> str | None:
        """Why the freshly aggregated state must not be committed (None: it is fine)."""
        for key, value in self.strategy.state_tensors().items():
            if not np.isfinite(value).all():
                return f"the aggregated state {key!r} is not finite"
        if self.sanity_ratio is not None and norms:
            # the reference is the round's accepted replies (median: a minority cannot move it),
            # not the state being guarded; the previous global's norm is allowed on top (strategies
            # whose global accumulates over rounds)
            prev = self._good[-1][4] if self._good and self._good[-1][4] is not None else 0.0
            new = global_norm(self.strategy)
            median = float(np.median(norms))
            if not new <= prev + self.sanity_ratio * median:
                return (f"{_SANITY}: the global update's norm is {new:.4g} after {prev:.4g}, more than "
                        f"sanity_ratio={self.sanity_ratio:g} x the median norm of the round's accepted "
                        f"replies ({median:.4g})")
        if self.max_norm_growth is None:
            return None
        norm = global_norm(self.strategy)
        if not math.isfinite(norm):
            return "the global model's norm is not finite"
        prev = self._global_norm
        if prev is not None and prev > 0 and norm > self.max_norm_growth * prev:
            return (f"the global update's norm grew from {prev:.4g} to {norm:.4g}, more than "
                    f"max_norm_growth={self.max_norm_growth:g} times")
        self._global_norm = norm
        return None

    def run_round(self, round: int, transport: ClientTransport) -> dict:
        plan = self.plan(round)
        return self.complete(plan, transport.exchange(plan))

    def _open_checkpoints(self) -> None:
        """Lock ``checkpoint_dir`` for this run and check it is writable (once)."""
        if not self.checkpoint_dir or self._lock is not None:
            return
        checkpoint_key()   # a bad $FLEXLORA_CHECKPOINT_KEY fails now, not when round 1 is saved
        self._lock = lock_directory(self.checkpoint_dir)
        check_writable(self.checkpoint_dir)

    def close(self) -> None:
        """Release the checkpoint directory's lock (also released when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def start(self) -> None:
        """Resume from ``checkpoint_dir`` if asked by the caller (:meth:`restore`), else score the base."""
        self._open_checkpoints()
        if (self.checkpoint_dir and not self.resumed and not self.overwrite
                and has_checkpoint(self.checkpoint_dir)):
            raise ResumeError(f"checkpoint-dir: {self.checkpoint_dir} already holds a checkpoint; pass --resume to continue "
                              f"it or --overwrite to start over")
        if not self.resumed and self.evaluate is not None and not self.base:
            self.base = self.evaluate(self.strategy)

    def run(self, transport: ClientTransport, rounds: int, *, stop_after: int | None = None) -> list[dict]:
        """Rounds ``self.round + 1 .. rounds`` (at most ``stop_after`` of them); returns their entries."""
        self.start()
        done = []
        for rnd in range(self.round + 1, rounds + 1):
            if stop_after is not None and len(done) >= stop_after:
                break
            entry = self.run_round(rnd, transport)
            done.append(entry)
            self.log.info("round %d: %s", rnd, {k: v for k, v in entry.items()
                                                if k not in ("ranks", "traffic", "families", "samples", "spectrum")})
        return done

    # --- state -------------------------------------------------------------------------
    def save(self) -> None:
        if not self.checkpoint_dir:
            return
        version, internal, gauss = self.rng.getstate()
        meta = {"round": self.round, "config": self.identity, "strategy": self.strategy.state_meta(),
                "rng": [version, list(internal), gauss], "history": [{"base": self.base}, *self.history],
                "base_model": self.base_model, "runtime": self.runtime, "global_norm": self._global_norm}
        runtime_tensors = self.runtime_state.state_tensors() if self.runtime_state is not None else {}
        save_checkpoint(self.checkpoint_dir, meta=meta, strategy_tensors=self.strategy.state_tensors(),
                        runtime_tensors=runtime_tensors, keep=self.keep_checkpoints)

    def restore(self, round: int | None = None) -> bool:
        """Load the checkpoint in ``checkpoint_dir`` (with ``round``: that round's file, e.g. the
        last good state before a poisoned round); False when there is none yet."""
        if self.checkpoint_dir:
            self._open_checkpoints()
        ck = load_checkpoint(self.checkpoint_dir, round=round) if self.checkpoint_dir else None
        if ck is None:
            self.log.warning("resume: nothing to resume in %s; starting at round 1", self.checkpoint_dir)
            return False
        if ck.fallback:
            self.log.warning("resume: fell back to %s (round %s): %s", ck.path, ck.meta.get("round"), ck.fallback)
        theirs = ck.meta.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in self.identity.items() if theirs.get(k) != v}
        if diff:
            raise ResumeError(f"resume: the checkpoint in {self.checkpoint_dir} was made with other settings "
                              f"(checkpoint, now): {diff}")
        if ck.meta.get("base_model") != self.base_model:
            raise ResumeError(f"resume: the checkpoint in {self.checkpoint_dir} was made with another base model")
        self.strategy.load_state(ck.strategy_tensors, ck.meta["strategy"])
        version, internal, gauss = ck.meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        history = list(ck.meta.get("history", []))
        self.base = next((h["base"] for h in history if "base" in h), {})
        self.history = [h for h in history if "round" in h]
        self.round = int(ck.meta["round"])
        self._global_norm = ck.meta.get("global_norm")
        if self.runtime_state is not None:
            self.runtime_state.load_state(ck.runtime_tensors)
        self._good = []
        self._failures = 0
        self.resumed = True
        return True
