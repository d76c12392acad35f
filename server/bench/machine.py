"""What the numbers were measured on: CPU, cores, BLAS and its threads, GPU, library versions."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Callable

import numpy as np

from server.bench.measure import time_call


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    out = []
    for pool in threadpool_info():
        out.append({k: pool.get(k) for k in ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture")})
    return out


def _version(mod: str) -> str | None:
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001 - a missing optional library is just "absent"
        return None


def gpu_info() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())]


def gemm_gflops(matmul: Callable[[], object], n: int, repeats: int = 3) -> float:
    """The rate of ``matmul`` (one n x n x n GEMM, ``2 n^3`` FLOPs): one warm-up call, then the best of ``repeats``."""
    matmul()
    return 2.0 * n ** 3 / time_call(matmul, repeats=repeats, min_repeats=repeats, budget_s=float("inf")).best / 1e9


def sgemm_gflops(n: int = 1024, repeats: int = 3) -> float:
    """This machine's float32 GEMM rate through NumPy's BLAS (best of a few), a ceiling to read GFLOP/s against."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return gemm_gflops(lambda: a @ b, n, repeats)


def core_sgemm_gflops(threads: int, n: int = 2048, repeats: int = 3) -> float:
    """The float32 GEMM rate through our native core (``linalg.weighted_sum`` of one B @ A, unchecked)."""
    from server.core import linalg

    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    return gemm_gflops(lambda: linalg.weighted_sum([B], [A], [1.0], threads=threads, validated=True), n, repeats)


def dgemm_gflops(threads: int | None = None, n: int = 2048, repeats: int = 3) -> float:
    """The float64 GEMM rate through NumPy's BLAS, limited to ``threads`` (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    with threadpool_limits(threads):
        return gemm_gflops(lambda: a @ b, n, repeats)


def short_info(threads: int) -> dict:
    """A one-line machine record for a script's JSON: CPU, cores, threads, versions, our core's BLAS."""
    import torch

    from server.core import linalg

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "ours_blas": linalg.blas_config(),
            "platform": platform.platform()}


def machine_info(threads: int | None = None) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "cores_logical": os.cpu_count(),
        "threads_requested": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "blas": blas_info(),
        "gpus": gpu_info(),
        "versions": {m: _version(m) for m in ("numpy", "scipy", "sklearn", "torch")},
        "sgemm_gflops": round(sgemm_gflops(), 1),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        importlib.import_module("server.core.linalg")
        info["flexlora_core"] = "built"
    except Exception as exc:  # noqa: BLE001
        info["flexlora_core"] = f"not available ({type(exc).__name__})"
    return info


def format_machine(info: dict) -> str:
    blas = "; ".join(
        f"{b.get('internal_api')} {b.get('version') or ''} ({b.get('prefix')}, {b.get('num_threads')} threads)".replace("  ", " ")
        for b in info["blas"] if b.get("user_api") == "blas"
    ) or "unknown"
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines = [
        f"machine : {info['cpu']}, {info['cores_usable']} usable cores ({info['cores_logical']} logical)",
        f"threads : {info['threads_requested'] or 'default'} requested; torch {info.get('torch_threads', '-')}",
        f"BLAS    : {blas}",
        f"sgemm   : {info['sgemm_gflops']} GFLOP/s (NumPy float32 1024^3, best of 3)",
        f"GPU     : {', '.join(info['gpus']) or 'none'}",
        f"core    : server._core {info['flexlora_core']}",
        f"versions: {vers}; python {info['python']}",
    ]
    return "\n".join(lines)
