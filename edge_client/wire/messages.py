"""The two messages of the protocol and their validation: client -> server ``ClientUpdate`` and
server -> client ``GlobalFactors``, plus the ``RankSpec`` a client trains at and the
``DecodeLimits`` a decoder enforces on untrusted input.

Everything here depends only on numpy and the standard library. Validation raises
``ValueError`` naming the field and the bad value.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .naming import PATTERN_KEY_RE, factor_keys, module_names, pattern_matches, rank_for_module, scaling, short_name

__all__ = ["RankSpec", "DecodeLimits", "ClientUpdate", "GlobalFactors", "product_norm", "check_rank_pattern",
           "CONTRIBUTION_LIMIT", "MAX_ROUND_REPLIES"]

_MODULE_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MAX_STR = 256
# matching costs modules x keys x key length (linear per pair, see naming.pattern_matches)
MAX_PATTERN_KEYS = 64


@dataclass(kw_only=True, frozen=True)
class RankSpec:
    """A client's LoRA rank: a default rank and a peft-style ``rank_pattern``."""
    rank: int
    rank_pattern: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        for key, value in dict(self.rank_pattern).items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"rank_pattern[{key!r}] must be an int >= 1, got {value!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "rank_pattern", {str(k): int(v) for k, v in dict(self.rank_pattern).items()})

    def module_rank(self, module: str) -> int:
        return rank_for_module(module, self.rank, self.rank_pattern)

    def max_rank(self) -> int:
        return max([self.rank, *self.rank_pattern.values()])

    def min_rank(self) -> int:
        return min([self.rank, *self.rank_pattern.values()])

    def to_json(self) -> dict:
        return {"rank": int(self.rank), "rank_pattern": {k: int(v) for k, v in self.rank_pattern.items()}}

    def label(self) -> str:
        if not self.rank_pattern:
            return str(self.rank)
        return f"{self.rank}|" + ",".join(f"{k}={v}" for k, v in sorted(self.rank_pattern.items()))


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
    # norm-bomb bound: per module, scaling * ||B @ A||_F (the Frobenius norm of the delta
    # s*B@A the module stands for, computed exactly in float64 from the Gram matrices) must
    # not exceed this
    # (1e8 keeps every float32 product and Gram matrix of a round far from overflow; trained
    # LoRA deltas are orders of magnitude smaller, so operators may lower it)
    max_delta_norm: float = 1e8
    # each part of a contribution bounded on its own, not only their products (a reply with
    # B = 0 and alpha = 1e300 has every product 0): per module the LoRA scaling s
    # (alpha / r, or alpha / sqrt(r) with rsLoRA) and the Frobenius norm of each factor
    max_scaling: float = 1e4
    max_factor_norm: float = 1e10

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_header_bytes", "max_rank", "max_modules", "max_dim", "max_num_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive int, got {value!r}")
        for name in ("max_delta_norm", "max_scaling", "max_factor_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"DecodeLimits.{name} must be a finite positive number, got {value!r}")


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


def _pattern_items(name: str, value) -> list:
    """``(key, value)`` pairs of a peft-style pattern dict from an untrusted peer: a bounded number
    of keys, each restricted to names, "." and "\\." (linear matching, no regex features)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict of pattern -> value, got {type(value).__name__}")
    if len(value) > MAX_PATTERN_KEYS:
        raise ValueError(f"{name} has {len(value)} keys, above the limit of {MAX_PATTERN_KEYS}")
    for key in value:
        _check_str(f"{name} key", key)
        if not PATTERN_KEY_RE.fullmatch(key):
            raise ValueError(f"{name} key {key!r} is not an allowed regular expression: only letters, "
                             "digits, '_', '.' and '\\.' are accepted (no quantifiers, groups or alternation)")
        pattern_matches(key, "probe")  # raises on an invalid regex
    return list(value.items())


def check_rank_pattern(value, max_rank: int) -> dict[str, int]:
    return {key: _check_int(f"rank_pattern[{key!r}]", rank, minimum=1, maximum=max_rank)
            for key, rank in _pattern_items("rank_pattern", value)}


_F32_MAX = float(np.finfo(np.float32).max)
# The most replies one round may aggregate with the guarantee below (raFLoRA's partition
# weights amplify a reply's factors by at most this count before the aggregator normalises).
MAX_ROUND_REPLIES = 1 << 20
# Per module, ``num_examples * s * ||B||_F * ||A||_F`` (float64) of one reply must not exceed
# this: any MAX_ROUND_REPLIES accepted replies, each amplified by MAX_ROUND_REPLIES, still sum
# to at most float32's max / 16, so an accepted reply can never make a later one overflow
# (about 1.2e24; trained replies are around 1e14 even with 10^9 claimed examples).
CONTRIBUTION_LIMIT = _F32_MAX / 2.0**48


def product_norm(b: np.ndarray, a: np.ndarray) -> float:
    """``||B @ A||_F`` in float64 from the small Gram matrices, never forming ``B @ A``:
    ``||BA||_F^2 = trace((B^T B)(A A^T))``. Tiny entries do not underflow (float64) and huge
    ones give ``inf`` (never NaN), which every ``<=`` bound rejects."""
    b64 = np.asarray(b, np.float64)
    a64 = np.asarray(a, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    if math.isnan(sq):
        return math.inf
    return math.sqrt(max(sq, 0.0))


def _check_alpha_pattern(value) -> dict[str, float]:
    """peft's ``alpha_pattern`` (pattern -> alpha), keys restricted like ``rank_pattern``'s."""
    return {key: _check_float(f"alpha_pattern[{key!r}]", alpha, positive=True)
            for key, alpha in _pattern_items("alpha_pattern", value)}


def _check_delta_norms(obj, limits: DecodeLimits) -> None:
    """Reject norm bombs, per module, in float64: the delta ``s ||B A||_F`` the update stands for
    (exact, see :func:`product_norm`) against ``limits.max_delta_norm``; the weighted contribution
    ``n s ||B||_F ||A||_F`` (``n`` its num_examples) against :data:`CONTRIBUTION_LIMIT`; and each
    part on its own (``s`` against ``max_scaling``, ``||B||_F`` and ``||A||_F`` against
    ``max_factor_norm``), so that a zero or cancelling product cannot carry a huge scaling or
    factor into the float32 aggregation."""
    weight = float(getattr(obj, "num_examples", 1))
    for module in module_names(obj.factors):
        a_key, b_key = factor_keys(module)
        a, b = obj.factors[a_key], obj.factors[b_key]
        s = obj.module_scaling(module)
        with np.errstate(over="ignore"):
            norm = s * product_norm(b, a)
        if not norm <= limits.max_delta_norm:
            raise ValueError(f"module {module!r}: scaling * ||B A||_F = {norm:.3g} exceeds "
                             f"DecodeLimits.max_delta_norm={limits.max_delta_norm:g}")
        with np.errstate(over="ignore", invalid="ignore"):
            nb = float(np.linalg.norm(np.asarray(b, np.float64)))
            na = float(np.linalg.norm(np.asarray(a, np.float64)))
            contribution = weight * s * nb * na
        if not contribution <= CONTRIBUTION_LIMIT:
            raise ValueError(f"module {module!r}: the weighted contribution num_examples * scaling * ||B|| * ||A|| "
                             f"= {contribution:.3g} (num_examples={weight:g}, scaling={s:.3g}) is not finite in "
                             f"float32 with room for later replies (limit {CONTRIBUTION_LIMIT:.3g})")
        if not s <= limits.max_scaling:
            raise ValueError(f"module {module!r}: LoRA scaling {s:.3g} (alpha={obj.module_alpha(module):.3g}) "
                             f"exceeds DecodeLimits.max_scaling={limits.max_scaling:g}")
        for key, value in ((b_key, nb), (a_key, na)):
            if not value <= limits.max_factor_norm:
                raise ValueError(f"{key}: Frobenius norm {value:.3g} exceeds "
                                 f"DecodeLimits.max_factor_norm={limits.max_factor_norm:g}")


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
        a_key, b_key = factor_keys(module)
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
            if min(arr.shape) < 1:
                raise ValueError(f"{key} has shape {arr.shape}, an empty dimension")
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

    def module_alpha(self, module: str) -> float:
        """``alpha``, or the first ``alpha_pattern`` key matching ``module`` (peft's semantics)."""
        for key, value in (getattr(self, "alpha_pattern", None) or {}).items():
            if pattern_matches(key, module):
                return float(value)
        return float(self.alpha)

    def module_scaling(self, module: str) -> float:
        return scaling(self.module_alpha(module), self.module_rank(module), self.rslora)

    def factors_at_alpha(self) -> dict[str, np.ndarray]:
        """The factors with every ``alpha_pattern`` folded into ``B`` (``B * alpha_m / alpha``), for
        consumers that scale by the single ``alpha``; the same dict when there is no pattern."""
        if not getattr(self, "alpha_pattern", None):
            return self.factors
        out = dict(self.factors)
        for module in self.modules():
            ratio = self.module_alpha(module) / float(self.alpha)
            if ratio != 1.0:
                b_key = factor_keys(module)[1]
                # in float64: the ratio is applied before anything is rounded to float32
                out[b_key] = (np.asarray(out[b_key], np.float64) * ratio).astype(np.float32)
        return out

    def modules(self) -> list[str]:
        return module_names(self.factors)

    def pair(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """``(B, A)`` of ``module``."""
        a_key, b_key = factor_keys(module)
        return self.factors[b_key], self.factors[a_key]

    def module_delta(self, module: str) -> np.ndarray:
        """The weight change ``module`` stands for, ``scaling * B @ A`` (d_out x d_in)."""
        b, a = self.pair(module)
        return self.module_scaling(module) * (b @ a)


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
    alpha_pattern: dict[str, float] = field(default_factory=dict)   # peft's per-module alpha

    def __post_init__(self) -> None:
        self._validate(DecodeLimits())

    def _validate(self, limits: DecodeLimits, check_finite: bool = True) -> None:
        self.alpha_pattern = _check_alpha_pattern(getattr(self, "alpha_pattern", None) or {})
        self.client_id = _check_str("client_id", self.client_id)
        self.num_examples = _check_int("num_examples", self.num_examples, minimum=1,
                                       maximum=limits.max_num_examples)
        self.rank = _check_int("rank", self.rank, minimum=1, maximum=limits.max_rank)
        self.rank_pattern = check_rank_pattern(self.rank_pattern, limits.max_rank)
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
        self.round = _check_int("round", self.round, minimum=0, maximum=2**31 - 1)
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
    alpha_pattern: dict[str, float] = field(default_factory=dict)   # peft's per-module alpha

    def __post_init__(self) -> None:
        self._validate(DecodeLimits())

    def _validate(self, limits: DecodeLimits) -> None:
        self.alpha_pattern = _check_alpha_pattern(getattr(self, "alpha_pattern", None) or {})
        self.rank = _check_int("rank", self.rank, minimum=1, maximum=limits.max_rank)
        self.rank_pattern = check_rank_pattern(self.rank_pattern, limits.max_rank)
        self.alpha = _check_float("alpha", self.alpha, positive=True)
        for name in ("rslora", "merge_into_base"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        self.round = _check_int("round", self.round, minimum=0, maximum=2**31 - 1)
        self.strategy = _check_str("strategy", self.strategy)
        if self.base_model is not None:
            self.base_model = _check_str("base_model", self.base_model)
        self.factors = _check_factors(self.factors, rank=self.rank, rank_pattern=self.rank_pattern,
                                      target_modules=None, exact_rank=False, limits=limits)
        _check_delta_norms(self, limits)
