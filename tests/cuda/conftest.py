"""GPU tests: every test in this folder marked ``cuda`` is skipped, with the reason, unless
the CUDA backend (``server._cuda``, built with FLEXLORA_CUDA=ON) can run here. The probe runs
in a fixture at test time, never at import time, and never raises."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _require_cuda(request):
    if request.node.get_closest_marker("cuda") is None:
        return
    from server.core import cuda
    ok, why = cuda.available()
    if not ok:
        pytest.skip(f"CUDA backend unavailable: {why}")


@pytest.fixture
def torch_cuda():
    import torch
    torch.manual_seed(0)
    return torch
