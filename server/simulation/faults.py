"""Fault injection for the embedded runtime: replies that must be rejected, and stragglers.

Each fault turns a correct client reply into a faulty one, on the wire, the way a buggy or
malicious client would send it. The server must reject all of them with a reason and carry
on with the rest of the round.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors.numpy

from edge_client.wire import LORA_A_SUFFIX, SCHEMA_VERSION, ClientUpdate, encode_update

__all__ = ["FAULTS", "faulty_reply"]

FAULTS = ("bad_shape", "nan", "wrong_base", "rank_above", "truncated", "straggler")


def _raw(update: ClientUpdate, **changes) -> bytes:
    """Wire bytes of ``update`` with ``changes``, written without the encoder's validation."""
    fields = {"client_id": update.client_id, "num_examples": update.num_examples, "rank": update.rank,
              "rank_pattern": update.rank_pattern, "alpha": update.alpha, "rslora": update.rslora,
              "base_model": update.base_model, "target_modules": update.target_modules,
              "round": update.round, "metrics": update.metrics}
    factors = changes.pop("factors", update.factors)
    fields.update(changes)
    meta = {"schema": SCHEMA_VERSION, "kind": "update", "dtype": "float32", **fields}
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in factors.items()}
    return safetensors.numpy.save(tensors, metadata={"flexlora": json.dumps(meta)})


def faulty_reply(update: ClientUpdate, fault: str) -> bytes:
    """Bytes of ``update`` corrupted by ``fault`` (one of ``FAULTS`` except "straggler")."""
    factors = {k: v.copy() for k, v in update.factors.items()}
    first_a = sorted(k for k in factors if k.endswith(LORA_A_SUFFIX))[0]
    if fault == "truncated":
        data = encode_update(update)
        return data[: len(data) // 2]
    if fault == "nan":
        factors[first_a][0, 0] = np.nan
        return _raw(update, factors=factors)
    if fault == "bad_shape":
        factors[first_a] = factors[first_a][:, :-1].copy()
        return _raw(update, factors=factors)
    if fault == "wrong_base":
        return _raw(update, base_model="0" * 32)
    if fault == "rank_above":
        # a consistent update at twice the rank it was assigned
        grown = {}
        for k, v in factors.items():
            axis = 0 if k.endswith(LORA_A_SUFFIX) else 1
            grown[k] = np.concatenate([v, v], axis=axis)
        pattern = {m: 2 * r for m, r in update.rank_pattern.items()}
        return _raw(update, factors=grown, rank=2 * update.rank, rank_pattern=pattern)
    raise ValueError(f"fault={fault!r} is not one of {FAULTS[:-1]}")
