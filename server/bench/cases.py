"""Benchmark inputs: dense matrices with a chosen spectrum, and factored LoRA sums.

A :class:`CaseSpec` is a small JSON-serialisable description; :meth:`CaseSpec.build` turns it
into a :class:`Case` deterministically from its seed, so a fresh worker process (the
``--memory subprocess`` mode) rebuilds exactly the same input without anything being pickled.

Spectra of the dense cases (``i = 0 .. min(m, n) - 1``, ``k`` the target rank):

* ``fast``: ``s_i = exp(-10 i / k)``; the tail past ``k`` is ~1e-4 of the top value, the easy
  case for randomized methods.
* ``slow``: ``s_i = (1 + i) ** -0.5``; a heavy tail, the hard case for randomized methods.
* ``flat``: ``s_i = 1``; no gap at all, the singular subspace is not unique.

The matrix is ``Q1 diag(s) Q2^T`` with ``Q1, Q2`` from the QR of seeded Gaussian matrices.

Factored LoRA sums follow DESIGN.md: client ``k`` holds ``B_k`` (d_out x r_k), ``A_k``
(r_k x d_in), weight ``p_k s_k`` with ``p_k = n_k / sum(n)`` and ``s_k = alpha / r_k``. Client
ranks come from a rank mix in ``server/assets/workloads.json``. To give the sum the decaying,
correlated spectrum of trained adapters (rather than the flat one of pure noise), every
client's factors are half a shared Gaussian basis and half their own, with column scales
``1 / (1 + j)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

SPECTRA = ("fast", "slow", "flat")
KINDS = ("dense", "factored")
LORA_ALPHA_DEFAULT = 16.0


@dataclass(kw_only=True, frozen=True)
class CaseSpec:
    """What to benchmark: one matrix (dense with a spectrum, or a factored LoRA sum) and a rank."""

    kind: str
    d_out: int
    d_in: int
    rank: int
    spectrum: str | None = None
    client_ranks: tuple[int, ...] = ()
    rank_mix: str | None = None
    alpha: float = LORA_ALPHA_DEFAULT
    seed: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("d_out", "d_in", "rank"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.rank > min(self.d_out, self.d_in):
            raise ValueError(
                f"rank must be at most min(d_out, d_in) = {min(self.d_out, self.d_in)}, got {self.rank}"
            )
        if self.kind == "dense" and self.spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA} for a dense case, got {self.spectrum!r}")
        if self.kind == "factored":
            if not self.client_ranks:
                raise ValueError("client_ranks must be non-empty for a factored case")
            for i, r in enumerate(self.client_ranks):
                if not isinstance(r, (int, np.integer)) or r < 1:
                    raise ValueError(f"client_ranks[{i}] must be a positive integer, got {r!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be positive and finite, got {self.alpha!r}")
        if not self.label:
            object.__setattr__(self, "label", self.default_label())

    def default_label(self) -> str:
        shape = f"{self.d_out}x{self.d_in}"
        if self.kind == "dense":
            return f"{shape} {self.spectrum} k={self.rank}"
        mix = self.rank_mix or "custom"
        return f"{shape} {mix} K={len(self.client_ranks)} R={sum(self.client_ranks)} k={self.rank}"

    @property
    def total_rank(self) -> int:
        return int(sum(self.client_ranks))

    def to_json(self) -> dict:
        d = asdict(self)
        d["client_ranks"] = list(self.client_ranks)
        return d

    @classmethod
    def from_json(cls, data: dict) -> "CaseSpec":
        data = dict(data)
        data["client_ranks"] = tuple(int(r) for r in data.get("client_ranks", ()))
        return cls(**data)

    def build(self) -> "Case":
        rng = np.random.default_rng(self.seed)
        if self.kind == "dense":
            return Case(spec=self, dense=_spectrum_matrix(rng, self.d_out, self.d_in, self.rank, self.spectrum))
        Bs, As, weights = _lora_factors(rng, self.d_out, self.d_in, self.client_ranks, self.alpha)
        return Case(spec=self, Bs=Bs, As=As, weights=weights)


@dataclass(kw_only=True)
class Case:
    """A built input. ``matrix`` is the dense M (formed once, lazily, for factored cases)."""

    spec: CaseSpec
    dense: np.ndarray | None = None
    Bs: list[np.ndarray] = field(default_factory=list)
    As: list[np.ndarray] = field(default_factory=list)
    weights: np.ndarray | None = None
    _truth: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        if self.dense is None:
            self.dense = form_dense(self.Bs, self.As, self.weights)
        return self.dense

    def truth_singular_values(self) -> np.ndarray:
        """All singular values of M in float64 (LAPACK gesdd, values only), computed once."""
        if self._truth is None:
            self._truth = np.linalg.svd(self.matrix.astype(np.float64), compute_uv=False)
        return self._truth


def form_dense(Bs: list[np.ndarray], As: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_k w_k B_k A_k`` as one GEMM over the concatenated factors (float32)."""
    B_cat = np.concatenate(Bs, axis=1)
    A_cat = np.concatenate([w * A for w, A in zip(weights, As)], axis=0).astype(np.float32, copy=False)
    return B_cat @ A_cat


def spectrum_values(name: str, n: int, rank: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    if name == "fast":
        return np.exp(-10.0 * i / rank)
    if name == "slow":
        return (1.0 + i) ** -0.5
    if name == "flat":
        return np.ones(n)
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {name!r}")


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols), dtype=np.float32))
    return q


def _spectrum_matrix(rng, m: int, n: int, rank: int, name: str) -> np.ndarray:
    p = min(m, n)
    s = spectrum_values(name, p, rank).astype(np.float32)
    q1 = _orthonormal(rng, m, p)
    q2 = _orthonormal(rng, n, p)
    return np.ascontiguousarray((q1 * s) @ q2.T, dtype=np.float32)


def _lora_factors(rng, d_out: int, d_in: int, ranks, alpha: float):
    r_max = max(ranks)
    shared_B = rng.standard_normal((d_out, r_max), dtype=np.float32) / np.float32(math.sqrt(d_out))
    shared_A = rng.standard_normal((r_max, d_in), dtype=np.float32) / np.float32(math.sqrt(d_in))
    examples = rng.integers(50, 500, size=len(ranks)).astype(np.float64)
    p = examples / examples.sum()
    Bs, As, weights = [], [], []
    half = np.float32(math.sqrt(0.5))
    for k, r in enumerate(ranks):
        scale = (1.0 / (1.0 + np.arange(r, dtype=np.float32))).astype(np.float32)
        own_B = rng.standard_normal((d_out, r), dtype=np.float32) / np.float32(math.sqrt(d_out))
        own_A = rng.standard_normal((r, d_in), dtype=np.float32) / np.float32(math.sqrt(d_in))
        Bs.append(np.ascontiguousarray(half * (shared_B[:, :r] + own_B) * scale))
        As.append(np.ascontiguousarray(half * (shared_A[:r] + own_A)))
        weights.append(p[k] * alpha / r)
    return Bs, As, np.asarray(weights, dtype=np.float64)



ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def target_group(target: str) -> str:
    """``"attn"`` or ``"ffn"``: which rank of a client type (workloads.json) a LoRA target gets."""
    return "attn" if target in ATTN_TARGETS else "ffn"


def lora_module_shapes(model: dict) -> dict[str, tuple[int, int]]:
    """``{target: (d_out, d_in)}`` for the seven LoRA targets of a LLaMA-shaped model entry."""
    h, f, kv = model["hidden"], model["ffn"], model.get("kv_dim", model["hidden"])
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def module_shapes(workloads: dict, model: str) -> dict[str, tuple[int, int, str]]:
    """``{name: (d_out, d_in, group)}`` for the distinct LoRA module shapes of ``model``."""
    models = workloads["models"]
    if model not in models:
        raise ValueError(f"model must be one of {sorted(models)}, got {model!r}")
    shapes = lora_module_shapes(models[model])
    names = ("q_proj", "up_proj", "down_proj") + (("k_proj",) if shapes["k_proj"] != shapes["q_proj"] else ())
    return {t: (*shapes[t], target_group(t)) for t in names}


def type_counts(shares: dict[str, float], n: int) -> dict[str, int]:
    """How many of ``n`` clients each type gets, in the proportions ``shares``: largest remainder,
    ties broken by the order of ``shares``."""
    exact = {t: p * n for t, p in shares.items()}
    counts = {t: int(math.floor(v)) for t, v in exact.items()}
    left = n - sum(counts.values())
    for t in sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)[:left]:
        counts[t] += 1
    return counts


def client_types(shares: dict[str, float], n: int) -> list[str]:
    """``n`` client type names in the proportions ``shares`` (:func:`type_counts`), grouped by type."""
    counts = type_counts(shares, n)
    return [t for t in shares for _ in range(counts[t])]


def client_ranks_for_mix(workloads: dict, mix: str, clients: int, group: str, rank_scale: float = 1.0) -> tuple[int, ...]:
    """Client ranks for ``clients`` clients drawn from a rank mix (largest-remainder rounding)."""
    dists = workloads["rank_distributions"]
    if mix not in dists:
        raise ValueError(f"rank mix must be one of {sorted(dists)}, got {mix!r}")
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if not rank_scale > 0:
        raise ValueError(f"rank_scale must be positive, got {rank_scale}")
    types = workloads["client_types"]
    counts = type_counts(dists[mix], clients)
    ranks: list[int] = []
    for t in types:
        r = max(1, int(round(types[t][group] * rank_scale)))
        ranks.extend([r] * counts.get(t, 0))
    return tuple(ranks)


# ---- hand-off to worker processes (safetensors + JSON, never pickle) ---------------------

def save_case(case: Case, path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    if case.dense is not None:
        tensors["M"] = np.ascontiguousarray(case.dense)
    for i, (B, A) in enumerate(zip(case.Bs, case.As)):
        tensors[f"B.{i}"], tensors[f"A.{i}"] = B, A
    if case.weights is not None:
        tensors["weights"] = np.asarray(case.weights, dtype=np.float64)
    save_file(tensors, str(path), metadata={"spec": json.dumps(case.spec.to_json())})


def load_case(path: str | os.PathLike) -> Case:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        spec = CaseSpec.from_json(json.loads(f.metadata()["spec"]))
        keys = set(f.keys())
        n = len(spec.client_ranks) if spec.kind == "factored" else 0
        return Case(spec=spec, dense=f.get_tensor("M") if "M" in keys else None,
                    Bs=[f.get_tensor(f"B.{i}") for i in range(n)], As=[f.get_tensor(f"A.{i}") for i in range(n)],
                    weights=f.get_tensor("weights") if "weights" in keys else None)
