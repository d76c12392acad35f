"""Base model handling for the simulation: the shipped tiny LLaMA, HF ids or paths,
fingerprints, and applying a global weight delta (peft module paths) to a copy of the base."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["ASSET_MODEL", "TARGET_MODULES", "load_base", "fingerprint", "peft_module_to_param",
           "apply_delta", "linear_shapes"]

ASSET_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PEFT_PREFIX = "base_model.model."


def load_base(model: str | os.PathLike | None = None):
    """``(model, tokenizer)`` in float32 eval mode; None means the shipped tiny model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are the ones on stderr
    src = str(model) if model is not None else str(ASSET_MODEL)
    if model is None and not (ASSET_MODEL / "config.json").exists():
        raise ValueError(f"the shipped base model is missing at {ASSET_MODEL}; "
                         "run scripts/make_base_model.py")
    try:
        tok = AutoTokenizer.from_pretrained(src)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except OSError as exc:
        raise ValueError(f"cannot load model {src!r} (no local copy and no network?): {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.eval()
    return lm, tok


def fingerprint(model) -> str:
    """Hex digest of the base weights (names, shapes and bytes); identifies the base model."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        arr = tensor.detach().cpu().contiguous().float().numpy()
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def peft_module_to_param(module: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    name = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
    return name + ".weight"


def linear_shapes(model, targets=TARGET_MODULES) -> dict[str, tuple[int, int]]:
    """peft module path -> (d_out, d_in) of every targeted linear layer."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out[_PEFT_PREFIX + name] = tuple(mod.weight.shape)
    return out


def apply_delta(model, base_state: Mapping, delta: Mapping[str, np.ndarray]) -> None:
    """Load ``base_state`` into ``model`` and add ``delta`` (module -> dW) to its weights."""
    import torch

    with torch.no_grad():
        model.load_state_dict(base_state)
        params = dict(model.named_parameters())
        for module, dw in delta.items():
            pname = peft_module_to_param(module)
            if pname not in params:
                raise ValueError(f"delta names module {module!r}, which the model does not have")
            p = params[pname]
            if tuple(p.shape) != tuple(dw.shape):
                raise ValueError(f"delta[{module!r}] is {tuple(dw.shape)}, weight is {tuple(p.shape)}")
            p.add_(torch.from_numpy(np.asarray(dw, np.float32)))
