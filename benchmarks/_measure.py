"""Measuring helpers for the benchmarks: peak RSS, repeated timing, sgemm peak, machine."""
from __future__ import annotations

import os
import platform
import threading
import time

import numpy as np
import psutil


class PeakRSS:
    """Peak resident memory above the starting point, sampled every 5 ms."""
    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.growth_mb = (self.peak - self.base) / 2**20


def timed(fn, repeats, warmup, collect=None):
    for _ in range(warmup):
        fn()
    times, out, rss = [], None, 0.0
    for _ in range(repeats):
        if collect is not None and times:
            collect.clear()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        rss = max(rss, mem.growth_mb)
    return out, times, rss


def sgemm_peak(threads):
    from server import _core
    n = 2048
    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    _core.weighted_sum([B], [A], [1.0], None, threads)
    best = min(_timeit(lambda: _core.weighted_sum([B], [A], [1.0], None, threads))
               for _ in range(3))
    return 2.0 * n**3 / best / 1e9


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine(threads):
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from server import _core
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "ours_blas": _core.blas_config(),
            "platform": platform.platform()}
