"""Input checks shared by server.core.linalg and server.core.aggregation.

Every failure is a ``ValueError`` naming the argument (and index) and the bad value; arrays
are converted to C-contiguous float32 once here so the native core never sees anything else.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from edge_client.wire import MAX_ROUND_REPLIES, rank_for_module

METHODS = ("auto", "exact", "randomized", "dense", "sketch")
GPU_METHODS = ("auto", "exact", "randomized", "dense")  # the CUDA backend has no sketch route
# Largest magnitude of a factor entry and of a bound on |dW| entries that the float32 core
# accepts: its Grams and norms square these (1e18^2 = 1e36 < float32 max 3.4e38), so
# anything larger would overflow to Inf inside BLAS/LAPACK and surface as an opaque LAPACK
# error (info = -6) instead of a message naming the argument.
MAGNITUDE_LIMIT = 1e18


def as_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite, C-contiguous float32 matrix (floating dtypes are converted)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"{name} contains NaN or Inf (first at index {bad}: {arr[bad]})")
    return arr


def as_rank(rank: Any, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {rank!r}")
    if rank < 1:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    return int(rank)


def as_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def as_method(method: Any, allowed: Sequence[str] = METHODS, name: str = "method") -> str:
    if method not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {method!r}")
    return str(method)


def as_weights(weights: Any, count: int, name: str = "weights") -> list[float]:
    w = np.asarray(weights, dtype=np.float64) if not isinstance(weights, np.ndarray) else weights
    if w.dtype.kind not in "fiu" or w.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {weights!r:.80}")
    if len(w) != count:
        raise ValueError(f"{name} has {len(w)} entries, expected {count} (one per client)")
    w = w.astype(np.float64)
    for k, v in enumerate(w):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{k}] must be finite and >= 0, got {v}")
        if v > np.finfo(np.float32).max:
            raise ValueError(f"{name}[{k}] = {v} overflows float32")
    return [float(v) for v in w]


def factor_sequences(Bs: Any, As: Any, weights: Any, prefix: str = "", *,
                     one_array=lambda x: isinstance(x, np.ndarray)) -> tuple[list, list, list[float]]:
    """``Bs`` and ``As`` as lists of the same non-zero length (one matrix per client, not one
    array: ``one_array`` says what counts as a single array) and the validated weights."""
    if one_array(Bs) or one_array(As):
        raise ValueError(f"{prefix}Bs and {prefix}As must be sequences of matrices, one per client")
    Bs, As = list(Bs), list(As)
    if not Bs:
        raise ValueError(f"{prefix}Bs is empty: at least one client is needed")
    if len(As) != len(Bs):
        raise ValueError(f"{prefix}Bs has {len(Bs)} entries but {prefix}As has {len(As)}")
    return Bs, As, as_weights(weights, len(Bs), f"{prefix}weights")


def as_factors(Bs: Any, As: Any, weights: Any, prefix: str = "") -> tuple[list, list, list]:
    """Validated (Bs, As, weights): shapes agree, every entry float32, finite."""
    Bs, As, w = factor_sequences(Bs, As, weights, prefix)
    Bm = [as_matrix(b, f"{prefix}Bs[{k}]") for k, b in enumerate(Bs)]
    Am = [as_matrix(a, f"{prefix}As[{k}]") for k, a in enumerate(As)]
    check_factor_shapes(Bm, Am, prefix)
    check_magnitudes(Bm, Am, w, prefix)
    return Bm, Am, w


def check_magnitudes(Bm: Sequence[np.ndarray], Am: Sequence[np.ndarray], w: Sequence[float],
                     prefix: str = "") -> None:
    """Finite-but-huge input is refused up front (see MAGNITUDE_LIMIT)."""
    bound = 0.0
    for k, (b, a) in enumerate(zip(Bm, Am)):
        mb, ma = float(np.abs(b).max()), float(np.abs(a).max())
        for name, v in ((f"{prefix}Bs[{k}]", mb), (f"{prefix}As[{k}]", ma)):
            if v > MAGNITUDE_LIMIT:
                raise ValueError(f"{name} has an entry of magnitude {v:.3g}, above {MAGNITUDE_LIMIT:g}: "
                                 "its square would overflow float32; rescale the factors")
        bound += w[k] * mb * ma * b.shape[1]
    if bound > MAGNITUDE_LIMIT:
        raise ValueError(f"{prefix}weights x Bs x As could reach |dW| = {bound:.3g}, above "
                         f"{MAGNITUDE_LIMIT:g}: its square would overflow float32; rescale the weights or factors")


def check_factor_shapes(Bm: Sequence[Any], Am: Sequence[Any], prefix: str = "") -> None:
    """Every client's B has d_out rows, every A d_in columns, and each client's ranks agree
    (any arrays with ``.shape``: numpy here, torch CUDA tensors in ``server.core.cuda``)."""
    d_out, d_in = Bm[0].shape[0], Am[0].shape[1]
    for k, (b, a) in enumerate(zip(Bm, Am)):
        if b.shape[0] != d_out:
            raise ValueError(f"{prefix}Bs[{k}] has {b.shape[0]} rows, expected {d_out} (d_out)")
        if a.shape[1] != d_in:
            raise ValueError(f"{prefix}As[{k}] has {a.shape[1]} columns, expected {d_in} (d_in)")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{prefix}Bs[{k}] has {b.shape[1]} columns but {prefix}As[{k}] has "
                             f"{a.shape[0]} rows (the client's rank must agree)")


def as_threads(threads: Any) -> int:
    """``None`` -> 0 (the core's default: set_num_threads or the core count)."""
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    return int(threads)


def per_layer_ranks(rank: Any, n: int) -> list[int]:
    """One rank per layer: ``rank`` itself when it is a sequence of ``n``, else ``n`` copies."""
    if isinstance(rank, (list, tuple, np.ndarray)):
        if len(rank) != n:
            raise ValueError(f"rank has {len(rank)} entries, expected {n} (one per layer)")
        return [as_rank(r, f"rank[{i}]") for i, r in enumerate(rank)]
    return [as_rank(rank)] * n


def per_layer_weights(weights: Any, n: int) -> list:
    """One weight sequence per layer: ``weights`` when it holds ``n`` sequences, else ``n`` copies."""
    items = list(weights) if not isinstance(weights, np.ndarray) else weights
    if len(items) and isinstance(items[0], (list, tuple, np.ndarray)) and np.ndim(items[0]) == 1:
        if len(items) != n:
            raise ValueError(f"weights has {len(items)} per-layer entries, expected {n}")
        return list(items)
    return [weights] * n


# ---------------------------------------------------------------------------- one client of a round
def check_finite_contribution(who: str, module: str, B: np.ndarray, A: np.ndarray, ws: float) -> None:
    """Finite but huge entries would overflow float32 in the native core (a LAPACK error far
    from the cause): refuse them up front, naming the client and the module."""
    # room for MAX_ROUND_REPLIES such clients in one float32 accumulator (x16 margin), so an
    # accepted client never makes a later one overflow; the weight x scaling is bounded on its
    # own too (B = 0 with a huge alpha has a zero product but an infinite float32 weight)
    limit = float(np.finfo(np.float32).max) / 16 / MAX_ROUND_REPLIES
    with np.errstate(over="ignore", invalid="ignore"):
        nb = float(np.linalg.norm(np.asarray(B, np.float64)))
        na = float(np.linalg.norm(np.asarray(A, np.float64)))
        bound = abs(ws) * nb * na
    if not (bound < limit and nb < limit and na < limit and abs(ws) < limit):
        raise ValueError(f"{who}: module {module!r}: weight * scaling * ||B|| * ||A|| = {bound:.3g} is too "
                         f"large (or not finite) for float32 aggregation")


def check_client_args(who: str, *, num_examples: Any, alpha: Any, weight: Any) -> float:
    """Validated scalar arguments of one client's ``add``; returns its weight (the number of
    examples unless ``weight`` is given). Shared by the CPU, CUDA and sharded aggregators."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) \
            or num_examples < 1:
        raise ValueError(f"num_examples of {who} must be an integer >= 1, got {num_examples!r}")
    if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha of {who} must be a finite number > 0, got {alpha!r}")
    w = float(num_examples) if weight is None else weight
    if not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
        raise ValueError(f"weight of {who} must be finite and >= 0, got {weight!r}")
    return w


def check_client_modules(who: str, pairs: Mapping[str, tuple[Any, Any]], modules: Mapping[str, Any], *,
                         max_rank: int, rank: int | None, rank_pattern: Mapping[str, int] | None) -> None:
    """Each module's rank against ``rank``/``rank_pattern`` (when given) and its shape against
    what earlier clients sent (``modules[name].d_out/.d_in``)."""
    if rank is not None or rank_pattern:
        default = max_rank if rank is None else as_rank(rank, "rank")
        for module, (B, _A) in pairs.items():
            expected = rank_for_module(module, default, rank_pattern)
            if B.shape[1] != expected:
                raise ValueError(f"{who}: module {module!r} has rank {B.shape[1]} but "
                                 f"rank/rank_pattern say {expected}")
    for module, (B, A) in pairs.items():
        state = modules.get(module)
        if state is not None and (B.shape[0], A.shape[1]) != (state.d_out, state.d_in):
            raise ValueError(f"{who}: module {module!r} is {B.shape[0]}x{A.shape[1]}, "
                             f"other clients sent {state.d_out}x{state.d_in}")
