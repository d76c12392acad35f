"""CPU-side logic of the CUDA facade: availability probing, device resolution, input
detection. Runs everywhere (no GPU, no CUDA build needed)."""
from __future__ import annotations

import numpy as np
import pytest

from server.core import cuda


def test_available_never_raises_and_explains():
    ok, why = cuda.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why


def test_resolve_device_cpu_and_auto_follow_availability():
    ok, _ = cuda.available()
    assert cuda.resolve_device("cpu") == "cpu"
    assert cuda.resolve_device("auto") == ("cuda" if ok else "cpu")


def test_resolve_device_cuda_without_backend_names_the_reason():
    ok, why = cuda.available()
    if ok:
        assert cuda.resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="unavailable"):
            cuda.resolve_device("cuda")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", None, 0])
def test_resolve_device_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="device must be"):
        cuda.resolve_device(bad)


class _FakeDeviceArray:
    __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def test_is_device_input_detects_device_arrays_only():
    import torch
    host = np.zeros((3, 2), np.float32)
    assert not cuda.is_device_input(host)
    assert not cuda.is_device_input([host, host])
    assert not cuda.is_device_input([[torch.zeros(2, 2)]])
    assert not cuda.is_device_input([])
    assert cuda.is_device_input(_FakeDeviceArray())
    assert cuda.is_device_input([[_FakeDeviceArray()]])


def test_linalg_functions_without_backend_raise_clear_error():
    ok, why = cuda.available()
    if ok:
        pytest.skip("the backend is available here; the GPU tests cover it")
    B, A = np.ones((4, 2), np.float32), np.ones((2, 3), np.float32)
    with pytest.raises(RuntimeError, match="FLEXLORA_CUDA|device|driver|torch"):
        cuda.lowrank_svd([B], [A], [1.0], 1)


# The CPU names the CUDA facade does not take: CPU threads, the sketch route (no GPU sketch), and
# the streaming aggregator's skip of checks it already made (the GPU's is check_finite=False).
CPU_ONLY = {"threads", "sketch_size", "core_size", "validated"}
GPU_ONLY = {"tf32", "streams", "check_finite"}


@pytest.mark.parametrize("name", ["lowrank_svd", "lowrank_svd_batched", "dense_svd", "weighted_sum"])
def test_cuda_facade_has_the_linalg_signature(name):
    """server.core.cuda mirrors server.core.linalg: the same parameters, in the same order, of
    the same kind and default, apart from the CPU-only and GPU-only options named above."""
    import inspect

    from server.core import linalg
    cpu = [p for p in inspect.signature(getattr(linalg, name)).parameters.values() if p.name not in CPU_ONLY]
    gpu = [p for p in inspect.signature(getattr(cuda, name)).parameters.values() if p.name not in GPU_ONLY]
    assert [(p.name, p.kind, p.default) for p in gpu] == [(p.name, p.kind, p.default) for p in cpu], (
        f"server.core.cuda.{name}{inspect.signature(getattr(cuda, name))} differs from "
        f"server.core.linalg.{name}{inspect.signature(getattr(linalg, name))}")
    extra = {p.name for p in inspect.signature(getattr(cuda, name)).parameters.values()} - {p.name for p in cpu}
    assert extra <= GPU_ONLY
