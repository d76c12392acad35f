"""Shared helpers for tests/runtime (a unique module name, unlike conftest)."""
from __future__ import annotations

import numpy as np

from edge_client.wire import ClientUpdate

# Tolerances (float32 data; strategies accumulate in float64 and return float32).
F32 = {"rtol": 1e-5, "atol": 1e-6}
# SVD through the native core in float32: products agree to a few ulps of the largest value.
SVD32 = {"rtol": 1e-4, "atol": 1e-5}

MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (12, 12),
    "base_model.model.model.layers.0.mlp.up_proj": (20, 12),
}
FINGERPRINT = "f" * 32


def make_update(client_id: str, rank: int, *, seed: int, num_examples: int = 10, alpha: float = 16.0,
                rank_pattern: dict[str, int] | None = None, modules=MODULES) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    factors = {}
    for module, (d_out, d_in) in modules.items():
        r = rank
        for key, value in (rank_pattern or {}).items():
            if module.endswith(key):
                r = value
        factors[module + ".lora_A.weight"] = rng.standard_normal((r, d_in)).astype(np.float32)
        factors[module + ".lora_B.weight"] = rng.standard_normal((d_out, r)).astype(np.float32)
    return ClientUpdate(client_id=client_id, factors=factors, num_examples=num_examples, rank=rank,
                        rank_pattern=dict(rank_pattern or {}), alpha=alpha, base_model=FINGERPRINT,
                        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}))


def sample_updates() -> list[ClientUpdate]:
    return [make_update("c0", 2, seed=0, num_examples=5),
            make_update("c1", 4, seed=1, num_examples=20, alpha=8.0),
            make_update("c2", 3, seed=2, num_examples=11, rank_pattern={"up_proj": 6})]
