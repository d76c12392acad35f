"""What a round exchanges with its clients, whatever the runtime: the orders (who trains, at which
rank and seed, from which message), the replies, the transport protocol between them, and the
rules that make every runtime sample, seed and check replies the same way."""
from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edge_client.wire import ClientUpdate, GlobalFactors, RankSpec

__all__ = ["client_seed", "sample_clients", "check_reply_identity", "reject_reason", "Order", "Reply",
           "RoundPlan", "ClientTransport"]


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
