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


def poison_examples(data: bytes) -> bytes:
    """Issue 21, class 3: claims 10^9 examples and scales every module's delta to 0.99 of the
    default ``DecodeLimits.max_delta_norm`` (a valid reply that swamps the round)."""
    from edge_client.wire import DecodeLimits, factor_keys, product_norm

    u = decode_update(data)
    bound = 0.99 * DecodeLimits().max_delta_norm
    for module in u.modules():
        b, a = u.pair(module)
        norm = u.module_scaling(module) * product_norm(b, a) or 1.0
        b_key = factor_keys(module)[1]
        u.factors[b_key] = (b.astype(np.float64) * (bound / norm)).astype(np.float32)
    u.num_examples = 10**9
    return encode_update(u)


def zero_b_huge_alpha(data: bytes) -> bytes:
    """Issue 21, class 1: every B zeroed and alpha = 1e40, so every product is 0 (written raw:
    the encoder's own checks would refuse it)."""
    import json

    import safetensors.numpy

    from edge_client.wire import SCHEMA_VERSION

    u = decode_update(data)
    meta = {"schema": SCHEMA_VERSION, "kind": "update", "dtype": "float32", "client_id": u.client_id,
            "num_examples": u.num_examples, "rank": u.rank, "rank_pattern": u.rank_pattern, "alpha": 1e40,
            "rslora": u.rslora, "base_model": u.base_model, "target_modules": u.target_modules,
            "round": u.round, "metrics": u.metrics}
    tensors = {k: (np.zeros_like(v) if k.endswith(".lora_B.weight") else v) for k, v in u.factors.items()}
    return safetensors.numpy.save(tensors, metadata={"flexlora": json.dumps(meta)})
