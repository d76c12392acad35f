"""The CUDA build without a GPU: the extension imports, its API has the shape that the stub
(server/_cuda.pyi) and the facade (server/core/cuda.py) rely on, the binding and csrc/cuda
reject bad arguments before they touch a device, and a machine without a GPU gets a clear
reason instead of a crash. CI runs these against a FLEXLORA_CUDA=ON build (.ci/cuda_build.sh);
elsewhere they are skipped unless server._cuda is built (see conftest.py)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.cuda_build

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "server" / "_cuda.pyi"
FACADE = ROOT / "server" / "core" / "cuda.py"

# Stand-in device addresses: validation must reject the call before any is dereferenced.
FAKE = 4096


def stub_signatures() -> dict[str, list[str]]:
    tree = ast.parse(STUB.read_text())
    return {f.name: [a.arg for a in f.args.args] for f in tree.body if isinstance(f, ast.FunctionDef)}


def binding_params(fn) -> list[str]:
    """Parameter names from pybind11's signature line ``name(a: T, b: U) -> R``."""
    line = (fn.__doc__ or "").splitlines()[0]
    inner = line[line.index("(") + 1:line.rindex(") ->")]
    return re.findall(r"(?:^|, )(\w+): ", inner)


def svd_args(tasks, ranks, method="auto", streams=1):
    return dict(tasks=tasks, ranks=ranks, method=method, oversample=10, power_iters=2, seed=0,
                dense_exact=False, tf32=False, streams=streams, stream=0)


def factors_task(d_out=4, d_in=3, B=(FAKE,), A=(FAKE,), ranks=(2,), weights=(1.0,), out=(FAKE,) * 3):
    return ("factors", d_out, d_in, list(B), list(A), list(ranks), list(weights)) + tuple(out)


# ---------------------------------------------------------------- the API's shape
def test_extension_exports_exactly_the_stubbed_functions(cuda_ext):
    stub = stub_signatures()
    public = sorted(n for n in dir(cuda_ext) if not n.startswith("_") and callable(getattr(cuda_ext, n)))
    assert public == sorted(stub), f"server._cuda exports {public}, server/_cuda.pyi declares {sorted(stub)}"


@pytest.mark.parametrize("name", sorted(stub_signatures()))
def test_binding_parameters_match_the_stub(cuda_ext, name):
    assert binding_params(getattr(cuda_ext, name)) == stub_signatures()[name], (
        f"server._cuda.{name} takes {binding_params(getattr(cuda_ext, name))}, "
        f"server/_cuda.pyi says {stub_signatures()[name]}")


def test_facade_calls_the_binding_with_its_arity(cuda_ext):
    """Every ``_ext().f(...)`` (or ``ext.f(...)``) call in server/core/cuda.py names a binding
    function and passes as many positional arguments as it takes (the facade passes no
    keywords)."""
    calls = []
    for node in ast.walk(ast.parse(FACADE.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            if (isinstance(target, ast.Call) and getattr(target.func, "id", None) == "_ext") or \
                    (isinstance(target, ast.Name) and target.id == "ext"):
                calls.append(node)
    assert {c.func.attr for c in calls} >= {"svd_batched", "weighted_sum", "accumulate", "probe"}
    for c in calls:
        params = binding_params(getattr(cuda_ext, c.func.attr))
        assert not c.keywords and len(c.args) == len(params), (
            f"server/core/cuda.py:{c.lineno} calls {c.func.attr} with {len(c.args)} positional "
            f"arguments and {len(c.keywords)} keywords; the binding takes {params}")


def test_gpu_method_names_are_the_binding_routes(cuda_ext):
    from server.core.validate import GPU_METHODS, METHODS
    bad_kind = [("nonsense",)]
    for method in GPU_METHODS:  # accepted: the call gets as far as the malformed task
        with pytest.raises(ValueError, match=r"tasks\[0\] must be \('factors'"):
            cuda_ext.svd_batched(**svd_args(bad_kind, [1], method=method))
    for method in set(METHODS) - set(GPU_METHODS):
        with pytest.raises(ValueError, match=f"method must be one of .*got '{method}'"):
            cuda_ext.svd_batched(**svd_args(bad_kind, [1], method=method))


# ---------------------------------------------------------------- validation before the device
def test_empty_batch_needs_no_device(cuda_ext):
    assert cuda_ext.svd_batched(**svd_args([], [])) == []


@pytest.mark.parametrize("tasks, ranks, streams, message", [
    ([factors_task()], [1, 2], 1, "ranks must have one entry per task"),
    ([factors_task()], [1], 0, "streams must be >= 1, got 0"),
    ([factors_task()], [0], 1, r"tasks\[0\]: rank must be >= 1"),
    ([factors_task()[:8]], [1], 1, r"tasks\[0\] must be \('factors'"),
    ([factors_task(ranks=(2, 3))], [1], 1, r"tasks\[0\]: Bs, As, ranks and weights must have the same length"),
    ([factors_task(B=(), A=(), ranks=(), weights=())], [1], 1, r"tasks\[0\]: Bs is empty"),
    ([factors_task(out=(0, 0, 0))], [1], 1, r"tasks\[0\]: output pointers must not be null"),
    ([factors_task(B=(0,))], [1], 1, r"tasks\[0\] client 0: null factor pointer"),
    ([factors_task(ranks=(0,))], [1], 1, r"tasks\[0\] client 0: rank must be >= 1"),
    ([factors_task(weights=(-1.0,))], [1], 1, r"tasks\[0\] client 0: weight must be finite and >= 0"),
    ([factors_task(weights=(float("nan"),))], [1], 1, r"client 0: weight must be finite"),
    ([factors_task(d_out=0)], [1], 1, r"tasks\[0\]: d_out and d_in must be >= 1, got 0 x 3"),
    ([factors_task(), ("dense", 0, 3, FAKE, 1.0, FAKE, FAKE, FAKE)], [1, 1], 1,
     r"tasks\[1\]: dense input needs d_out, d_in >= 1"),
])
def test_svd_batched_rejects_bad_tasks_naming_them(cuda_ext, tasks, ranks, streams, message):
    with pytest.raises(ValueError, match=message):
        cuda_ext.svd_batched(**svd_args(tasks, ranks, streams=streams))


def test_weighted_sum_and_accumulate_reject_bad_arguments(cuda_ext):
    ws = dict(d_out=4, d_in=3, Bs=[FAKE], As=[FAKE], ranks=[2], weights=[1.0], out=FAKE, beta=0.0,
              tf32=False, stream=0)
    with pytest.raises(ValueError, match="weighted_sum: Bs is empty"):
        cuda_ext.weighted_sum(**{**ws, "Bs": [], "As": [], "ranks": [], "weights": []})
    with pytest.raises(ValueError, match="weighted_sum: Bs, As, ranks and weights must have the same length"):
        cuda_ext.weighted_sum(**{**ws, "weights": [1.0, 2.0]})
    with pytest.raises(ValueError, match="out must not be null"):
        cuda_ext.weighted_sum(**{**ws, "out": 0})
    with pytest.raises(ValueError, match=r"factors client 0: weight must be finite and >= 0"):
        cuda_ext.weighted_sum(**{**ws, "weights": [float("inf")]})
    with pytest.raises(ValueError, match=r"items\[0\] must be \(d_out, d_in, B, A, rank, weight, out\)"):
        cuda_ext.accumulate([(4, 3, FAKE, FAKE, 2, 1.0)], False, 0)
    with pytest.raises(ValueError, match=r"items\[1\]: out must not be null"):
        cuda_ext.accumulate([(4, 3, FAKE, FAKE, 2, 1.0, FAKE), (4, 3, FAKE, FAKE, 2, 1.0, 0)], False, 0)


# ---------------------------------------------------------------- a machine without a GPU
@pytest.fixture
def no_gpu(cuda_ext):
    count, _, _, _ = cuda_ext.probe()
    if count > 0:
        pytest.skip(f"this machine has {count} GPU(s): the cuda-marked tests cover it")
    return cuda_ext


def test_probe_reports_no_device_with_the_runtime_reason(no_gpu):
    count, runtime, driver, error = no_gpu.probe()
    assert count == 0 and runtime >= 12000 and driver >= 0 and error
    assert no_gpu.device_count() == 0


def test_device_calls_without_gpu_raise_runtime_error_naming_the_cuda_call(no_gpu):
    error = no_gpu.probe()[3]
    with pytest.raises(RuntimeError, match=r"CUDA backend: cudaGetDevice.* failed: " + re.escape(error)):
        no_gpu.device_info()
    with pytest.raises(RuntimeError, match=r"CUDA backend: .* failed: " + re.escape(error)):
        no_gpu.svd_batched(**svd_args([factors_task()], [1]))
    with pytest.raises(RuntimeError, match=r"CUDA backend: .* failed: " + re.escape(error)):
        no_gpu.weighted_sum(4, 3, [FAKE], [FAKE], [2], [1.0], FAKE, 0.0, False, 0)
    no_gpu.release()  # nothing cached: a no-op, not an error


def test_facade_says_why_the_backend_is_unavailable(no_gpu):
    import numpy as np

    from server.core import cuda
    error = no_gpu.probe()[3]
    ok, why = cuda.available()
    assert not ok and why.startswith("server._cuda (CUDA 1") and "finds no GPU: " + error in why
    assert cuda.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match=re.escape(error)):
        cuda.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA backend unavailable: server._cuda"):
        cuda.lowrank_svd([np.ones((4, 2), np.float32)], [np.ones((2, 3), np.float32)], [1.0], 1)


def test_cuda_aggregator_without_gpu_names_the_reason(no_gpu):
    pytest.importorskip("torch")
    from server.core.cuda_aggregation import CudaAggregator
    with pytest.raises(RuntimeError, match=r"device='cuda' requested but the CUDA backend is unavailable: server._cuda"):
        CudaAggregator(4)
