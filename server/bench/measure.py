"""Timing (warm-up, repeats, median and spread) and peak memory.

Peak memory. ``tracemalloc`` sees only Python's allocator, not OpenBLAS, LAPACK workspaces,
torch's CPU allocator or our C++ core, so the resident set is measured instead:

* ``inprocess`` (default for ``quick``): before the measured call, glibc is asked to return
  free memory (``malloc_trim``) and the kernel's resident high-water mark is reset (writing
  ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0); afterwards ``VmHWM - VmRSS(before)`` is the
  peak the call added. :func:`prepare_allocator` fixes glibc's mmap threshold so large buffers
  are always mapped and unmapped, not kept in a heap that a later call could reuse unseen.
  Cheap, but memory a library keeps across calls (BLAS buffers, caches) is charged only to
  the first call that grows it, so it is a lower bound.
* ``subprocess`` (default for ``paper``): every (case, backend) pair runs once more in a
  fresh ``python -m server.bench.worker`` process that imports only that backend's library,
  builds the case from its seed and measures the same delta around a cold call. It counts
  everything the call needs, but costs an interpreter start and a case build per pair
  (about 1-3 s each), which is why ``quick`` does not use it.
* Where ``clear_refs`` cannot be written (not Linux, restricted containers), a sampling
  thread polls the RSS every millisecond with psutil and reports the maximum (it can miss
  spikes shorter than the interval).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

MEMORY_MODES = ("inprocess", "subprocess", "off")


@dataclass(kw_only=True)
class Timing:
    samples: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range divided by the median (0 for a single sample)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "min_s": min(self.samples),
            "max_s": max(self.samples), "iqr_rel": self.spread, "repeats": len(self.samples),
            "warmup_s": self.warmup_s, "samples_s": list(self.samples),
        }


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_call(fn: Callable[[], Any], *, repeats: int, min_repeats: int, budget_s: float,
              sync: Callable[[], None] = lambda: None, warmup_s: float = 0.0) -> Timing:
    """Run ``fn`` up to ``repeats`` times; stop early once ``min_repeats`` ran and ``budget_s`` is spent.

    The caller has already done the warm-up (its result is reused for the accuracy check).
    """
    timing = Timing(warmup_s=warmup_s)
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        timing.samples.append(time.perf_counter() - t0)
        if i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return timing


def time_round_robin(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int, memory: bool = False
                     ) -> tuple[dict[str, Timing], dict[str, Any], dict[str, int]]:
    """Time several calls in turn: every call ``warmup`` times untimed, then ``repeats`` rounds of
    one timed call of each, so load from other processes drifts over all of them alike.

    Returns per name its :class:`Timing`, the output of its last call and, with ``memory``, the
    largest resident memory one call added (:class:`PeakMemory`, bytes; 0 when unknown).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing() for name in fns}
    outs: dict[str, Any] = {}
    peaks = {name: 0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with PeakMemory() if memory else contextlib.nullcontext() as peak:
                t0 = time.perf_counter()
                outs[name] = fn()
                timings[name].samples.append(time.perf_counter() - t0)
            if memory:
                peaks[name] = max(peaks[name], peak.peak_bytes or 0)
    return timings, outs, peaks


def python_command() -> list[str]:
    """The command that starts a fresh measuring process like this one: this interpreter, and ``-S``
    when this one runs without ``site`` (a checkout run beside an editable install of another)."""
    return [sys.executable, *(["-S"] if sys.flags.no_site else [])]


# ---- resident memory --------------------------------------------------------------------

def proc_status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...); None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm_mb() -> float:
    """This process's resident high-water mark (``VmHWM``) in MiB; NaN where the kernel has none."""
    kib = proc_status_kib("VmHWM")
    return kib / 1024 if kib is not None else float("nan")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            _libc.malloc_trim  # noqa: B018 - probe for glibc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def prepare_allocator(mmap_threshold: int = 1 << 20) -> None:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) so big buffers return to the OS on free."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(mmap_threshold))


def trim() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


class PeakMemory:
    """Context manager: ``peak_bytes`` is the resident memory the block added at its peak."""

    def __init__(self, sample_interval_s: float = 0.001) -> None:
        self.interval = sample_interval_s
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        trim()
        self._before = proc_status_kib("VmRSS")
        self._use_hwm = self._before is not None and _reset_hwm()
        if self._use_hwm:
            self.method = "VmHWM"
            return self
        self.method = "psutil-sampling"
        import psutil

        self._proc = psutil.Process()
        self._before_b = self._proc.memory_info().rss
        self._max = self._before_b
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self._use_hwm:
            hwm = proc_status_kib("VmHWM")
            self.peak_bytes = max(0, (hwm - self._before)) * 1024 if hwm is not None else None
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak_bytes = max(0, self._max - self._before_b)
