"""Base model handling for the simulation: the shipped tiny LLaMA, registered names, HF ids or paths, and
resetting a model to its base weights plus a global weight delta (peft module paths)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_client.trainer import DEFAULT_TARGETS, fingerprint, load_model, merge_deltas

__all__ = ["ASSET_MODEL", "TARGET_MODULES", "load_base", "fingerprint", "apply_delta", "linear_shapes"]

ASSET_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
TARGET_MODULES = list(DEFAULT_TARGETS)
_PEFT_PREFIX = "base_model.model."


def load_base(model: str | os.PathLike | None = None):
    """``(model, tokenizer)`` in float32 eval mode; None means the shipped tiny model. ``model`` is
    what ``edge_client.trainer.load_model`` takes: a registered name (``smollm2-135m``, converted
    once to a cached folder), a ``.gguf`` file, a local folder or a hub id."""
    if model is None and not (ASSET_MODEL / "config.json").exists():
        raise ValueError(f"the shipped base model is missing at {ASSET_MODEL}; run scripts/make_base_model.py")
    return load_model(str(model) if model is not None else str(ASSET_MODEL))


def linear_shapes(model, targets=TARGET_MODULES) -> dict[str, tuple[int, int]]:
    """peft module path -> (d_out, d_in) of every targeted linear layer."""
    import torch

    from edge_client.targets import is_conv1d, module_shape, resolve_targets

    targets = set(resolve_targets(model, targets))
    out = {}
    for name, mod in model.named_modules():
        if (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)) and name.rsplit(".", 1)[-1] in targets:
            out[_PEFT_PREFIX + name] = module_shape(mod)   # Conv1D (GPT-2) stores (d_in, d_out)
    return out


def apply_delta(model, base_state: Mapping, delta: Mapping[str, np.ndarray]) -> None:
    """Load ``base_state`` into ``model`` and add ``delta`` (module -> dW) to its weights."""
    model.load_state_dict(base_state)
    merge_deltas(model, delta)
