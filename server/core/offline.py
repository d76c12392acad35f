"""Offline FlexLoRA aggregation of collected adapters (``flexlora aggregate``): update files or
peft folders in, the global adapter at a chosen rank out, as a peft folder (or wire file).

It is the federation's aggregation, run once: the streaming
:class:`server.core.aggregation.Aggregator` adds every update with its own per-module scaling
(rank_pattern, alpha_pattern, rsLoRA) and weight ``n_k``, takes the rank-R truncated SVD of
``sum_k p_k s_k B_k A_k`` per module (dW is never formed on the factored routes), and
:meth:`server.core.adapter.GlobalAdapter.client_factors` splits it as the official code does
(``B = U S / s``, ``A = V^T``). Every module gets rank R; slots beyond a module's aggregate rank
carry ``B = 0`` and an orthonormal completion of ``A`` (they start learning like fresh LoRA
slots if the adapter is trained further), so the folder's ``r`` is R.
"""
from __future__ import annotations

from collections.abc import Sequence

from edge_client.wire import ClientUpdate, GlobalFactors

__all__ = ["aggregate_updates"]


def aggregate_updates(updates: Sequence[ClientUpdate], rank: int, *, alpha: float | None = None,
                      rslora: bool = False, method: str = "auto") -> GlobalFactors:
    """The FlexLoRA global adapter of ``updates`` at ``rank`` (all modules)."""
    from server.core.aggregation import Aggregator

    if not updates:
        raise ValueError("give at least one update")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    modules = updates[0].modules()
    for u in updates[1:]:
        if u.modules() != modules:
            missing = sorted(set(modules) ^ set(u.modules()))
            raise ValueError(f"update {u.client_id!r} has other modules than {updates[0].client_id!r} "
                             f"(differing: {missing[:3]}{' ...' if len(missing) > 3 else ''})")
    for module in modules:
        b, a = updates[0].pair(module)
        if rank > min(b.shape[0], a.shape[1]):
            raise ValueError(f"rank {rank} is above the size of module {module!r} ({b.shape[0]} x {a.shape[1]})")
    aggregator = Aggregator(rank, method=method)
    for u in updates:
        aggregator.add_update(u)
    alpha = float(updates[0].alpha if alpha is None else alpha)
    factors = aggregator.finalize().client_factors(rank, alpha=alpha, rslora=rslora)
    bases = {u.base_model for u in updates}
    return GlobalFactors(factors=factors, rank=rank, alpha=alpha, rslora=rslora, strategy="flexlora",
                         base_model=bases.pop() if len(bases) == 1 else None)
