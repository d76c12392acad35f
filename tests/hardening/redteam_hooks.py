"""Example red-team hooks for ``--fault CLIENT=python:MODULE:FUNCTION`` (bytes -> bytes)."""
from __future__ import annotations

import numpy as np

from edge_client.wire import decode_update, encode_update


def flip_sign(data: bytes) -> bytes:
    """The same reply with its delta negated (B factors sign-flipped)."""
    u = decode_update(data)
    u.factors = {k: (-v if k.endswith(".lora_B.weight") else v) for k, v in u.factors.items()}
    return encode_update(u)


def garbage(data: bytes) -> bytes:
    return np.random.default_rng(0).bytes(len(data))
