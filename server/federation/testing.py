"""Crash injection for the checkpoint writer, shared by the crash-safety tests and
``benchmarks/kill_loop.py``: :class:`CrashingOs` stands in for the ``os`` module that
``server.federation.checkpoint`` uses and crashes (raises, or ends the process) at one point of
a save, so a test can check that the previous checkpoint survives."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["CrashingOs", "CRASH_POINTS"]

CRASH_POINTS = ("write", "fsync", "replace")


class _HalfWriter:
    """A file that writes half of what it is given, makes that half durable, then crashes."""

    def __init__(self, fh, real_os, crash: Callable[[], None]) -> None:
        self.fh, self._os, self._crash = fh, real_os, crash

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        self._os.fsync(self.fh.fileno())
        self._crash()

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)


class CrashingOs:
    """``os`` for ``checkpoint`` with a crash at ``point``: ``"write"`` (half of the file written),
    ``"fsync"`` or ``"replace"`` (before the call), while ``armed()`` is true. ``crash`` raises or
    ends the process; everything else is the real ``os``."""

    def __init__(self, point: str, crash: Callable[[], None], armed: Callable[[], bool] = lambda: True,
                 real_os=os) -> None:
        if point not in CRASH_POINTS:
            raise ValueError(f"point must be one of {CRASH_POINTS}, got {point!r}")
        self._point, self._crash, self._armed, self._os = point, crash, armed, real_os

    def __getattr__(self, name):
        return getattr(self._os, name)

    def _at(self, point: str) -> bool:
        return self._point == point and self._armed()

    def fdopen(self, *a, **kw):
        fh = self._os.fdopen(*a, **kw)
        return _HalfWriter(fh, self._os, self._crash) if self._at("write") else fh

    def fsync(self, fd):
        if self._at("fsync"):
            self._crash()
        return self._os.fsync(fd)

    def replace(self, *a, **kw):
        if self._at("replace"):
            self._crash()
        return self._os.replace(*a, **kw)
