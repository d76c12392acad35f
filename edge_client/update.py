"""LoRA updates on the wire: client -> server (`ClientUpdate`) and server -> client (`GlobalFactors`).

Both travel as one safetensors file whose ``__metadata__`` holds a single key ``flexlora``
with a JSON string (schema version, ``kind`` and the dataclass fields). Tensors use peft
naming (``<module>.lora_A.weight`` is r x d_in, ``<module>.lora_B.weight`` is d_out x r) and
are float32, float16 or bfloat16 on the wire, float32 in memory. numpy has no bfloat16, so
bfloat16 is written as its raw 16-bit patterns (round to nearest even) under the standard
safetensors ``BF16`` dtype and read back by shifting the bits into float32.

This module depends only on numpy, safetensors and the standard library: the server imports
it and runs `decode_update` on untrusted bytes, which validates everything (sizes first,
then the metadata schema, keys against the target modules, shapes against the ranks,
finite values) and raises `ValueError` naming what is wrong.
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import safetensors

__all__ = [
    "LORA_A_SUFFIX", "LORA_B_SUFFIX", "SCHEMA_VERSION", "WIRE_DTYPES",
    "rank_for_module", "scaling", "module_names", "short_name",
    "ClientUpdate", "GlobalFactors", "DecodeLimits",
    "encode_update", "decode_update", "encode_global", "decode_global",
]

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
SCHEMA_VERSION = 1
METADATA_KEY = "flexlora"
WIRE_DTYPES = ("float32", "float16", "bfloat16")
_ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
_MODULE_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# rank_pattern keys arrive from untrusted peers and are used as regular expressions: only
# names, "." and "\." are allowed (no quantifiers, groups or alternation), so matching is
# linear and a crafted key cannot make the decoder backtrack for minutes.
_PATTERN_KEY_RE = re.compile(r"(?:[A-Za-z0-9_]|\\?\.)+")
_MAX_STR = 256


# --------------------------------------------------------------------------- helpers

def _pattern_matches(key: str, module: str) -> bool:
    try:
        return re.fullmatch(rf"(.*\.)?(?:{key})", module) is not None
    except re.error as exc:
        raise ValueError(f"rank_pattern key {key!r} is not a valid regular expression: {exc}") from None


def rank_for_module(module: str, rank: int, rank_pattern: Mapping[str, int] | None) -> int:
    """Rank of `module` under peft's `rank_pattern` semantics (first matching key wins)."""
    for key, value in (rank_pattern or {}).items():
        if _pattern_matches(key, module):
            return int(value)
    return int(rank)


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    """LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))


def short_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def module_names(factors: Mapping[str, np.ndarray]) -> list[str]:
    """Sorted ``<module>`` names of a peft-named factor dict (keys must end in a LoRA suffix)."""
    names = set()
    for key in factors:
        if key.endswith(LORA_A_SUFFIX):
            names.add(key[: -len(LORA_A_SUFFIX)])
        elif key.endswith(LORA_B_SUFFIX):
            names.add(key[: -len(LORA_B_SUFFIX)])
        else:
            raise ValueError(f"factor key {key!r} ends in neither {LORA_A_SUFFIX!r} nor {LORA_B_SUFFIX!r}")
    return sorted(names)


@dataclass(kw_only=True)
class DecodeLimits:
    """Upper bounds a decoder enforces before and while parsing untrusted bytes."""
    max_bytes: int = 2 * 1024**3
    max_header_bytes: int = 16 * 1024**2
    max_rank: int = 4096
    max_modules: int = 16384
    max_dim: int = 1 << 20
    # a client's weight is its num_examples: the cap keeps one reply from overflowing the
    # float weights (JSON integers are unbounded) or swamping a round by a lie beyond it
    max_num_examples: int = 10**9
    # norm-bomb bound: per module, scaling * ||B||_F * ||A||_F (an upper bound on the
    # Frobenius norm of the delta s*B@A the module stands for) must not exceed this
    # (1e8 keeps every float32 product and Gram matrix of a round far from overflow; trained
    # LoRA deltas are orders of magnitude smaller, so operators may lower it)
    max_delta_norm: float = 1e8

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_header_bytes", "max_rank", "max_modules", "max_dim", "max_num_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive int, got {value!r}")
        value = self.max_delta_norm
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"DecodeLimits.max_delta_norm must be a finite positive number, got {value!r}")


def _check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return float(value)


def _check_str(name: str, value, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > _MAX_STR:
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}string of at most "
                         f"{_MAX_STR} characters, got {value!r:.80}")
    return value


def _check_rank_pattern(value, max_rank: int) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"rank_pattern must be a dict of pattern -> rank, got {type(value).__name__}")
    out = {}
    for key, rank in value.items():
        _check_str("rank_pattern key", key)
        if not _PATTERN_KEY_RE.fullmatch(key):
            raise ValueError(f"rank_pattern key {key!r} is not an allowed regular expression: only letters, "
                             "digits, '_', '.' and '\\.' are accepted (no quantifiers, groups or alternation)")
        _pattern_matches(key, "probe")  # raises on an invalid regex
        out[key] = _check_int(f"rank_pattern[{key!r}]", rank, minimum=1, maximum=max_rank)
    return out


def _check_delta_norms(obj, limits: DecodeLimits) -> None:
    """Reject norm bombs: finite factors whose product is enormous (see DecodeLimits.max_delta_norm)."""
    for module in module_names(obj.factors):
        a = obj.factors[module + LORA_A_SUFFIX]
        b = obj.factors[module + LORA_B_SUFFIX]
        # float32 norms overflow to inf for huge entries, which the comparison rejects too
        with np.errstate(over="ignore"):
            bound = obj.module_scaling(module) * float(np.linalg.norm(a)) * float(np.linalg.norm(b))
        if not bound <= limits.max_delta_norm:
            raise ValueError(f"module {module!r}: scaling * ||B||_F * ||A||_F = {bound:.3g} exceeds "
                             f"DecodeLimits.max_delta_norm={limits.max_delta_norm:g}")


def _check_factors(factors, *, rank: int, rank_pattern: Mapping[str, int], target_modules,
                   exact_rank: bool, limits: DecodeLimits, check_finite: bool = True) -> dict[str, np.ndarray]:
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError("factors must be a non-empty dict of peft-named arrays")
    modules = module_names(factors)
    if len(modules) > limits.max_modules:
        raise ValueError(f"{len(modules)} modules exceed the limit of {limits.max_modules}")
    out: dict[str, np.ndarray] = {}
    seen_targets = set()
    for module in modules:
        if not _MODULE_RE.fullmatch(module):
            raise ValueError(f"module name {module!r} has characters outside [A-Za-z0-9_.]")
        a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
        for key in (a_key, b_key):
            if key not in factors:
                raise ValueError(f"module {module!r} lacks {key!r}")
        if target_modules is not None:
            short = short_name(module)
            if short not in target_modules:
                raise ValueError(f"module {module!r} is not one of the target modules {sorted(target_modules)}")
            seen_targets.add(short)
        a = np.asarray(factors[a_key])
        b = np.asarray(factors[b_key])
        for key, arr in ((a_key, a), (b_key, b)):
            if arr.ndim != 2:
                raise ValueError(f"{key} must be 2-D, has shape {arr.shape}")
            if arr.dtype.kind != "f":
                raise ValueError(f"{key} must be floating point, has dtype {arr.dtype}")
            if max(arr.shape) > limits.max_dim:
                raise ValueError(f"{key} has shape {arr.shape}, a dimension above the limit {limits.max_dim}")
        expected = rank_for_module(module, rank, rank_pattern)
        inner = a.shape[0]
        if b.shape[1] != inner:
            raise ValueError(f"{b_key} has shape {b.shape}, expected {inner} columns to match "
                             f"{a_key} with shape {a.shape}")
        if inner < 1 or inner > limits.max_rank:
            raise ValueError(f"{a_key} has rank {inner}, outside [1, {limits.max_rank}]")
        if exact_rank and inner != expected:
            raise ValueError(f"{a_key} has shape {a.shape}: rank {inner}, but the metadata gives "
                             f"module {module!r} rank {expected}")
        if not exact_rank and inner > expected:
            raise ValueError(f"{a_key} has rank {inner}, above the declared rank {expected} of {module!r}")
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        b32 = np.ascontiguousarray(b, dtype=np.float32)
        if check_finite:
            for key, arr in ((a_key, a32), (b_key, b32)):
                if not np.isfinite(arr).all():
                    raise ValueError(f"{key} contains NaN or Inf")
        out[a_key], out[b_key] = a32, b32
    if target_modules is not None:
        missing = sorted(set(target_modules) - seen_targets)
        if missing:
            raise ValueError(f"target modules {missing} have no factors")
    return out


# --------------------------------------------------------------------------- dataclasses

class _RankedFactors:
    """Per-module rank and LoRA scaling of a message with ``factors``, ``rank``,
    ``rank_pattern``, ``alpha`` and ``rslora`` (ClientUpdate and GlobalFactors)."""

    def module_rank(self, module: str) -> int:
        return rank_for_module(module, self.rank, self.rank_pattern)

    def module_scaling(self, module: str) -> float:
        return scaling(self.alpha, self.module_rank(module), self.rslora)

    def modules(self) -> list[str]:
        return module_names(self.factors)


@dataclass(kw_only=True)
class ClientUpdate(_RankedFactors):
    """One client's trained adapter and the facts the server needs to weight and scale it."""
    client_id: str
    factors: dict[str, np.ndarray]
    num_examples: int
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha: float
    rslora: bool = False
    base_model: str
    target_modules: list[str]
    round: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate(DecodeLimits())

    def _validate(self, limits: DecodeLimits, check_finite: bool = True) -> None:
        self.client_id = _check_str("client_id", self.client_id)
        self.num_examples = _check_int("num_examples", self.num_examples, minimum=1,
                                       maximum=limits.max_num_examples)
        self.rank = _check_int("rank", self.rank, minimum=1, maximum=limits.max_rank)
        self.rank_pattern = _check_rank_pattern(self.rank_pattern, limits.max_rank)
        self.alpha = _check_float("alpha", self.alpha, positive=True)
        if not isinstance(self.rslora, (bool, np.bool_)):
            raise ValueError(f"rslora must be a bool, got {self.rslora!r}")
        self.rslora = bool(self.rslora)
        self.base_model = _check_str("base_model", self.base_model)
        if (not isinstance(self.target_modules, (list, tuple)) or not self.target_modules
                or len(self.target_modules) > limits.max_modules):
            raise ValueError(f"target_modules must be a non-empty list of short module names, "
                             f"got {self.target_modules!r:.80}")
        for i, name in enumerate(self.target_modules):
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"target_modules[{i}] must be a short module name like 'q_proj', got {name!r}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules has duplicates: {self.target_modules}")
        self.target_modules = list(self.target_modules)
        self.round = _check_int("round", self.round, minimum=0)
        if not isinstance(self.metrics, Mapping) or len(self.metrics) > 256:
            raise ValueError("metrics must be a dict of at most 256 name -> number entries")
        self.metrics = {_check_str("metrics key", k): _check_float(f"metrics[{k!r}]", v)
                        for k, v in self.metrics.items()}
        self.factors = _check_factors(self.factors, rank=self.rank, rank_pattern=self.rank_pattern,
                                      target_modules=set(self.target_modules), exact_rank=True,
                                      limits=limits, check_finite=check_finite)
        if check_finite:
            _check_delta_norms(self, limits)



@dataclass(kw_only=True)
class GlobalFactors(_RankedFactors):
    """Server -> client: factors at the client's rank (inner rank may be lower: zero-padded on load).

    The delta a module stands for is ``scaling(alpha, module rank, rslora) * B @ A``. With
    ``merge_into_base`` (FLoRA) the client merges that delta into its base weights and starts a
    fresh adapter instead of loading the factors as its adapter.
    """
    factors: dict[str, np.ndarray]
    rank: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha: float
    rslora: bool = False
    round: int = 0
    strategy: str = "flexlora"
    base_model: str | None = None
    merge_into_base: bool = False

    def __post_init__(self) -> None:
        self._validate(DecodeLimits())

    def _validate(self, limits: DecodeLimits) -> None:
        self.rank = _check_int("rank", self.rank, minimum=1, maximum=limits.max_rank)
        self.rank_pattern = _check_rank_pattern(self.rank_pattern, limits.max_rank)
        self.alpha = _check_float("alpha", self.alpha, positive=True)
        for name in ("rslora", "merge_into_base"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        self.round = _check_int("round", self.round, minimum=0)
        self.strategy = _check_str("strategy", self.strategy)
        if self.base_model is not None:
            self.base_model = _check_str("base_model", self.base_model)
        self.factors = _check_factors(self.factors, rank=self.rank, rank_pattern=self.rank_pattern,
                                      target_modules=None, exact_rank=False, limits=limits)
        _check_delta_norms(self, limits)



# --------------------------------------------------------------------------- encoding

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
    return _serialize(update.factors, dtype, meta)


def encode_global(g: GlobalFactors, *, dtype: str = "float32") -> bytes:
    """Serialise `GlobalFactors` to safetensors bytes."""
    if not isinstance(g, GlobalFactors):
        raise ValueError(f"g must be GlobalFactors, got {type(g).__name__}")
    g._validate(DecodeLimits())
    meta = {"schema": SCHEMA_VERSION, "kind": "global", "dtype": dtype, "rank": g.rank,
            "rank_pattern": g.rank_pattern, "alpha": g.alpha, "rslora": g.rslora, "round": g.round,
            "strategy": g.strategy, "base_model": g.base_model, "merge_into_base": g.merge_into_base}
    return _serialize(g.factors, dtype, meta)


# --------------------------------------------------------------------------- decoding

_UPDATE_FIELDS = {"schema", "kind", "dtype", "client_id", "num_examples", "rank", "rank_pattern",
                  "alpha", "rslora", "base_model", "target_modules", "round", "metrics"}
_GLOBAL_FIELDS = {"schema", "kind", "dtype", "rank", "rank_pattern", "alpha", "rslora", "round",
                  "strategy", "base_model", "merge_into_base"}


def _reject_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"JSON object has the key {key!r} more than once")
        out[key] = value
    return out


def _json_loads(text, what: str):
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
    header = _json_loads(header_text, "safetensors header")
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    if not isinstance(raw_meta, dict) or METADATA_KEY not in raw_meta:
        raise ValueError(f"metadata lacks the {METADATA_KEY!r} key")
    if len(header) > 2 * limits.max_modules:
        raise ValueError(f"{len(header)} tensors exceed the limit of {2 * limits.max_modules}")
    meta = _json_loads(raw_meta[METADATA_KEY], f"metadata {METADATA_KEY!r}")
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"metadata schema is {meta.get('schema')!r}, expected {SCHEMA_VERSION}")
    if meta.get("kind") != kind:
        raise ValueError(f"metadata kind is {meta.get('kind')!r}, expected {kind!r}")
    missing, extra = sorted(fields - meta.keys()), sorted(meta.keys() - fields)
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
    meta, tensors, limits = _read(data, "update", _UPDATE_FIELDS, limits)
    update = ClientUpdate.__new__(ClientUpdate)
    for name in _UPDATE_FIELDS - {"schema", "kind", "dtype"}:
        setattr(update, name, meta[name])
    update.factors = tensors
    update._validate(limits)
    if expected_base_model is not None and update.base_model != expected_base_model:
        raise ValueError(f"base_model {update.base_model!r} does not match the expected {expected_base_model!r}")
    _check_max_rank(update, max_rank)
    return update


def decode_global(data: bytes, *, limits: DecodeLimits | None = None) -> GlobalFactors:
    """Parse and validate bytes from the server into `GlobalFactors`; raises `ValueError`."""
    meta, tensors, limits = _read(data, "global", _GLOBAL_FIELDS, limits)
    g = GlobalFactors.__new__(GlobalFactors)
    for name in _GLOBAL_FIELDS - {"schema", "kind", "dtype"}:
        setattr(g, name, meta[name])
    g.factors = tensors
    g._validate(limits)
    return g
