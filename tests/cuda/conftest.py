"""GPU tests: every test in this folder marked ``cuda`` is skipped, with the reason, unless
the CUDA backend (``server._cuda``, built with FLEXLORA_CUDA=ON) can run here. The probe runs
in a fixture at test time, never at import time, and never raises.

Tests marked ``cuda_build`` need the built extension but no GPU (CI's CUDA step runs them on
a CPU machine). They are skipped when ``server._cuda`` is not built, unless
``FLEXLORA_REQUIRE_CUDA_BUILD=1``, which turns the skip into a failure. ``FLEXLORA_CUDA_EXT``
names a built ``_cuda*.so`` outside the source tree (CI builds it in its own directory so
that the editable install stays as the README makes it); it is loaded as ``server._cuda``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest


def _load_ext():
    """The compiled module, or None with the reason."""
    path = os.environ.get("FLEXLORA_CUDA_EXT")
    try:
        if path:
            if "server._cuda" not in sys.modules:
                spec = importlib.util.spec_from_file_location("server._cuda", path)
                if spec is None or spec.loader is None:
                    return None, f"FLEXLORA_CUDA_EXT={path!r} is not a loadable extension"
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules["server._cuda"] = module
                import server
                server._cuda = module
                from server.core import cuda
                cuda._EXT, cuda._EXT_ERROR = None, None  # forget an earlier failed import
            return sys.modules["server._cuda"], ""
        from server import _cuda
        return _cuda, ""
    except ImportError as e:  # OSError (a missing cuBLAS) is an ImportError subclass here
        return None, f"server._cuda cannot be imported: {e}"


@pytest.fixture(scope="session")
def cuda_ext():
    ext, why = _load_ext()
    if ext is None:
        if os.environ.get("FLEXLORA_REQUIRE_CUDA_BUILD") == "1":
            pytest.fail(f"FLEXLORA_REQUIRE_CUDA_BUILD=1 but {why}")
        pytest.skip(f"needs a FLEXLORA_CUDA=ON build: {why}")
    return ext


@pytest.fixture(autouse=True)
def _require_cuda(request):
    if request.node.get_closest_marker("cuda_build") is not None:
        request.getfixturevalue("cuda_ext")
    if request.node.get_closest_marker("cuda") is None:
        return
    _load_ext()
    from server.core import cuda
    ok, why = cuda.available()
    if not ok:
        pytest.skip(f"CUDA backend unavailable: {why}")


@pytest.fixture
def torch_cuda():
    import torch
    torch.manual_seed(0)
    return torch
