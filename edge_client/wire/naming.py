"""peft naming, LoRA scaling and rank patterns: the vocabulary both sides of the wire share.

A LoRA module ``<module>`` is a pair of tensors named as peft names them,
``<module>.lora_A.weight`` (r x d_in) and ``<module>.lora_B.weight`` (d_out x r); the delta it
stands for is ``scaling(alpha, r, rslora) * B @ A``. Per-module ranks follow peft's
``rank_pattern`` semantics (:func:`rank_for_module`). Every other module of the project imports
these names instead of spelling them again.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["LORA_A_SUFFIX", "LORA_B_SUFFIX", "factor_keys", "module_names", "short_name",
           "group_factor_halves", "split_factors", "join_factors", "rank_for_module", "scaling",
           "PATTERN_KEY_RE", "pattern_matches"]

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
# rank_pattern keys arrive from untrusted peers and are used as regular expressions: only
# names, "." and "\." are allowed (no quantifiers, groups or alternation), so matching is
# linear and a crafted key cannot make the decoder backtrack for minutes.
PATTERN_KEY_RE = re.compile(r"(?:[A-Za-z0-9_]|\\?\.)+")


def factor_keys(module: str) -> tuple[str, str]:
    """``(<module>.lora_A.weight, <module>.lora_B.weight)``."""
    return module + LORA_A_SUFFIX, module + LORA_B_SUFFIX


def short_name(module: str) -> str:
    """``...layers.0.self_attn.q_proj`` -> ``q_proj``."""
    return module.rsplit(".", 1)[-1]


def group_factor_halves(factors: Mapping[str, Any], who: str = "factors") -> dict[str, dict[str, Any]]:
    """peft-named factors -> ``{module: {"A": ..., "B": ...}}`` with the arrays untouched (a half
    may be missing: the caller decides whether that is an error)."""
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError(f"{who}: factors must be a non-empty mapping of peft-named arrays")
    halves: dict[str, dict[str, Any]] = {}
    for key, value in factors.items():
        if not isinstance(key, str):
            raise ValueError(f"{who}: factor key {key!r} is not a string")
        if key.endswith(LORA_A_SUFFIX):
            halves.setdefault(key[: -len(LORA_A_SUFFIX)], {})["A"] = value
        elif key.endswith(LORA_B_SUFFIX):
            halves.setdefault(key[: -len(LORA_B_SUFFIX)], {})["B"] = value
        else:
            raise ValueError(f"{who}: factor key {key!r} ends in neither {LORA_A_SUFFIX!r} "
                             f"nor {LORA_B_SUFFIX!r}")
    return halves


def module_names(factors: Mapping[str, Any]) -> list[str]:
    """Sorted ``<module>`` names of a peft-named factor dict (keys must end in a LoRA suffix)."""
    return sorted(group_factor_halves(factors))


def split_factors(factors: Mapping[str, Any], who: str = "factors",
                  convert: Callable[[Any, str], Any] | None = None,
                  required: bool = False) -> dict[str, tuple[Any, Any]]:
    """peft-named dict -> ``{module: (B, A)}`` in sorted module order: the one splitter of
    factor dicts. Both halves must be present and their ranks agree (``B.shape[1] ==
    A.shape[0]``). ``convert(x, name)`` turns each half into the array the caller keeps (and
    checks it, naming ``name``); the default is a float32 numpy array. An empty mapping gives
    ``{}``, or an error with ``required``."""
    if not factors and not required:
        return {}
    conv = convert or (lambda x, _name: np.asarray(x, np.float32))
    out: dict[str, tuple[Any, Any]] = {}
    halves = group_factor_halves(factors, who)
    for module in sorted(halves):
        h = halves[module]
        a_key, b_key = factor_keys(module)
        for part, key in (("A", a_key), ("B", b_key)):
            if part not in h:
                raise ValueError(f"{who}: {key!r} is missing")
        B, A = conv(h["B"], f"{who} {b_key}"), conv(h["A"], f"{who} {a_key}")
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"{who}: module {module!r} has lora_B with {B.shape[1]} columns but "
                             f"lora_A with {A.shape[0]} rows (ranks must agree)")
        out[module] = (B, A)
    return out


def join_factors(modules: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{module: (B, A)}`` -> peft-named dict (float32, C-contiguous)."""
    out: dict[str, np.ndarray] = {}
    for module, (b, a) in modules.items():
        a_key, b_key = factor_keys(module)
        out[a_key] = np.ascontiguousarray(a, dtype=np.float32)
        out[b_key] = np.ascontiguousarray(b, dtype=np.float32)
    return out


def _literal_tokens(key: str) -> list[str | None] | None:
    """A PATTERN_KEY_RE key as fixed-width tokens (a character, or None for an unescaped '.',
    which matches any character); None when the key is not of that form."""
    if not PATTERN_KEY_RE.fullmatch(key):
        return None
    tokens: list[str | None] = []
    i = 0
    while i < len(key):
        if key[i] == "\\":
            tokens.append(".")
            i += 2
        else:
            tokens.append(None if key[i] == "." else key[i])
            i += 1
    return tokens


def pattern_matches(key: str, module: str) -> bool:
    # the keys peers may send (PATTERN_KEY_RE) match a fixed-width suffix: linear, no regex
    tokens = _literal_tokens(key)
    if tokens is not None:
        n = len(tokens)
        if len(module) < n or (len(module) > n and module[-n - 1] != "."):
            return False
        tail = module[len(module) - n:]
        return all(t is None or t == c for t, c in zip(tokens, tail))
    try:
        return re.fullmatch(rf"(.*\.)?(?:{key})", module) is not None
    except re.error as exc:
        raise ValueError(f"rank_pattern key {key!r} is not a valid regular expression: {exc}") from None


def rank_for_module(module: str, rank: int, rank_pattern: Mapping[str, int] | None) -> int:
    """Rank of ``module`` under peft's ``rank_pattern`` semantics (first matching key wins)."""
    for key, value in (rank_pattern or {}).items():
        if pattern_matches(key, module):
            return int(value)
    return int(rank)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))
