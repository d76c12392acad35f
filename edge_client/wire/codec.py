"""The byte encoding of the protocol's messages: one safetensors file per message.

The safetensors ``__metadata__`` holds a single key ``flexlora`` with a JSON string (schema
version, ``kind`` and the message's fields). Tensors use peft naming and are float32, float16
or bfloat16 on the wire, float32 in memory. numpy has no bfloat16, so bfloat16 is written as its
raw 16-bit patterns (round to nearest even) under the standard safetensors ``BF16`` dtype and
read back by shifting the bits into float32.

The server runs :func:`decode_update` on untrusted bytes: it validates everything (sizes first,
then the metadata schema, keys against the target modules, shapes against the ranks, finite
values) and raises ``ValueError`` naming what is wrong. Never pickle.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
import safetensors

from .messages import ClientUpdate, DecodeLimits, GlobalFactors
from .naming import rank_for_module

__all__ = ["SCHEMA_VERSION", "METADATA_KEY", "WIRE_DTYPES", "encode_update", "decode_update",
           "encode_global", "decode_global", "json_loads_strict"]

SCHEMA_VERSION = 1
METADATA_KEY = "flexlora"
WIRE_DTYPES = ("float32", "float16", "bfloat16")
_ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}

def _to_wire(arr: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float32":
        return "float32", arr.astype("<f4", copy=False)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            half = arr.astype("<f2")
        if not np.isfinite(half).all():
            raise ValueError("a factor overflows float16 (|x| > 65504); send float32 or bfloat16")
        return "float16", half
    bits = arr.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    wire = np.ascontiguousarray(rounded.astype("<u2"))
    if ((wire & 0x7F80) == 0x7F80).any():
        raise ValueError("a factor overflows bfloat16; send float32")
    return "bfloat16", wire


def _serialize(tensors: dict[str, np.ndarray], dtype: str, metadata: dict) -> bytes:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
    keep_alive, specs = [], {}
    for name, arr in tensors.items():
        st_dtype, wire = _to_wire(arr, dtype)
        keep_alive.append(wire)
        if hasattr(safetensors, "TensorSpec"):
            specs[name] = safetensors.TensorSpec(dtype=st_dtype, shape=list(wire.shape),
                                                 data_ptr=wire.ctypes.data, data_len=wire.nbytes)
        else:  # safetensors < 0.8 takes plain dicts with the bytes
            specs[name] = {"dtype": st_dtype, "shape": list(wire.shape), "data": wire.tobytes()}
    return bytes(safetensors.serialize(specs, metadata={METADATA_KEY: json.dumps(metadata)}))


def encode_update(update: ClientUpdate, *, dtype: str = "float32") -> bytes:
    """Serialise a `ClientUpdate` (validated again here) to safetensors bytes."""
    if not isinstance(update, ClientUpdate):
        raise ValueError(f"update must be a ClientUpdate, got {type(update).__name__}")
    update._validate(DecodeLimits())
    meta = {"schema": SCHEMA_VERSION, "kind": "update", "dtype": dtype,
            "client_id": update.client_id, "num_examples": update.num_examples,
            "rank": update.rank, "rank_pattern": update.rank_pattern, "alpha": update.alpha,
            "rslora": update.rslora, "base_model": update.base_model,
            "target_modules": update.target_modules, "round": update.round, "metrics": update.metrics}
    if update.alpha_pattern:  # optional: messages without per-module alpha stay readable by older decoders
        meta["alpha_pattern"] = update.alpha_pattern
    return _serialize(update.factors, dtype, meta)


def encode_global(g: GlobalFactors, *, dtype: str = "float32") -> bytes:
    """Serialise `GlobalFactors` to safetensors bytes."""
    if not isinstance(g, GlobalFactors):
        raise ValueError(f"g must be GlobalFactors, got {type(g).__name__}")
    g._validate(DecodeLimits())
    meta = {"schema": SCHEMA_VERSION, "kind": "global", "dtype": dtype, "rank": g.rank,
            "rank_pattern": g.rank_pattern, "alpha": g.alpha, "rslora": g.rslora, "round": g.round,
            "strategy": g.strategy, "base_model": g.base_model, "merge_into_base": g.merge_into_base}
    if g.alpha_pattern:
        meta["alpha_pattern"] = g.alpha_pattern
    return _serialize(g.factors, dtype, meta)


# --------------------------------------------------------------------------- decoding

_UPDATE_FIELDS = {"schema", "kind", "dtype", "client_id", "num_examples", "rank", "rank_pattern",
                  "alpha", "rslora", "base_model", "target_modules", "round", "metrics"}
_GLOBAL_FIELDS = {"schema", "kind", "dtype", "rank", "rank_pattern", "alpha", "rslora", "round",
                  "strategy", "base_model", "merge_into_base"}


_OPTIONAL_FIELDS = {"alpha_pattern"}   # schema 1 additions; absent means the default ({})


def _reject_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"JSON object has the key {key!r} more than once")
        out[key] = value
    return out


def json_loads_strict(text, what: str):
    """json.loads that refuses duplicate keys and turns deep nesting into a ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except RecursionError:
        raise ValueError(f"{what} nests too deeply") from None
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:  # duplicate keys, integers with too many digits
        raise ValueError(f"{what}: {exc}") from None


def _read(data, kind: str, fields: set[str], limits: DecodeLimits | None):
    """Check sizes and header, return (metadata dict, float32 tensors, limits)."""
    limits = DecodeLimits() if limits is None else limits
    if not isinstance(limits, DecodeLimits):
        raise ValueError(f"limits must be DecodeLimits, got {type(limits).__name__}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise ValueError(f"payload of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    if len(data) < 8:
        raise ValueError(f"payload of {len(data)} bytes is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > limits.max_header_bytes:
        raise ValueError(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if 8 + header_len > len(data):
        raise ValueError(f"header claims {header_len} bytes but the payload has {len(data) - 8}")
    try:
        header_text = data[8:8 + header_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"safetensors header is not UTF-8: {exc}") from None
    header = json_loads_strict(header_text, "safetensors header")
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or METADATA_KEY not in raw_meta:
        raise ValueError(f"metadata lacks the {METADATA_KEY!r} key")
    if len(header) > 2 * limits.max_modules:
        raise ValueError(f"{len(header)} tensors exceed the limit of {2 * limits.max_modules}")
    meta = json_loads_strict(raw_meta[METADATA_KEY], f"metadata {METADATA_KEY!r}")
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"metadata schema is {meta.get('schema')!r}, expected {SCHEMA_VERSION}")
    if meta.get("kind") != kind:
        raise ValueError(f"metadata kind is {meta.get('kind')!r}, expected {kind!r}")
    missing, extra = sorted(fields - meta.keys()), sorted(meta.keys() - fields - _OPTIONAL_FIELDS)
    if missing or extra:
        raise ValueError(f"metadata fields wrong: missing {missing}, unexpected {extra}")
    if meta["dtype"] not in WIRE_DTYPES:
        raise ValueError(f"metadata dtype must be one of {WIRE_DTYPES}, got {meta['dtype']!r}")
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}, "
                             f"expected one of {sorted(_ST_DTYPES)}")
        if _ST_DTYPES[entry["dtype"]][0] != meta["dtype"]:
            raise ValueError(f"tensor {name!r} is {entry['dtype']} but the metadata says {meta['dtype']}")
    try:
        flat = safetensors.deserialize(data)
    except Exception as exc:  # the Rust parser raises SafetensorError and friends
        raise ValueError(f"invalid safetensors payload: {exc}") from None
    tensors = {}
    for name, spec in flat:
        raw = np.frombuffer(bytes(spec["data"]), dtype="<u2" if spec["dtype"] == "BF16" else
                            {"F32": "<f4", "F16": "<f2"}[spec["dtype"]])
        if spec["dtype"] == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        tensors[name] = arr.reshape(spec["shape"])
    return meta, tensors, limits


def _check_max_rank(update: ClientUpdate, max_rank) -> None:
    if max_rank is None:
        return
    for module in update.modules():
        rank = update.module_rank(module)
        cap = max_rank if not isinstance(max_rank, Mapping) else rank_for_module(module, 0, max_rank)
        if isinstance(max_rank, Mapping) and cap == 0:
            continue  # no cap for modules the mapping does not name
        if rank > cap:
            raise ValueError(f"module {module!r} has rank {rank}, above the allowed maximum {cap}")


def decode_update(data: bytes, *, limits: DecodeLimits | None = None,
                  expected_base_model: str | None = None,
                  max_rank: int | Mapping[str, int] | None = None) -> ClientUpdate:
    """Parse and validate untrusted bytes into a `ClientUpdate`; raises `ValueError` with the reason.

    `max_rank` caps every module's rank (an int) or, as a mapping with rank_pattern keys,
    the modules it names (modules it does not name are capped only by `limits.max_rank`).
    """
    try:
        return _decode_update(data, limits, expected_base_model, max_rank)
    except ValueError:
        raise
    except (OverflowError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError) as exc:
        # only ValueError leaves the decoder, whatever the input (e.g. huge JSON integers)
        raise ValueError(f"invalid update: {type(exc).__name__}: {exc}"[:400]) from None


def _build(cls, data, kind: str, fields: set[str], limits):
    """A message of type ``cls`` from untrusted bytes, every field validated."""
    meta, tensors, limits = _read(data, kind, fields, limits)
    obj = cls.__new__(cls)
    for name in fields - {"schema", "kind", "dtype"}:
        setattr(obj, name, meta[name])
    obj.alpha_pattern = meta.get("alpha_pattern", {})
    obj.factors = tensors
    obj._validate(limits)
    return obj


def _decode_update(data, limits, expected_base_model, max_rank) -> ClientUpdate:
    update = _build(ClientUpdate, data, "update", _UPDATE_FIELDS, limits)
    if expected_base_model is not None and update.base_model != expected_base_model:
        raise ValueError(f"base_model {update.base_model!r} does not match the expected {expected_base_model!r}")
    _check_max_rank(update, max_rank)
    return update


def decode_global(data: bytes, *, limits: DecodeLimits | None = None) -> GlobalFactors:
    """Parse and validate bytes from the server into `GlobalFactors`; raises `ValueError`."""
    try:
        return _decode_global(data, limits)
    except ValueError:
        raise
    except (OverflowError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError) as exc:
        raise ValueError(f"invalid global factors: {type(exc).__name__}: {exc}"[:400]) from None


def _decode_global(data, limits) -> GlobalFactors:
    return _build(GlobalFactors, data, "global", _GLOBAL_FIELDS, limits)
