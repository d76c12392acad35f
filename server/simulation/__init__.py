"""Embedded federation runtime (``flexlora simulate``): synthetic suite, devices, local
training, evaluation, checkpointing and fault handling.

Import the pieces from their modules (``server.simulation.runtime.run_simulation`` etc.);
this package does not import torch until a run starts.
"""

from __future__ import annotations

__all__ = ["SimulationConfig", "SimulationError", "run_simulation", "results_summary"]


def __getattr__(name: str):
    if name in __all__:
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(name)
