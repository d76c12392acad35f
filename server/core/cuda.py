"""CUDA backend of :mod:`server.core.linalg`: the same truncated SVDs on torch CUDA tensors.

Optional: the compiled module ``server._cuda`` exists only in a build with
``FLEXLORA_CUDA=ON`` (cuBLAS GEMMs, cuSOLVER QR and Jacobi SVD; see ``csrc/cuda/``). Every
function takes torch CUDA tensors, or any array exposing ``__cuda_array_interface__`` or
DLPack (host arrays are copied to the device), and returns torch CUDA float32 tensors on the
input's device, ordered on torch's current stream. Routes and their meaning are those of
:mod:`server.core.linalg`; the Gaussian test matrix of the randomized routes comes from a GPU
counter-based generator, so GPU and CPU randomized results differ within the method's error.

``tf32=True`` runs the GEMMs in TF32 tensor-core math (about 1e-3 relative error in the
products, several times faster); the default is full fp32. ``streams`` is how many CUDA
streams a batched call spreads its modules over.

:func:`available` says whether this process can use the backend and why not; it never
raises, so callers (and tests) can probe it safely on machines without a GPU.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from server.core.validate import (
    GPU_METHODS,
    as_count,
    as_method,
    as_rank,
    check_factor_shapes,
    factor_sequences,
    per_layer_ranks,
    per_layer_weights,
)

__all__ = ["available", "resolve_device", "is_device_input", "device_info", "lowrank_svd",
           "lowrank_svd_batched", "dense_svd", "weighted_sum", "as_device_matrix", "options",
           "run_batched", "accumulate"]

_EXT: Any = None
_EXT_ERROR: str | None = None


def _ext():
    """The compiled module, imported on first use (never at import time of this module)."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            from server import _cuda  # type: ignore[attr-defined]
            _EXT = _cuda
        except ImportError as e:
            _EXT_ERROR = (f"server._cuda is not built ({e}); rebuild with FLEXLORA_CUDA=ON "
                          "(needs nvcc and the nvidia-cublas / nvidia-cusolver wheels)")
    if _EXT is None:
        raise RuntimeError(_EXT_ERROR)
    return _EXT


def available() -> tuple[bool, str]:
    """``(True, device description)`` when the CUDA backend can run here, else
    ``(False, reason)``: the backend is not built, its CUDA runtime finds no device (and the
    runtime's own words why), or torch cannot reach one. Never raises."""
    try:
        ext = _ext()
    except RuntimeError as e:
        return False, str(e)
    try:
        count, runtime, driver, error = ext.probe()
        if count < 1:
            built = f"CUDA {runtime // 1000}.{runtime % 1000 // 10}"
            drv = f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10}" if driver \
                else "no CUDA driver is installed"
            return False, (f"server._cuda ({built}) finds no GPU: {error} ({drv})")
    except Exception as e:  # a broken driver must not break the caller
        return False, f"CUDA probe failed: {e}"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed (the CUDA backend works on torch CUDA tensors)"
    try:
        if not torch.cuda.is_available():
            return False, (f"server._cuda sees {count} GPU(s) but torch {torch.__version__} "
                           "sees none (a CPU-only torch build?)")
        return True, str(ext.device_info())
    except Exception as e:
        return False, f"CUDA probe failed: {e}"


_READY = False


def _require():
    """The compiled module, after a successful probe (cached); RuntimeError with the reason
    otherwise."""
    global _READY
    if not _READY:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"CUDA backend unavailable: {why}")
        _READY = True
    return _ext()


def device_info() -> str:
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    return why


def resolve_device(device: str) -> str:
    """``"cpu"`` -> ``"cpu"``; ``"cuda"`` / ``"cuda:N"`` -> itself when the backend is
    available (else RuntimeError with the reason); ``"auto"`` -> ``"cuda"`` when available,
    else ``"cpu"``."""
    if not isinstance(device, str) or not (device in ("cpu", "auto", "cuda") or
                                           (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device == "cpu":
        return "cpu"
    ok, why = available()
    if device == "auto":
        return "cuda" if ok else "cpu"
    if not ok:
        raise RuntimeError(f"device={device!r} requested but the CUDA backend is unavailable: {why}")
    return device


def is_device_input(obj: Any, _depth: int = 0) -> bool:
    """True when ``obj`` (an array or nested sequences of arrays) holds a device array:
    a torch CUDA tensor or anything with ``__cuda_array_interface__``. Imports nothing."""
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if _depth < 3 and isinstance(obj, (list, tuple)) and obj:
        return is_device_input(obj[0], _depth + 1)
    return False


# ------------------------------------------------------------------------ conversion
def as_device_matrix(x: Any, name: str, device: Any = None):
    """``x`` as a C-contiguous float32 torch CUDA matrix (no copy when it already is one)."""
    import torch
    if not isinstance(x, torch.Tensor):
        if hasattr(x, "__cuda_array_interface__"):
            x = torch.as_tensor(x, device="cuda")
        elif hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray):
            x = torch.from_dlpack(x)
        else:
            x = torch.as_tensor(np.asarray(x))
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    target = torch.device(device) if device is not None else (
        x.device if x.is_cuda else torch.device("cuda", torch.cuda.current_device()))
    if x.device != target:
        x = x.to(target, non_blocking=x.is_pinned())
    return x.to(torch.float32).contiguous()


def _check_finite(named: list[tuple[str, Any]]) -> None:
    """One device reduction and one host sync for all arrays; the slow search only on
    failure, to name the first bad array and index."""
    import torch
    if not named:
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(flags.all()):
        return
    for (name, t), ok in zip(named, flags.tolist()):
        if not ok:
            bad = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])
            raise ValueError(f"{name} contains NaN or Inf (first at index {bad}: "
                             f"{float(t[bad])})")


def _factors(Bs, As, weights, prefix: str = "", device=None):
    Bs, As, w = factor_sequences(Bs, As, weights, prefix, one_array=lambda x: hasattr(x, "shape"))
    Bm = [as_device_matrix(b, f"{prefix}Bs[{k}]", device) for k, b in enumerate(Bs)]
    dev = Bm[0].device
    Am = [as_device_matrix(a, f"{prefix}As[{k}]", dev) for k, a in enumerate(As)]
    Bm = [b if b.device == dev else b.to(dev) for b in Bm]
    check_factor_shapes(Bm, Am, prefix)
    return Bm, Am, w


def options(method, oversample, power_iters, seed, streams, tf32) -> dict:
    """Validated options of a batched device SVD (what :func:`run_batched` takes)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(streams, bool) or not isinstance(streams, (int, np.integer)) or streams < 1:
        raise ValueError(f"streams must be an integer >= 1, got {streams!r}")
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32 must be True or False, got {tf32!r}")
    return dict(method=as_method(method, GPU_METHODS), oversample=as_count(oversample, "oversample"),
                power_iters=as_count(power_iters, "power_iters"), seed=int(seed) % (1 << 64),
                streams=int(streams), tf32=tf32)


_options = options  # the name used before it was public


def accumulate(items: list, tf32: bool, device) -> None:
    """In-place dense accumulation on ``device``'s current stream, many modules in one call:
    each item is ``(d_out, d_in, B_ptr, A_ptr, r, weight, dW_ptr)`` for CUDA float32 tensors
    B (d_out x r), A (r x d_in) and dW (d_out x d_in), all C-contiguous:
    ``dW += weight * B @ A``. The caller keeps the tensors alive until the stream has run."""
    if items:
        _ext().accumulate(items, bool(tf32), _stream(device))


def _stream(device) -> int:
    import torch
    return int(torch.cuda.current_stream(device).cuda_stream)


def run_batched(tasks: list, ranks: list[int], opts: dict, device, dense_exact: bool = False):
    """Batched truncated SVDs on the device (used by the CUDA aggregator): tasks are ``(Bs, As, weights)`` of validated CUDA tensors or ``(M, scale)``.
    Returns ``[(U, S, Vt, route)]``."""
    import torch
    native, outs = [], []
    for (task, rank) in zip(tasks, ranks):
        if len(task) == 3:
            Bm, Am, w = task
            m, n = Bm[0].shape[0], Am[0].shape[1]
        else:
            M, scale = task
            m, n = M.shape
        U = torch.empty((m, rank), dtype=torch.float32, device=device)
        S = torch.empty((rank,), dtype=torch.float32, device=device)
        Vt = torch.empty((rank, n), dtype=torch.float32, device=device)
        out = (U.data_ptr(), S.data_ptr(), Vt.data_ptr())
        if len(task) == 3:
            native.append(("factors", m, n, [b.data_ptr() for b in Bm],
                           [a.data_ptr() for a in Am], [b.shape[1] for b in Bm], list(w)) + out)
        else:
            native.append(("dense", m, n, M.data_ptr(), float(scale)) + out)
        outs.append((U, S, Vt))
    with torch.cuda.device(device):
        routes = _ext().svd_batched(native, ranks, opts["method"], opts["oversample"],
                                    opts["power_iters"], opts["seed"], dense_exact,
                                    opts["tf32"], opts["streams"], _stream(device))
    return [o + (r,) for o, r in zip(outs, routes)]


# ------------------------------------------------------------------------ public API
def lowrank_svd(Bs: Sequence[Any], As: Sequence[Any], weights: Sequence[float], rank: int, *,
                method: str = "auto", oversample: int = 10, power_iters: int = 2, seed: int = 0,
                tf32: bool = False, streams: int = 4, check_finite: bool = True):
    """:func:`server.core.linalg.lowrank_svd` on the GPU: ``(U, S, Vt)`` torch CUDA tensors."""
    rank = as_rank(rank)
    opts = _options(method, oversample, power_iters, seed, streams, tf32)
    _require()
    Bm, Am, w = _factors(Bs, As, weights)
    if check_finite:
        _check_finite([(f"Bs[{k}]", b) for k, b in enumerate(Bm)] +
                      [(f"As[{k}]", a) for k, a in enumerate(Am)])
    return run_batched([(Bm, Am, w)], [rank], opts, Bm[0].device)[0][:3]


def lowrank_svd_batched(layers: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                        weights: Sequence[float] | Sequence[Sequence[float]],
                        rank: int | Sequence[int], *, method: str = "auto", oversample: int = 10,
                        power_iters: int = 2, seed: int = 0, tf32: bool = False,
                        streams: int = 4, check_finite: bool = True):
    """:func:`server.core.linalg.lowrank_svd_batched` on the GPU: modules spread over
    ``streams`` CUDA streams in one native call."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: at least one module is needed")
    ranks = per_layer_ranks(rank, len(layers))
    opts = _options(method, oversample, power_iters, seed, streams, tf32)
    _require()
    per_layer = per_layer_weights(weights, len(layers))
    tasks, named, device = [], [], None
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"layers[{i}] must be a (Bs, As) pair")
        Bm, Am, w = _factors(layer[0], layer[1], per_layer[i], f"layers[{i}].", device)
        device = Bm[0].device
        tasks.append((Bm, Am, w))
        named += [(f"layers[{i}].Bs[{k}]", b) for k, b in enumerate(Bm)]
        named += [(f"layers[{i}].As[{k}]", a) for k, a in enumerate(Am)]
    if check_finite:
        _check_finite(named)
    return [r[:3] for r in run_batched(tasks, ranks, opts, device)]


def dense_svd(M: Any, rank: int, *, method: str = "randomized", oversample: int = 10,
              power_iters: int = 2, seed: int = 0, tf32: bool = False,
              check_finite: bool = True):
    """:func:`server.core.linalg.dense_svd` on the GPU (``"exact"``: full Jacobi SVD)."""
    rank = as_rank(rank)
    as_method(method, ("randomized", "exact"))
    opts = _options("dense", oversample, power_iters, seed, 1, tf32)
    _require()
    Md = as_device_matrix(M, "M")
    if check_finite:
        _check_finite([("M", Md)])
    return run_batched([(Md, 1.0)], [rank], opts, Md.device,
                       dense_exact=(method == "exact"))[0][:3]


def weighted_sum(Bs: Sequence[Any], As: Sequence[Any], weights: Sequence[float], *,
                 out: Any = None, tf32: bool = False, check_finite: bool = True):
    """``sum_k weights[k] Bs[k] @ As[k]`` on the GPU by one GEMM over the concatenated
    factors; with ``out`` (a float32 C-contiguous torch CUDA tensor) the sum is added to it in
    place. Asynchronous on torch's current stream."""
    import torch
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32 must be True or False, got {tf32!r}")
    _require()
    Bm, Am, w = _factors(Bs, As, weights)
    if check_finite:
        _check_finite([(f"Bs[{k}]", b) for k, b in enumerate(Bm)] +
                      [(f"As[{k}]", a) for k, a in enumerate(Am)])
    device = Bm[0].device
    m, n = Bm[0].shape[0], Am[0].shape[1]
    beta = 1.0
    if out is None:
        out, beta = torch.empty((m, n), dtype=torch.float32, device=device), 0.0
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and
              out.is_contiguous() and out.device == device):
        raise ValueError(f"out must be a C-contiguous float32 torch tensor on {device}")
    elif tuple(out.shape) != (m, n):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(m, n)} (d_out, d_in)")
    with torch.cuda.device(device):
        _ext().weighted_sum(m, n, [b.data_ptr() for b in Bm], [a.data_ptr() for a in Am],
                            [b.shape[1] for b in Bm], w, out.data_ptr(), beta, tf32,
                            _stream(device))
    return out
