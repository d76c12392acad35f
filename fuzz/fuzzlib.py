"""Shared pieces of the decoder fuzzing: raw wire builders and the one-input oracle.

``check_one(data)`` is what every fuzzer and the corpus replay test runs on one input: decode
it as a client update (and as global factors) under small limits and, when it decodes, push
it through a server's reply handling (``Strategy.decode_reply`` against an assignment, then
a FlexLoRA round). It returns "accepted" or "rejected: <reason>"; any exception other than
``ValueError`` escapes and is a crash. The builders write safetensors bytes by hand so that
inputs the encoder would refuse to produce (duplicate keys, wrong dtypes, lying headers) can
be made.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from edge_client.wire import SCHEMA_VERSION, DecodeLimits, decode_global, decode_update, factor_keys

__all__ = ["LIMITS", "MODULE", "ST_CODES", "raw_safetensors", "update_meta", "valid_factors",
           "update_bytes", "global_meta", "check_one", "check_accepted"]

# Small limits keep every fuzz case cheap; the checks are the same as with the defaults.
LIMITS = DecodeLimits(max_bytes=1 << 20, max_header_bytes=1 << 16, max_rank=64, max_modules=16,
                      max_dim=256, max_num_examples=10**6, max_delta_norm=1e6)
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
ST_CODES = {"float32": ("F32", "<f4"), "float16": ("F16", "<f2"), "float64": ("F64", "<f8"),
            "int32": ("I32", "<i4"), "uint8": ("U8", "u1")}


def raw_safetensors(tensors, *, metadata=None, header_extra: str = "", dtype_codes=None) -> bytes:
    """Bytes of a safetensors file written by hand.

    ``tensors`` is a list of ``(name, array)`` (names may repeat); ``metadata`` a dict of
    str -> str (or None); ``header_extra`` is raw JSON text spliced in before the closing
    brace (e.g. a duplicated key); ``dtype_codes`` overrides the dtype code per name.
    """
    entries, blobs, offset = [], [], 0
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        code = (dtype_codes or {}).get(name) or ST_CODES[arr.dtype.name][0]
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append(f"{json.dumps(name)}: " + json.dumps(
            {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}))
        blobs.append(blob)
        offset += len(blob)
    if metadata is not None:
        entries.insert(0, '"__metadata__": ' + json.dumps(metadata))
    text = "{" + ", ".join(entries) + header_extra + "}"
    header = text.encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"".join(blobs)


def valid_factors(rank: int = 4, d_out: int = 8, d_in: int = 6, *, seed: int = 0, module: str = MODULE):
    rng = np.random.default_rng(seed)
    a_key, b_key = factor_keys(module)
    return {a_key: (0.1 * rng.standard_normal((rank, d_in))).astype(np.float32),
            b_key: (0.1 * rng.standard_normal((d_out, rank))).astype(np.float32)}


def update_meta(**changes) -> dict:
    meta = {"schema": SCHEMA_VERSION, "kind": "update", "dtype": "float32", "client_id": "c0",
            "num_examples": 10, "rank": 4, "rank_pattern": {}, "alpha": 16.0, "rslora": False,
            "base_model": "ab" * 16, "target_modules": ["q_proj"], "round": 1, "metrics": {"train_loss": 1.0}}
    meta.update(changes)
    return meta


def global_meta(**changes) -> dict:
    meta = {"schema": SCHEMA_VERSION, "kind": "global", "dtype": "float32", "rank": 4, "rank_pattern": {},
            "alpha": 16.0, "rslora": False, "round": 1, "strategy": "flexlora", "base_model": None,
            "merge_into_base": False}
    meta.update(changes)
    return meta


def update_bytes(factors=None, *, meta_json: str | None = None, **meta_changes) -> bytes:
    """A client-update payload; ``meta_json`` replaces the metadata JSON text verbatim."""
    factors = valid_factors() if factors is None else factors
    text = json.dumps(update_meta(**meta_changes)) if meta_json is None else meta_json
    return raw_safetensors(sorted(factors.items()), metadata={"flexlora": text})


class _Server:
    """A FlexLoRA server with one assignment, built once (the native core loads lazily)."""

    def __init__(self) -> None:
        from server.federation.strategies import RankSpec, StrategyConfig, make_strategy

        self.strategy = make_strategy("flexlora", StrategyConfig(), max_rank=8)
        self.spec = RankSpec(rank=8)


_SERVER: _Server | None = None


def check_accepted(update) -> None:
    """Invariants every decoded update must satisfy (AssertionError is a finding)."""
    for key, arr in update.factors.items():
        assert arr.dtype == np.float32 and arr.ndim == 2, key
        assert np.isfinite(arr).all(), key
    assert 1 <= update.num_examples <= LIMITS.max_num_examples
    assert math.isfinite(update.alpha) and update.alpha > 0


def check_one(data: bytes, *, aggregate: bool = True) -> str:
    """Run one input through decoding and reply handling; only ValueError may escape as a rejection."""
    global _SERVER
    try:
        decode_global(data, limits=LIMITS)
    except ValueError:
        pass
    try:
        update = decode_update(data, limits=LIMITS)
    except ValueError as exc:
        if not str(exc):
            raise AssertionError("a rejection without a reason") from exc
        return f"rejected: {exc}"
    check_accepted(update)
    if not aggregate:
        return "accepted"
    if _SERVER is None:
        _SERVER = _Server()
    strategy, spec = _SERVER.strategy, _SERVER.spec
    try:
        update = strategy.decode_reply(data, spec=spec)
        agg = strategy.begin_round(1)
        agg.add(update)
    except ValueError as exc:
        return f"rejected: {exc}"
    agg.finalize()
    for module, delta in strategy.global_delta().items():
        assert np.isfinite(delta).all(), f"non-finite global delta for {module}"
    return "accepted"
