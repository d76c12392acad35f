"""Spectrum diagnostic: how much of the global update each client's rank can carry.

For a module's global update ``dW`` with singular values ``s_1 >= s_2 >= ...`` the share of
``||dW||_F^2`` a client at rank ``r`` receives under the Eckart-Young optimal truncation is
``sum_{i<=r} s_i^2 / sum_i s_i^2`` (the paper's singular-value analysis, Bai et al. 2024,
Sec. 4). When that share is already close to 1 at the federation's *smallest* rank, the
larger-rank clients get almost nothing their rank could add: the global update has
collapsed onto the smallest rank ("rank collapse" of SVD-based heterogeneous aggregation,
arXiv 2602.13486). ``collapse_warning`` flags that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["retained_energy", "module_spectrum", "spectrum_summary", "collapse_warning"]


def retained_energy(singular_values: np.ndarray, ranks: Iterable[int]) -> dict[int, float]:
    """``{r: sum_{i<=r} s_i^2 / sum s_i^2}``; a zero update retains nothing (0.0)."""
    s = np.asarray(singular_values, np.float64)
    if s.ndim != 1 or np.any(~np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular_values must be a 1-D array of finite values >= 0")
    energy = np.cumsum(s ** 2)
    total = float(energy[-1]) if energy.size else 0.0
    out = {}
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"ranks must be ints >= 1, got {r!r}")
        out[int(r)] = float(energy[min(int(r), s.size) - 1] / total) if total > 0 else 0.0
    return out


def _effective_rank(s: np.ndarray) -> float:
    """exp of the entropy of the normalised energy spectrum (Roy & Vetterli 2007)."""
    p = s ** 2
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def module_spectrum(delta: Mapping[str, np.ndarray], ranks: Mapping[str, Sequence[int]]) -> dict[str, dict]:
    """Per module: retained share at each of the module's client ranks, energy, effective rank.

    ``ranks[module]`` lists the distinct ranks clients use for that module."""
    out = {}
    for module, dw in sorted(delta.items()):
        if module not in ranks:
            raise ValueError(f"ranks has no entry for module {module!r}")
        s = np.linalg.svd(np.asarray(dw, np.float64), compute_uv=False)
        out[module] = {"retained": {str(r): v for r, v in retained_energy(s, sorted(set(ranks[module]))).items()},
                       "energy": float((s ** 2).sum()), "effective_rank": _effective_rank(s)}
    return out


def spectrum_summary(per_module: Mapping[str, Mapping]) -> dict:
    """Mean over modules of the retained share at the smallest and largest client rank, and
    of the effective rank (modules are equal-weighted: each is its own update). Where some
    modules have more than one client rank, only those count (a module every client trains at
    one rank retains everything and would hide a collapse elsewhere)."""
    if not per_module:
        return {"min_rank_share": None, "max_rank_share": None, "effective_rank": None}
    hetero = {k: v for k, v in per_module.items() if len(v["retained"]) > 1}
    per_module = hetero or per_module
    lo, hi, eff = [], [], []
    for m in per_module.values():
        shares = sorted(m["retained"].items(), key=lambda kv: int(kv[0]))
        lo.append(shares[0][1])
        hi.append(shares[-1][1])
        eff.append(m["effective_rank"])
    return {"min_rank_share": float(np.mean(lo)), "max_rank_share": float(np.mean(hi)),
            "effective_rank": float(np.mean(eff))}


def collapse_warning(per_module: Mapping[str, Mapping], threshold: float) -> str | None:
    """A one-line warning when, averaged over modules with more than one client rank, the
    smallest rank already retains ``>= threshold`` of ``||dW||_F^2``; else None."""
    hetero = {k: v for k, v in per_module.items() if len(v["retained"]) > 1 and v["energy"] > 0}
    if not hetero:
        return None
    summary = spectrum_summary(hetero)
    share = summary["min_rank_share"]
    if share < threshold:
        return None
    ranks = sorted({int(r) for v in hetero.values() for r in v["retained"]})
    return (f"rank collapse: the smallest client rank ({ranks[0]}) already retains {share:.1%} of "
            f"||dW||_F^2 (mean over {len(hetero)} modules, threshold {threshold:.0%}); clients at ranks "
            f"{ranks[1:]} gain little beyond it (effective rank {summary['effective_rank']:.2f})")
