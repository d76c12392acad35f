"""Streaming aggregation on the GPU against the CPU Aggregator (skipped without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

MODULES = {"layers.0.q_proj": (48, 40), "layers.0.down_proj": (40, 96)}


def client(rng, rank, pinned=False):
    import torch
    out = {}
    for name, (d_out, d_in) in MODULES.items():
        B = rng.standard_normal((d_out, rank), dtype=np.float32) / (1 + np.arange(rank))
        A = rng.standard_normal((rank, d_in), dtype=np.float32)
        out[name + ".lora_B.weight"] = B.astype(np.float32)
        out[name + ".lora_A.weight"] = A
    if pinned:
        out = {k: torch.from_numpy(v).pin_memory() for k, v in out.items()}
    return out


@pytest.mark.parametrize("method", ["auto", "exact", "dense"])
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_aggregator_matches_cpu(torch_cuda, method, pinned):
    from server.core.aggregation import Aggregator
    from server.core.cuda_aggregation import CudaAggregator
    rng = np.random.default_rng(0)
    clients = [(client(rng, r), n) for r, n in [(4, 10), (8, 30), (16, 5), (30, 20), (8, 7)]]
    cpu = Aggregator(8, method=method if method != "dense" else "exact")
    gpu = CudaAggregator(8, method=method, dense_threshold=20, prefetch=2)
    for factors, n in clients:
        cpu.add(factors, num_examples=n, alpha=16.0)
        gpu_factors = {k: (torch_cuda.from_numpy(v).pin_memory() if pinned else v)
                       for k, v in factors.items()}
        gpu.add(gpu_factors, num_examples=n, alpha=16.0)
    a, b = cpu.finalize(), gpu.finalize()
    total = sum(n for _, n in clients)
    for name in MODULES:
        # the exact aggregate dW in float64, and the Eckart-Young residual at rank 8
        dW = sum((n / total) * (16.0 / f[name + ".lora_A.weight"].shape[0]) *
                 f[name + ".lora_B.weight"].astype(np.float64) @ f[name + ".lora_A.weight"]
                 for f, n in clients)
        s = np.linalg.svd(dW, compute_uv=False)
        opt = np.sqrt(np.sum(s[8:] ** 2))
        err = np.linalg.norm(dW - b.delta(name))
        if b.routes[name] == "exact":
            Sa, Sb = a.modules[name][1], b.modules[name][1]
            np.testing.assert_allclose(Sb, Sa, rtol=1e-4, atol=1e-5 * Sa[0])
            assert err <= (1 + 1e-3) * opt
        else:  # randomized SVD of the dense accumulator: within 5% of the optimum
            assert err <= 1.05 * opt
    dev = gpu.finalize_device()
    assert all(t.is_cuda for usv in dev.values() for t in usv)


def test_cuda_aggregator_rejects_nan_client_without_changing_state(torch_cuda):
    from server.core.cuda_aggregation import CudaAggregator
    rng = np.random.default_rng(1)
    gpu = CudaAggregator(4, method="dense")
    gpu.add(client(rng, 4), num_examples=5, alpha=8.0)
    before = {n: t.clone() for n, (t, _, _) in gpu.finalize_device().items()}
    bad = client(rng, 4)
    bad["layers.0.q_proj.lora_A.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="q_proj.lora_A contains NaN"):
        gpu.add(bad, num_examples=5, alpha=8.0)
    assert gpu.num_clients == 1
    after = gpu.finalize_device()
    for n, U in before.items():
        assert torch_cuda.allclose(after[n][0].abs(), U.abs(), atol=1e-5)


def test_device_auto_picks_gpu_here():
    from server.core import cuda
    assert cuda.resolve_device("auto") == "cuda"
