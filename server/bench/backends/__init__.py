"""Backend registry; every module in this package registers its backends on import.

See :mod:`server.bench.backends.base` for the interface and how to add one in a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from server.bench.backends.base import Backend, BenchSettings, all_backends, register, select

__all__ = ["Backend", "BenchSettings", "all_backends", "register", "select", "load_all"]

_loaded = False


def load_all() -> list[Backend]:
    """Import every backend module in this package once (libraries themselves load lazily)."""
    global _loaded
    if not _loaded:
        names = [m.name for m in pkgutil.iter_modules(__path__)]
        for mod in sorted(names, key=lambda n: (not n.startswith("ours"), n)):
            if mod != "base":
                importlib.import_module(f"{__name__}.{mod}")
        _loaded = True
    return all_backends()
