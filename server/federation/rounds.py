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
rejects that client with its reason; fewer than ``min_clients`` valid replies raise
``RoundFailed`` and leave the strategy as it was.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_client.wire import ClientUpdate, GlobalFactors, RankSpec, encode_global

from ..strategies import RoundFailed, Strategy
from .checkpoint import load_checkpoint, save_checkpoint

__all__ = ["client_seed", "sample_clients", "check_reply_identity", "reject_reason", "Order", "Reply",
           "RoundPlan", "ClientTransport", "ResumeError", "RoundEngine"]


def client_seed(seed: int, round: int, index: int) -> int:
    """The training seed of the ``index``-th client (in sorted order) of ``round``'s sample."""
    return (seed * 1_000_003 + round * 10_007 + index) % (2**31)


def sample_clients(rng: random.Random, ids: Iterable[str], k: int | None) -> list[str]:
    """The round's clients: all (``k`` None) or ``k`` drawn by ``rng`` from the sorted ``ids``, sorted."""
    ids = sorted(ids)
    return ids if k is None else sorted(rng.sample(ids, k))


def check_reply_identity(update: ClientUpdate, *, client_id: str, round: int) -> None:
    """A reply must come from the client it was asked of, for the round it was asked in."""
    if update.client_id != client_id:
        raise ValueError(f"reply from client {client_id!r} says client {update.client_id!r}")
    if update.round != round:
        raise ValueError(f"reply from client {client_id!r} is for round {update.round}, expected {round}")


def reject_reason(exc: BaseException) -> str:
    """The logged reason a reply was rejected: a ValueError's message, else the error's type too."""
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__} while handling the reply: {exc}"


@dataclass(kw_only=True)
class Order:
    """What one client is asked to do in one round."""
    client_id: str
    round: int
    index: int                          # position in the round's sorted sample
    seed: int                           # client_seed(seed, round, index)
    spec: RankSpec                      # the rank it trains at (after the strategy's assign_rank)
    message: GlobalFactors | None       # what the strategy sends (None: start a fresh adapter)
    wire: bytes | None                  # encode_global(message)


@dataclass(kw_only=True)
class Reply:
    """A client's answer: the update bytes, or why there are none (error)."""
    client_id: str
    data: bytes | None = None
    error: str | None = None


@dataclass(kw_only=True)
class RoundPlan:
    round: int
    orders: list[Order]
    started: float = field(default_factory=time.perf_counter)


class ClientTransport(Protocol):
    """How a runtime reaches its clients: deliver every order, return the replies (any order;
    a client with no reply may be left out or answered with ``Reply(error=...)``)."""

    def exchange(self, plan: RoundPlan) -> Iterable[Reply]: ...


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
                 runtime: str = "embedded", logger: logging.Logger | None = None) -> None:
        if not specs:
            raise ValueError("specs must name at least one client")
        if clients_per_round is not None and not 1 <= clients_per_round <= len(specs):
            raise ValueError(f"clients_per_round must be in [1, {len(specs)}] (the clients), got {clients_per_round}")
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
        agg = self.strategy.begin_round(rnd)
        rejected: dict[str, str] = {}
        traffic = []
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
                update = self.strategy.decode_reply(reply.data, spec=order.spec)
                check_reply_identity(update, client_id=cid, round=rnd)
                agg.add(update)
            except Exception as exc:  # noqa: BLE001 - one client's reply never ends the run
                rejected[cid] = reject_reason(exc)
                self.log.warning("round %d: reply from %s rejected: %s", rnd, cid, rejected[cid])
        train_s = time.perf_counter() - plan.started
        try:
            result = agg.finalize()
        except RoundFailed as exc:
            raise RoundFailed(f"{exc} (rejected: {rejected})") from None
        t_eval = time.perf_counter()
        scores = self.evaluate(self.strategy) if self.evaluate is not None else {}
        entry = {"round": rnd, **scores, "aggregation_s": result.aggregation_s, "clients": result.num_clients,
                 "ranks": result.ranks, "rejected": rejected, "train_s": train_s,
                 "eval_s": time.perf_counter() - t_eval, "traffic": traffic, **result.metrics}
        entry["round_s"] = time.perf_counter() - plan.started
        if self.on_round is not None:
            self.on_round(entry)
        self.history.append(entry)
        self.round = rnd
        self.save()
        return entry

    def run_round(self, round: int, transport: ClientTransport) -> dict:
        plan = self.plan(round)
        return self.complete(plan, transport.exchange(plan))

    def start(self) -> None:
        """Resume from ``checkpoint_dir`` if asked by the caller (:meth:`restore`), else score the base."""
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
                                                if k not in ("ranks", "traffic", "families", "spectrum")})
        return done

    # --- state -------------------------------------------------------------------------
    def save(self) -> None:
        if not self.checkpoint_dir:
            return
        version, internal, gauss = self.rng.getstate()
        meta = {"round": self.round, "config": self.identity, "strategy": self.strategy.state_meta(),
                "rng": [version, list(internal), gauss], "history": [{"base": self.base}, *self.history],
                "base_model": self.base_model, "runtime": self.runtime}
        runtime_tensors = self.runtime_state.state_tensors() if self.runtime_state is not None else {}
        save_checkpoint(self.checkpoint_dir, meta=meta, strategy_tensors=self.strategy.state_tensors(),
                        runtime_tensors=runtime_tensors)

    def restore(self) -> bool:
        """Load the checkpoint in ``checkpoint_dir``; False when there is none yet."""
        ck = load_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        if ck is None:
            return False
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
        if self.runtime_state is not None:
            self.runtime_state.load_state(ck.runtime_tensors)
        self.resumed = True
        return True
