"""The backend interface and the registry.

A backend is a small object: ``name``, ``available() -> (ok, reason)``, ``run(inputs) ->
(U, S, Vt)``. Everything else has a default. Adding one (e.g. a CUDA backend) is one file
in this package that subclasses :class:`Backend` and calls :func:`register`; the package
imports every module in it, so nothing else changes::

    # server/bench/backends/ours_cuda.py
    from .base import Backend, BenchSettings, register

    class OursCuda(Backend):
        name, family, device = "ours-cuda:randomized", "ours", "cuda"
        def available(self):
            try:
                from server import _cuda  # noqa
            except ImportError as exc:
                return False, f"CUDA core not built ({exc})"
            return True, ""
        def prepare(self, case, settings):   # untimed: host -> device
            return ...
        def run(self, inputs, settings):     # timed
            return U, S, Vt
        def sync(self):
            import torch; torch.cuda.synchronize()

    register(OursCuda())

``inputs`` is whatever ``prepare`` returned; by default the :class:`~server.bench.cases.Case`
itself (use ``case.matrix`` for the dense M or ``case.Bs, case.As, case.weights``).
Results may be NumPy arrays or tensors; :meth:`Backend.to_numpy` converts them (untimed).
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.bench import flops as F


@dataclass(kw_only=True, frozen=True)
class BenchSettings:
    """Knobs shared by every randomized backend so that they are compared like for like."""

    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {self.oversample}")
        if self.power_iters < 0:
            raise ValueError(f"power_iters must be >= 0, got {self.power_iters}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class Backend:
    name: str = ""
    family: str = ""
    device: str = "cpu"            # "cpu" or "cuda"
    inputs: str = "dense"          # "dense": runs on M; "factored": needs the LoRA factors; "both"
    algorithm: str = ""            # one line for --list-backends
    requires: tuple[str, str] | None = None   # (module that must import, package to name when it does not)

    def available(self) -> tuple[bool, str]:
        if self.requires:
            module, package = self.requires
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return False, f"{package} not installed ({exc})"
        return True, ""

    def applies(self, case) -> tuple[bool, str]:
        if self.inputs == "factored" and case.spec.kind != "factored":
            return False, "needs factored input"
        return True, ""

    def prepare(self, case, settings: BenchSettings) -> Any:
        return case

    def run(self, inputs: Any, settings: BenchSettings):
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (CUDA backends); the timer calls it after ``run``."""

    def to_numpy(self, result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.asarray(_host(x)) for x in result)  # type: ignore[return-value]

    def flops(self, case, settings: BenchSettings, info: dict) -> float | None:
        """Nominal operation count (see flops.py); ``info`` holds what the untimed run learned."""
        return None

    def extra(self, case, settings: BenchSettings) -> dict:
        """Per-case facts worth reporting (e.g. the route ``auto`` picked)."""
        return {}

    def uses_formed_matrix(self, case) -> bool:
        """True when the backend runs on the dense M of a factored case (formation reported apart)."""
        return case.spec.kind == "factored" and self.inputs == "dense"


def _host(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if not backend.name:
        raise ValueError("backend.name must be non-empty")
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def all_backends() -> list[Backend]:
    return list(_REGISTRY.values())


def select(patterns: list[str] | None, device: str | None = None) -> list[Backend]:
    """Backends whose name matches any glob in ``patterns`` (all when None), in registry order."""
    chosen = []
    for b in _REGISTRY.values():
        if patterns and not any(fnmatch.fnmatchcase(b.name, p) for p in patterns):
            continue
        if device and b.device != device:
            continue
        chosen.append(b)
    if patterns:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(b.name, p) for b in _REGISTRY.values()):
                raise ValueError(f"backends: {p!r} matches no backend; known: {', '.join(_REGISTRY)}")
    return chosen


# Common FLOP helpers for backends that run a dense algorithm on M.
def dense_exact_flops(case) -> float:
    return F.svd_thin(case.spec.d_out, case.spec.d_in)


def dense_randomized_flops(case, settings: BenchSettings) -> float:
    s = case.spec
    return F.randomized_dense(s.d_out, s.d_in, s.rank, settings.oversample, settings.power_iters)
