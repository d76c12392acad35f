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
* ``within_spread`` (issue 21, class 6): the global's truncation it was sent minus twice its
  own honest change, ``T - 2 Delta`` (``3 T - 2 X``, truncated back to the client's rank): its
  norm and its distance to the others stay near the honest ones. Round 1 (nothing sent): ``-2 X``.
* ``slot_cancel`` (issue 21, class 5): the same product ``B A``, re-factored so that two rank
  slots carry ``+/- K b_1 a_r^T`` (``K`` makes that term ``ATTACK_SCALE`` times the honest delta
  norm): invisible in ``B A``, so to every defence that measures ``s B A``, but weighted
  differently per slot by raFLoRA. Modules of rank 1 are left as they are.

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

from edge_client.wire import LORA_A_SUFFIX, LORA_B_SUFFIX, SCHEMA_VERSION, ClientUpdate, GlobalFactors, encode_update

__all__ = ["FAULTS", "MALFORMED", "ADVERSARIAL", "ATTACK_SCALE", "INFLATED_EXAMPLES", "faulty_reply",
           "check_fault", "load_hook"]

MALFORMED = ("bad_shape", "nan", "wrong_base", "rank_above", "truncated")
ADVERSARIAL = ("scaled", "sign_flip", "noise", "inflate", "within_spread", "slot_cancel")
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


def faulty_reply(update: ClientUpdate, fault: str, sent: GlobalFactors | None = None) -> bytes:
    """Bytes of ``update`` corrupted by ``fault`` (one of ``FAULTS`` except "straggler");
    ``sent``: what the server sent this client (``within_spread`` starts from it)."""
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
    if fault == "within_spread":
        return _raw(update, factors=_within_spread(update, sent))
    if fault == "slot_cancel":
        return _raw(update, factors=_slot_cancel(update))
    raise ValueError(f"fault={fault!r} is not one of {FAULTS[:-1]} or python:MODULE:FUNCTION")


def _within_spread(update: ClientUpdate, sent: GlobalFactors | None) -> dict[str, np.ndarray]:
    """Per module ``3 T - 2 X`` (``T`` what was sent, ``X`` the honest reply) at the reply's rank,
    split as the reference split does (``B = U S / s``, ``A = V^T``)."""
    out = {}
    for m in update.modules():
        b, a = update.pair(m)
        s = update.module_scaling(m)
        x = s * (b.astype(np.float64) @ a.astype(np.float64))
        t = np.zeros_like(x)
        if sent is not None and m in sent.modules():
            b2, a2 = sent.pair(m)
            t = sent.module_scaling(m) * (b2.astype(np.float64) @ a2.astype(np.float64))
        u, sv, vt = np.linalg.svd(3.0 * t - 2.0 * x, full_matrices=False)
        r = a.shape[0]
        a_key = m + LORA_A_SUFFIX
        out[a_key] = vt[:r].astype(np.float32)
        out[m + LORA_B_SUFFIX] = (u[:, :r] * (sv[:r] / s)).astype(np.float32)
    return out


def _slot_cancel(update: ClientUpdate) -> dict[str, np.ndarray]:
    """``B M, M^-1 A`` with ``M = I + K E_{1r}``: slot r of B gains ``K b_1``, slot 1 of A loses
    ``K a_r``; ``B A`` is unchanged, slot 1 and slot r each carry ``-/+ K b_1 a_r^T``."""
    out = {k: v.copy() for k, v in update.factors.items()}
    for m in update.modules():
        b, a = (x.astype(np.float64) for x in update.pair(m))
        r = a.shape[0]
        if r < 2:
            continue
        honest = float(np.linalg.norm(b @ a)) or 1.0
        term = float(np.linalg.norm(b[:, 0]) * np.linalg.norm(a[r - 1])) or 1.0
        k = ATTACK_SCALE * honest / term
        b2, a2 = b.copy(), a.copy()
        b2[:, r - 1] += k * b[:, 0]
        a2[0] -= k * a[r - 1]
        out[m + LORA_B_SUFFIX], out[m + LORA_A_SUFFIX] = b2.astype(np.float32), a2.astype(np.float32)
    return out
