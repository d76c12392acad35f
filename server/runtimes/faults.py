"""Fault injection for the embedded runtime: replies that must be rejected, and stragglers.

Each fault turns a correct client reply into a faulty one, on the wire, the way a buggy or
malicious client would send it. The malformed kinds (``MALFORMED``) must be rejected with a
reason while the round carries on with the rest. The adversarial kinds (``ADVERSARIAL``) are
valid replies that pass every decoder check; only robust aggregation limits what they do:

* ``scaled``: the delta multiplied by ``ATTACK_SCALE`` (B scaled).
* ``sign_flip``: the delta multiplied by ``-ATTACK_SCALE`` (a boosted sign flip).
* ``noise``: Gaussian factors whose delta norm is ``ATTACK_SCALE`` times the honest one.
* ``inflate``: claims ``INFLATED_EXAMPLES`` examples (the decoder's default cap) for its
  sign-flipped delta, to take the aggregation weight.

``python:MODULE:FUNCTION`` (the red-team hook) applies a user function ``bytes -> bytes`` to the
client's encoded reply; an exception in it drops that client with the reason.
"""

from __future__ import annotations

import importlib
import json
import re
import zlib
from collections.abc import Callable

import numpy as np
import safetensors.numpy

from edge_client.wire import LORA_A_SUFFIX, LORA_B_SUFFIX, SCHEMA_VERSION, ClientUpdate, encode_update

__all__ = ["FAULTS", "MALFORMED", "ADVERSARIAL", "ATTACK_SCALE", "INFLATED_EXAMPLES", "faulty_reply",
           "check_fault", "load_hook"]

MALFORMED = ("bad_shape", "nan", "wrong_base", "rank_above", "truncated")
ADVERSARIAL = ("scaled", "sign_flip", "noise", "inflate")
FAULTS = (*MALFORMED, *ADVERSARIAL, "straggler")
ATTACK_SCALE = 20.0
INFLATED_EXAMPLES = 10**9
_HOOK_RE = re.compile(r"python:([A-Za-z_][A-Za-z0-9_.]*):([A-Za-z_][A-Za-z0-9_]*)")


def load_hook(spec: str) -> Callable[[bytes], bytes]:
    """The function a ``python:MODULE:FUNCTION`` fault names (imported now; ValueError if not)."""
    m = _HOOK_RE.fullmatch(spec)
    if not m:
        raise ValueError(f"fault {spec!r}: expected python:MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(m.group(1)), m.group(2))
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"fault {spec!r}: cannot load it ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise ValueError(f"fault {spec!r}: {m.group(2)} is not callable")
    return fn


def check_fault(client_id: str, fault: str) -> None:
    """ValueError unless ``fault`` is a known kind or a loadable ``python:`` hook."""
    if not isinstance(fault, str):
        raise ValueError(f"faults[{client_id!r}] must be a string, got {fault!r}")
    if fault.startswith("python:"):
        load_hook(fault)
    elif fault not in FAULTS:
        raise ValueError(f"faults[{client_id!r}]={fault!r} is not one of {FAULTS} or python:MODULE:FUNCTION")


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
    if fault.startswith("python:"):
        data = load_hook(fault)(encode_update(update))
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"fault hook {fault!r} returned {type(data).__name__}, not bytes")
        return bytes(data)
    if fault in ("scaled", "sign_flip", "inflate"):
        k = {"scaled": ATTACK_SCALE, "sign_flip": -ATTACK_SCALE, "inflate": -1.0}[fault]
        for key in factors:
            if not key.endswith(LORA_A_SUFFIX):
                factors[key] = factors[key] * np.float32(k)
        changes = {"num_examples": INFLATED_EXAMPLES} if fault == "inflate" else {}
        return _raw(update, factors=factors, **changes)
    if fault == "noise":
        rng = np.random.default_rng([zlib.crc32(update.client_id.encode()), update.round])
        for key in sorted(factors):
            if key.endswith(LORA_A_SUFFIX):
                b_key = key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX
                a, b = factors[key], factors[b_key]
                target = ATTACK_SCALE * float(np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)))
                na = rng.standard_normal(a.shape)
                nb = rng.standard_normal(b.shape)
                got = float(np.linalg.norm(nb @ na)) or 1.0
                c = (target / got) ** 0.5
                factors[key], factors[b_key] = (na * c).astype(np.float32), (nb * c).astype(np.float32)
        return _raw(update, factors=factors)
    raise ValueError(f"fault={fault!r} is not one of {FAULTS[:-1]} or python:MODULE:FUNCTION")
