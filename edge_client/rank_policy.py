"""Choose the largest LoRA rank (or per-module rank pattern) whose predicted peak memory fits.

Usage for a real device::

    choice = choose_rank(probe(), config, allowed_ranks=[8, 16, 32, 64], batch=4, seq_len=512)

and for a simulated device with a given budget::

    profile = DeviceProfile.simulated(memory_bytes=3 * 2**30)
    choice = choose_rank(profile, config, candidates=paper_candidates(), batch=1, seq_len=256)
    choice.rank, choice.rank_pattern          # e.g. 30, {"gate_proj": 200, "up_proj": 200, ...}

The budget is the profile's `memory_budget_bytes` minus `system_reserve_bytes`; a candidate fits
when its estimate times ``1 + safety_margin`` is within the budget. Candidates are ordered by
their estimate, so the choice never goes down when the budget goes up.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .memory import MemoryEstimate, estimate, fmt_bytes
from .resources import DeviceProfile

__all__ = ["RankCandidate", "RankChoice", "NoRankFitsError", "choose_rank", "paper_candidates",
           "attn_ffn_pattern", "ATTN_MODULES", "FFN_MODULES", "DEFAULT_TARGETS"]

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTN_MODULES + FFN_MODULES


@dataclass(frozen=True, kw_only=True)
class RankCandidate:
    """A default rank plus optional peft-style per-module overrides."""
    rank: int
    rank_pattern: tuple[tuple[str, int], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"RankCandidate.rank must be an int >= 1, got {self.rank!r}")
        for key, value in self.rank_pattern:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RankCandidate.rank_pattern[{key!r}] must be an int >= 1, got {value!r}")

    @property
    def pattern(self) -> dict[str, int]:
        return dict(self.rank_pattern)

    @property
    def name(self) -> str:
        return self.label or (f"r{self.rank}" + "".join(f",{k}={v}" for k, v in self.rank_pattern))


def attn_ffn_pattern(attn: int, ffn: int, *, ffn_modules: Sequence[str] = FFN_MODULES) -> RankCandidate:
    """The paper's mixed client type: `attn` on attention projections, `ffn` on the FFN ones."""
    pattern = tuple((m, ffn) for m in ffn_modules) if ffn != attn else ()
    return RankCandidate(rank=attn, rank_pattern=pattern, label=f"r{attn}" if ffn == attn else f"r{attn}_{ffn}")


def paper_candidates(types: Mapping[str, Mapping[str, int]] | None = None) -> list[RankCandidate]:
    """Client types of workloads.json (attn/ffn ranks); defaults to r8, r30, r30_200, r200."""
    types = types or {"r8": {"attn": 8, "ffn": 8}, "r30": {"attn": 30, "ffn": 30},
                      "r30_200": {"attn": 30, "ffn": 200}, "r200": {"attn": 200, "ffn": 200}}
    out = []
    for label, ranks in types.items():
        c = attn_ffn_pattern(int(ranks["attn"]), int(ranks["ffn"]))
        out.append(RankCandidate(rank=c.rank, rank_pattern=c.rank_pattern, label=label))
    return out


class NoRankFitsError(ValueError):
    """Even the smallest candidate does not fit; carries the bytes needed and available."""

    def __init__(self, message: str, *, needed_bytes: int, available_bytes: int):
        super().__init__(message)
        self.needed_bytes, self.available_bytes = needed_bytes, available_bytes


@dataclass(kw_only=True)
class RankChoice:
    rank: int
    rank_pattern: dict[str, int]
    label: str
    estimate: MemoryEstimate
    needed_bytes: int            # estimate x (1 + margin)
    budget_bytes: int            # device budget minus the reserve
    device_budget_bytes: int
    reserve_bytes: int
    safety_margin: float
    considered: list[dict] = field(default_factory=list)   # label, rank, rank_pattern, total, needed, fits
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "rank_pattern": self.rank_pattern, "label": self.label,
                "estimate": self.estimate.to_dict(), "needed_bytes": self.needed_bytes,
                "budget_bytes": self.budget_bytes, "device_budget_bytes": self.device_budget_bytes,
                "reserve_bytes": self.reserve_bytes, "safety_margin": self.safety_margin,
                "considered": self.considered, "reasons": self.reasons}


_CACHE: dict[tuple, MemoryEstimate] = {}


def cached_estimate(model_config, targets, candidate: RankCandidate, **kwargs) -> MemoryEstimate:
    """`memory.estimate`, memoised on the config and arguments (many simulated clients share them)."""
    cfg = model_config if isinstance(model_config, Mapping) else model_config.to_dict()
    key = (json.dumps(cfg, sort_keys=True, default=str), tuple(targets), candidate.rank,
           candidate.rank_pattern, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = estimate(model_config, list(targets), candidate.rank, candidate.pattern, **kwargs)
    return _CACHE[key]


def choose_rank(profile: DeviceProfile, model_config, allowed_ranks: Sequence[int] | None = None, *,
                candidates: Sequence[RankCandidate] | None = None,
                targets: Sequence[str] = DEFAULT_TARGETS, batch: int = 1, seq_len: int = 256,
                dtype: str = "float32", optimizer: str = "adamw", gradient_checkpointing: bool = False,
                safety_margin: float = 0.10, system_reserve_bytes: int = 256 * 2**20,
                estimate_kwargs: Mapping | None = None) -> RankChoice:
    """Pick the candidate with the largest predicted need that still fits the device.

    Give either `allowed_ranks` (uniform ranks) or `candidates` (ranks with patterns, e.g.
    `paper_candidates()`); both together are merged. Raises `NoRankFitsError` (a `ValueError`)
    saying how much the smallest candidate needs and how much there is.
    """
    if not isinstance(profile, DeviceProfile):
        raise ValueError(f"profile must be a DeviceProfile, got {type(profile).__name__}")
    if not 0 <= safety_margin < 10:
        raise ValueError(f"safety_margin must be in [0, 10), got {safety_margin!r}")
    if system_reserve_bytes < 0:
        raise ValueError(f"system_reserve_bytes must be >= 0, got {system_reserve_bytes!r}")
    pool = list(candidates or [])
    for i, r in enumerate(allowed_ranks or []):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"allowed_ranks[{i}] must be an int >= 1, got {r!r}")
        pool.append(RankCandidate(rank=r))
    if not pool:
        raise ValueError("give allowed_ranks or candidates")
    kwargs = dict(batch=batch, seq_len=seq_len, dtype=dtype, optimizer=optimizer,
                  gradient_checkpointing=gradient_checkpointing, **dict(estimate_kwargs or {}))
    scored = []
    for c in pool:
        est = cached_estimate(model_config, targets, c, **kwargs)
        scored.append((est.total, c.rank, c.rank_pattern, c, est))
    scored.sort(key=lambda s: s[:3])
    device_budget = profile.memory_budget_bytes
    budget = device_budget - system_reserve_bytes
    considered, best = [], None
    for total, _, _, c, est in scored:
        needed = int(total * (1 + safety_margin))
        fits = needed <= budget
        considered.append({"label": c.name, "rank": c.rank, "rank_pattern": c.pattern, "total": total,
                           "needed": needed, "fits": fits})
        if fits:
            best = (c, est, needed)
    if best is None:
        smallest = considered[0]
        raise NoRankFitsError(
            f"no LoRA rank fits: the smallest candidate {smallest['label']} needs {fmt_bytes(smallest['needed'])} "
            f"(estimate {fmt_bytes(smallest['total'])} + {safety_margin:.0%} margin) but only "
            f"{fmt_bytes(max(budget, 0))} is available ({fmt_bytes(device_budget)} free minus "
            f"{fmt_bytes(system_reserve_bytes)} reserve); lower batch or seq_len, enable gradient "
            f"checkpointing, or use a smaller model",
            needed_bytes=smallest["needed"], available_bytes=max(budget, 0))
    c, est, needed = best
    larger = [x for x in considered if not x["fits"]]
    reasons = [f"budget {fmt_bytes(budget)} = {fmt_bytes(device_budget)} free - {fmt_bytes(system_reserve_bytes)} reserve",
               f"{c.name} needs {fmt_bytes(needed)} (estimate {fmt_bytes(est.total)} + {safety_margin:.0%} margin): fits"]
    if larger:
        reasons.append(f"next candidate {larger[0]['label']} needs {fmt_bytes(larger[0]['needed'])}: does not fit")
    else:
        reasons.append("largest candidate offered")
    return RankChoice(rank=c.rank, rank_pattern=c.pattern, label=c.name, estimate=est, needed_bytes=needed,
                      budget_bytes=budget, device_budget_bytes=device_budget, reserve_bytes=system_reserve_bytes,
                      safety_margin=safety_margin, considered=considered, reasons=reasons)
