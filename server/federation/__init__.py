"""The federation core: one round engine that every runtime drives.

``flexlora simulate`` (in-process clients), the experiment cells and the Flower ServerApp are
thin adapters over :class:`~server.federation.rounds.RoundEngine`: they say how clients are
reached (a :class:`~server.federation.rounds.ClientTransport`) and where results go; sampling,
per-client seeds, configure -> train -> reply checks -> aggregate, evaluation hooks and
checkpoints live here once.
"""
from __future__ import annotations

from server.federation.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointLocked, load_checkpoint, save_checkpoint
from server.federation.rounds import (
                     ClientTransport,
                     Order,
                     Reply,
                     ResumeError,
                     RoundEngine,
                     RoundPlan,
                     check_reply_identity,
                     client_seed,
                     reject_reason,
                     sample_clients,
)

__all__ = ["CHECKPOINT_NAME", "Checkpoint", "CheckpointLocked", "load_checkpoint", "save_checkpoint", "ClientTransport", "Order",
           "Reply", "ResumeError", "RoundEngine", "RoundPlan", "check_reply_identity", "client_seed",
           "reject_reason", "sample_clients"]
