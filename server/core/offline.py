"""Offline FlexLoRA aggregation of collected adapters (``flexlora aggregate``): update files or
peft folders in, the global adapter at a chosen rank out, as a peft folder (or wire file).

The math is the strategy's (``server.federation.strategies.flexlora``): ``dW = sum_k p_k s_k B_k A_k`` per
module with ``p_k = n_k / sum n`` and each update's own per-module scaling (rank_pattern,
alpha_pattern, rsLoRA), then the rank-R truncated SVD through ``server.core.linalg.lowrank_svd``
(dW is never formed on the factored routes), split as the official code does: ``B = U S / s``,
``A = V^T``. Modules whose aggregate has rank below R are zero-padded, so every module has rank
R and the folder's ``r`` is R.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, factor_keys, scaling

__all__ = ["aggregate_updates"]


def aggregate_updates(updates: Sequence[ClientUpdate], rank: int, *, alpha: float | None = None,
                      rslora: bool = False, method: str = "auto") -> GlobalFactors:
    """The FlexLoRA global adapter of ``updates`` at ``rank`` (all modules)."""
    from server.core import linalg

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
    alpha = float(updates[0].alpha if alpha is None else alpha)
    total = float(sum(u.num_examples for u in updates))
    s_out = scaling(alpha, rank, rslora)
    factors = {}
    for module in modules:
        bs, as_, ws = [], [], []
        for u in updates:
            b, a = u.pair(module)
            bs.append(np.ascontiguousarray(b, np.float32))
            as_.append(np.ascontiguousarray(a, np.float32))
            ws.append(u.num_examples / total * u.module_scaling(module))
        d_out, d_in = bs[0].shape[0], as_[0].shape[1]
        if rank > min(d_out, d_in):
            raise ValueError(f"rank {rank} is above the size of module {module!r} ({d_out} x {d_in})")
        r_eff = min(rank, sum(b.shape[1] for b in bs))
        u_, s_, vt = linalg.lowrank_svd(bs, as_, np.asarray(ws, np.float32), r_eff, method=method)
        b_out = np.zeros((d_out, rank), np.float32)
        a_out = np.zeros((rank, d_in), np.float32)
        b_out[:, :r_eff] = u_ * (s_ / s_out)
        a_out[:r_eff] = vt
        a_key, b_key = factor_keys(module)
        factors[a_key], factors[b_key] = a_out, b_out
    bases = {u.base_model for u in updates}
    return GlobalFactors(factors=factors, rank=rank, alpha=alpha, rslora=rslora, strategy="flexlora",
                         base_model=bases.pop() if len(bases) == 1 else None)
