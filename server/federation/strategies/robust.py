"""Robust aggregation for factored (LoRA) updates: the math as pure functions.

A client's *effective update* is the weight change it stands for, ``dW_k[m] = s_k B_k A_k`` per
module ``m``. Nothing here forms ``dW_k``: norms and inner products come from the small Gram
matrices of the factors (``r x r``), in float64:

* ``||B A||_F^2 = trace((B^T B)(A A^T))``
* ``<B_i A_i, B_j A_j>_F = trace((B_j^T B_i)(A_i A_j^T))``
* ``||X_i - X_j||_F^2 = ||X_i||^2 + ||X_j||^2 - 2 <X_i, X_j>``

Defences (all off by default; :class:`RobustConfig`):

* ``clip_norm``: scale every client's effective update down to at most this norm.
* ``clip_adaptive``: the same with the bound ``clip_adaptive x`` the round's median norm.
* ``max_weight_share``: no client's aggregation weight (its share of the examples) above this
  fraction; the excess is spread over the others in proportion to their weights.
* ``trim_fraction``: drop the ``floor(trim_fraction x n)`` clients whose effective updates are
  farthest (mean squared distance) from the others' before aggregating.
* ``direction_trim``: then drop the ``floor(direction_trim x n)`` clients whose change has the
  lowest median cosine with the other clients' changes (per rank class; issue 21, class 6).

Memory: with any defence on, a round buffers every valid update's factors until ``finalize``
(the sum over clients of ``r_k (d_out + d_in)`` floats per module, what the exact route of the
FlexLoRA aggregator keeps anyway); trimming costs ``O(n^2 sum_m (d_out + d_in) r^2)`` flops.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RobustConfig", "FactoredUpdate", "effective_norms", "inner_products", "squared_distances",
           "gram_distances", "clip_multipliers", "cap_shares", "trim_by_distance", "change_of", "effective_rank", "class_norms",
           "class_scores", "trim_by_class", "clip_multipliers_by_class", "class_report", "slot_shares", "weigh_slots", "slot_view_scale",
           "direction_scores",
           "trim_by_direction"]

# one client's effective update: module -> (scaling, B, A)
FactoredUpdate = Mapping[str, tuple[float, np.ndarray, np.ndarray]]


def _positive(name: str, value, *, upper: float | None = None, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (upper is None or value <= upper)
    if not ok:
        rng = f"in {'[' if allow_zero else '('}0, {upper}]" if upper is not None else "> 0 and finite"
        raise ValueError(f"{name} must be a number {rng}, got {value!r}")


@dataclass(kw_only=True)
class RobustConfig:
    """Robust aggregation settings (None / 0: that defence is off)."""
    clip_norm: float | None = None          # fixed bound on each client's ||effective update||_F
    clip_adaptive: float | None = None      # bound = clip_adaptive x the round's median norm
    max_weight_share: float | None = None   # cap on any client's share of the aggregation weight
    trim_fraction: float = 0.0              # drop this fraction of clients farthest from the rest
    direction_trim: float = 0.0             # then drop this fraction whose change points away from the others'

    def __post_init__(self) -> None:
        _positive("clip_norm", self.clip_norm)
        _positive("clip_adaptive", self.clip_adaptive)
        _positive("max_weight_share", self.max_weight_share, upper=1.0)
        _positive("trim_fraction", self.trim_fraction, upper=0.5, allow_zero=True)
        _positive("direction_trim", self.direction_trim, upper=0.5, allow_zero=True)
        for name in ("trim_fraction", "direction_trim"):
            if getattr(self, name) == 0.5:
                raise ValueError(f"{name} must be below 0.5, got 0.5")
        if self.trim_fraction + self.direction_trim >= 0.5:
            raise ValueError(f"trim_fraction + direction_trim must be below 0.5, got "
                             f"{self.trim_fraction} + {self.direction_trim}")

    @property
    def enabled(self) -> bool:
        return (self.clip_norm is not None or self.clip_adaptive is not None
                or self.max_weight_share is not None or self.trim_fraction > 0 or self.direction_trim > 0)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _inner(s_i: float, b_i, a_i, s_j: float, b_j, a_j) -> float:
    """``<s_i B_i A_i, s_j B_j A_j>_F`` from ``(B_j^T B_i)`` (r_j x r_i) and ``(A_i A_j^T)`` (r_i x r_j)."""
    gb = _f64(b_j).T @ _f64(b_i)
    ga = _f64(a_i) @ _f64(a_j).T
    return float(s_i * s_j * np.sum(gb.T * ga))


def effective_norms(updates: Sequence[FactoredUpdate]) -> np.ndarray:
    """``||dW_k||_F`` over all modules of each client (float64, via Gram matrices)."""
    out = np.zeros(len(updates))
    for k, u in enumerate(updates):
        out[k] = math.sqrt(max(sum(_inner(s, b, a, s, b, a) for s, b, a in u.values()), 0.0))
    return out


def inner_products(updates: Sequence[FactoredUpdate]) -> np.ndarray:
    """Gram matrix ``G[i, j] = sum_m <dW_i[m], dW_j[m]>_F`` (modules both clients sent)."""
    n = len(updates)
    g = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            common = updates[i].keys() & updates[j].keys()
            g[i, j] = g[j, i] = sum(_inner(*updates[i][m], *updates[j][m]) for m in common)
    return g


def gram_distances(gram: np.ndarray) -> np.ndarray:
    """``D[i, j] = G[i, i] + G[j, j] - 2 G[i, j]``, the squared distances a Gram matrix gives
    (clamped at 0)."""
    g = np.asarray(gram, dtype=np.float64)
    d = np.diag(g)
    return np.maximum(d[:, None] + d[None, :] - 2 * g, 0.0)


def squared_distances(updates: Sequence[FactoredUpdate]) -> np.ndarray:
    """``D[i, j] = ||dW_i - dW_j||_F^2`` from :func:`inner_products` (clamped at 0)."""
    return gram_distances(inner_products(updates))


def clip_multipliers(norms: Sequence[float], *, clip_norm: float | None = None,
                     clip_adaptive: float | None = None) -> np.ndarray:
    """Per client ``min(1, C / norm)`` with ``C`` the smaller of ``clip_norm`` and
    ``clip_adaptive x median(norms)`` (whichever are given); 1 where no bound is given."""
    norms = np.asarray(norms, dtype=np.float64)
    bound = math.inf
    if clip_norm is not None:
        bound = min(bound, float(clip_norm))
    if clip_adaptive is not None and norms.size:
        bound = min(bound, float(clip_adaptive) * float(np.median(norms)))
    out = np.ones_like(norms)
    over = norms > bound
    out[over] = bound / norms[over]
    return out


def cap_shares(weights: Sequence[float], max_share: float) -> np.ndarray:
    """Weights rescaled so that no share ``w_k / sum w`` exceeds ``max_share`` (water-filling:
    capped clients get exactly the cap, the rest keep their proportions). Same total as the
    input. With ``max_share < 1/n`` the cap cannot hold and every client gets ``1/n``."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    total = float(w.sum())
    if n == 0 or total <= 0:
        return w.copy()
    if max_share * n <= 1.0:
        return np.full(n, total / n)
    share = w / total
    capped = np.zeros(n, dtype=bool)
    for _ in range(n):
        over = (share > max_share * (1 + 1e-12)) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - max_share * capped.sum()
        rest = w[~capped].sum()
        share = np.where(capped, max_share, w / rest * free if rest > 0 else 0.0)
    return share * total


def trim_by_distance(sq_dist: np.ndarray, fraction: float) -> list[int]:
    """Indices kept after dropping the ``floor(fraction x n)`` clients with the largest mean
    squared distance to the others (ties: the later index goes first); at least one is kept."""
    d = np.asarray(sq_dist, dtype=np.float64)
    return _drop_largest(lambda: d.sum(axis=1) / max(d.shape[0] - 1, 1), d.shape[0], fraction)


def _drop_largest(score, n: int, fraction: float) -> list[int]:
    """Indices ``0..n-1`` without the ``floor(fraction x n)`` largest of ``score()`` (ties: the
    later index goes first; at least one kept; ``score`` is only computed when one is dropped)."""
    drop = min(int(math.floor(fraction * n)), max(n - 1, 0))
    if drop <= 0:
        return list(range(n))
    s = score()
    order = sorted(range(n), key=lambda i: (-s[i], -i))
    dropped = set(order[:drop])
    return [i for i in range(n) if i not in dropped]


# ------------------------------------------------------------------ like with like (issue 21, class 4)
#
# ``s = alpha / r`` makes a low-rank client's update larger than a high-rank one's for the same
# training, so a distance or a median over all clients singles out the low-rank devices
# (distance trimming becomes norm trimming). The statistics below are on what each client
# *changed* (its reply minus the factors it was sent) and are normalised within its rank class.

# a class smaller than this takes its typical norm from the round's rank-scale law
# (:func:`class_norms`): for trimming a class of two has a median, for the clipping bound three
# (a median an attacker in a class of two cannot drag up)
MIN_CLASS_TRIM = 2
MIN_CLASS_CLIP = 3
# the rank-scale law's slope when a round has a single class to fit it on: honest changes scale
# about as rank^-0.5 under alpha / r (measured -0.46 over ranks 2-16 in the 10-client honest runs)
LAW_SLOPE = -0.5


def change_of(update: FactoredUpdate, sent: FactoredUpdate | None) -> FactoredUpdate:
    """What a client changed, factored: per module ``s B A - s' B' A'`` as
    ``(1, [s B | -s' B'], [A ; A'])`` (modules it was not sent are its update as is)."""
    if not sent:
        return update
    out = {}
    for m, (s, b, a) in update.items():
        if m not in sent:
            out[m] = (s, b, a)
            continue
        s2, b2, a2 = sent[m]
        out[m] = (1.0, np.concatenate([_f64(b) * s, _f64(b2) * -s2], axis=1),
                  np.concatenate([_f64(a), _f64(a2)], axis=0))
    return out


def effective_rank(update: FactoredUpdate) -> float:
    """An update's rank as one number: the geometric mean of its modules' ranks, each weighted by
    its size ``d_out + d_in`` (``r30_200`` on a LLaMA block is about 110; a uniform rank is itself)."""
    logs, weights = 0.0, 0.0
    for _s, b, a in update.values():
        r = np.shape(b)[1]
        if r < 1:
            continue
        w = float(np.shape(b)[0] + np.shape(a)[1])
        logs += w * math.log(r)
        weights += w
    return math.exp(logs / weights) if weights > 0 else 1.0


def class_norms(norms: Sequence[float], classes: Sequence[str], eff_ranks: Sequence[float] | None,
                min_class: int) -> np.ndarray:
    """Per client, the typical norm of its rank class.

    A class of at least ``min_class`` clients: its median norm. A smaller class (a lone phone, two
    laptops) cannot give a median an attacker inside it could not drag, and the round's median is
    the wrong scale for it (``alpha / r``: honest rank-2 changes are about 2.5x rank-16 ones), so
    its norm is read off the round's rank-scale law instead, ``log n = a + b log(rank)`` at the
    class's :func:`effective_rank`: fitted by least squares (weighted by class size) to the medians
    of the classes of at least ``min_class`` clients when two or more of distinct rank have one;
    with a single such class, anchored on it with the slope ``LAW_SLOPE``; with none (or no
    ``eff_ranks``), the round's median norm. Only classes with a median of their own place the
    law: two colluders alone in a class of two set their own median for trimming, but not the
    clipping bound of anyone (``MIN_CLASS_CLIP`` is 3), their own included."""
    norms = np.asarray(norms, dtype=np.float64)
    ref = np.full(norms.shape, float(np.median(norms)) if norms.size else 0.0)
    members: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        members.setdefault(c, []).append(i)
    for idx in members.values():
        if len(idx) >= min_class:
            ref[idx] = float(np.median(norms[idx]))
    small = [c for c, idx in members.items() if len(idx) < min_class]
    if not small or eff_ranks is None:
        return ref
    rho = np.asarray(eff_ranks, dtype=np.float64)
    pts = [(math.log(float(np.median(rho[idx]))), math.log(float(np.median(norms[idx]))), len(idx))
           for idx in members.values() if len(idx) >= min_class and float(np.median(norms[idx])) > 0]
    if not pts:
        return ref
    x, y, w = (np.array(v, dtype=np.float64) for v in zip(*pts))
    if len({round(v, 9) for v in x}) >= 2:
        sw = np.sqrt(w)
        a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1) * sw[:, None], y * sw, rcond=None)[0]
    else:
        b = LAW_SLOPE
        a = float(np.average(y - b * x, weights=w))
    for c in small:
        ref[members[c]] = math.exp(a + b * math.log(float(np.median(rho[members[c]]))))
    return ref


def class_scores(gram: np.ndarray, classes: Sequence[str], eff_ranks: Sequence[float] | None = None) -> np.ndarray:
    """Each client's mean squared distance to the others after every change is divided by the
    typical norm of its rank class (:func:`class_norms`): 2 is typical for any class, whatever
    its update size; a client's size counts only against its own class's."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    ref = class_norms(np.sqrt(np.maximum(np.diag(g), 0.0)), classes, eff_ranks, MIN_CLASS_TRIM)
    scale = np.where(ref > 0, ref, 1.0)
    sq = gram_distances(g / np.outer(scale, scale))
    np.fill_diagonal(sq, 0.0)
    return sq.sum(axis=1) / max(n - 1, 1)


def trim_by_class(gram: np.ndarray, fraction: float, classes: Sequence[str],
                  eff_ranks: Sequence[float] | None = None) -> list[int]:
    """Like :func:`trim_by_distance` on the changes' Gram matrix, ranking by :func:`class_scores`
    (distances normalised per rank class)."""
    return _drop_largest(lambda: class_scores(gram, classes, eff_ranks), np.asarray(gram).shape[0], fraction)


def clip_multipliers_by_class(norms: Sequence[float], classes: Sequence[str], *, clip_norm: float | None = None,
                              clip_adaptive: float | None = None,
                              eff_ranks: Sequence[float] | None = None) -> np.ndarray:
    """:func:`clip_multipliers` with the adaptive bound taken per rank class (``clip_adaptive x``
    the class's typical norm, :func:`class_norms` with classes of ``MIN_CLASS_CLIP``)."""
    norms = np.asarray(norms, dtype=np.float64)
    bound = np.full(norms.shape, math.inf)
    if clip_norm is not None:
        bound = np.minimum(bound, float(clip_norm))
    if clip_adaptive is not None and norms.size:
        bound = np.minimum(bound, float(clip_adaptive) * class_norms(norms, classes, eff_ranks, MIN_CLASS_CLIP))
    out = np.ones_like(norms)
    over = norms > bound
    out[over] = bound[over] / norms[over]
    return out


def class_report(classes: Sequence[str], report: Mapping[str, Sequence[str]], ids: Sequence[str]) -> dict:
    """Per rank class: clients, and how many of them were trimmed, clipped, capped."""
    out: dict[str, dict[str, int]] = {}
    of = dict(zip(ids, classes))
    for c in classes:
        out.setdefault(c, {"clients": 0, "trimmed": 0, "clipped": 0, "capped": 0})["clients"] += 1
    for what in ("trimmed", "clipped", "capped"):
        for cid in report.get(what, []):
            out[of[cid]][what] += 1
    return out


# ------------------------------------------------------------------ what is aggregated (issue 21, class 5)
#
# raFLoRA weighs slot i of client k by p_k / w_i (w_i the share of the clients whose rank covers
# slot i): a lone high-rank client has weight 1 in its top slots whatever its p_k, and a reply
# whose columns cancel in B A (so every statistic of s B A sees an honest reply) but not per
# slot is amplified there. The defences measure and bound what the strategy will form instead.


def slot_shares(ranks: Sequence[int], weights: Sequence[float], max_share: float | None = None) -> list[np.ndarray]:
    """raFLoRA's weight of each client in each rank slot of one module: slot ``i`` is formed by
    the clients whose rank is ``> i``, each with ``w_k / sum`` over them (``p_k / w_i``).

    With ``max_share``, no client's weight in any slot is above it: water-filling within the
    slot (the others keep their proportions); a slot with fewer than ``1 / max_share``
    contributors gives each ``max_share`` (the slot's total stays below 1, where plain raFLoRA
    would give a lone client weight 1)."""
    ranks = [int(r) for r in ranks]
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(ranks),):
        raise ValueError(f"slot_shares: {len(ranks)} ranks and {w.shape} weights")
    if np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("slot_shares: weights must be finite and > 0")
    out = [np.zeros(r) for r in ranks]
    done: dict[tuple[int, ...], np.ndarray] = {}
    for i in range(max(ranks, default=0)):
        idx = tuple(k for k, r in enumerate(ranks) if r > i)
        if idx not in done:
            sh = w[list(idx)] / w[list(idx)].sum()
            if max_share is not None:
                sh = np.full(len(idx), float(max_share)) if max_share * len(idx) <= 1.0 else cap_shares(sh, max_share)
            done[idx] = sh
        for j, k in enumerate(idx):
            out[k][i] = done[idx][j]
    return out


def weigh_slots(update: FactoredUpdate, slots: Mapping[str, np.ndarray]) -> FactoredUpdate:
    """Per module ``s B diag(m) A`` with ``m = slots[module]`` (padded with its last value when
    ``B`` has more columns; modules without an entry unchanged)."""
    out = {}
    for mod, (s, b, a) in update.items():
        m = slots.get(mod)
        if m is None or len(m) == 0:
            out[mod] = (s, b, a)
            continue
        r = _f64(b).shape[1]
        m = np.asarray(m, np.float64)[:r]
        if m.size < r:
            m = np.concatenate([m, np.full(r - m.size, m[-1])])
        out[mod] = (s, _f64(b) * m, a)
    return out


def slot_view_scale(update: FactoredUpdate, slots: Mapping[str, np.ndarray]) -> float:
    """How much :func:`weigh_slots` scales an update whose slots carry equal energy: the rms of
    its slot multipliers, each slot weighted by its module's size ``d_out + d_in``. raFLoRA's
    multiplier of slot i is ``1 / w_i`` (per unit of the client's weight), so a high-rank
    client's slot-weighted change is larger by this factor, which depends on its rank alone;
    dividing it out puts every class back on the ``alpha / r`` scale of its own change."""
    num = den = 0.0
    for mod, (_s, b, a) in update.items():
        r = int(np.shape(b)[1])
        m = slots.get(mod)
        if r < 1:
            continue
        w = float(np.shape(b)[0] + np.shape(a)[1])
        mm = np.ones(r) if m is None or len(m) == 0 else np.asarray(m, np.float64)[:r]
        if mm.size < r:
            mm = np.concatenate([mm, np.full(r - mm.size, mm[-1])])
        num += w * float(np.sum(mm ** 2))
        den += w * r
    return math.sqrt(num / den) if den > 0 else 1.0


# ------------------------------------------------------------------ direction (issue 21, class 6)


def direction_scores(gram: np.ndarray) -> np.ndarray:
    """Per client, the median cosine of its change with every other client's change (from their
    Gram matrix): an attacker that sends the opposite of its own change, at an honest size,
    points away from what the others changed. A client with a zero change scores 0.

    The cosine is scale-free (``alpha / r`` does not move it), so every client is compared with
    all the others, whatever their rank class. A median over the client's own class only (the
    rule before) had fewer terms for small classes, a noisier score, and so filled the low
    tail with them: at 20 clients a rank class of 3 took 2.08x its share of the trims
    (``results/defences_by_rank20.md``), against at most 1.17x over all the others."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    norm = np.sqrt(np.maximum(np.diag(g), 0.0))
    denom = np.outer(norm, norm)
    cos = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    if n < 2:
        return np.zeros(n)
    return np.median(cos[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)


def trim_by_direction(gram: np.ndarray, fraction: float, among: Sequence[int] | None = None) -> list[int]:
    """Indices of ``among`` (default all) kept after dropping the ``floor(fraction x n)`` with the
    lowest :func:`direction_scores` (``n`` the clients of the round; ties: the later index goes
    first); at least one is kept."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    among = list(range(n)) if among is None else list(among)
    drop = min(int(math.floor(fraction * n)), max(len(among) - 1, 0))
    if drop <= 0:
        return among
    score = direction_scores(g)
    order = sorted(among, key=lambda i: (score[i], -i))
    dropped = set(order[:drop])
    return [i for i in among if i not in dropped]
