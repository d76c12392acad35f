"""FlexLoRA server: aggregation of heterogeneous-rank LoRA updates.

``server.core.linalg`` (native truncated SVD of weighted sums of low-rank products) is
re-exported here; the streaming :class:`~server.core.aggregation.Aggregator` and the reference
implementation load on first use.
"""
from __future__ import annotations

import importlib

from server.core.linalg import (
    dense_svd,
    get_num_threads,
    lowrank_svd,
    lowrank_svd_batched,
    plan,
    set_num_threads,
    weighted_sum,
)

__all__ = ["lowrank_svd", "lowrank_svd_batched", "dense_svd", "weighted_sum", "plan",
           "set_num_threads", "get_num_threads", "Aggregator", "GlobalAdapter"]

_LAZY = {"Aggregator": "core.aggregation", "GlobalAdapter": "core.adapter"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
