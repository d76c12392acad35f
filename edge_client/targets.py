"""Which modules get LoRA: discovered from the model itself, or named by the user and checked.

The default ("auto") is every linear projection inside the model's repeated blocks (attention and
MLP), found by walking the modules: ``torch.nn.Linear`` and transformers' ``Conv1D`` (GPT-2 keeps
its weights transposed, ``(in, out)``). Embeddings, the LM head and anything outside the blocks are
left alone, as peft's per-architecture defaults do. Short names come in the order the model
defines them, so a LLaMA-like model gives ``q/k/v/o_proj, gate/up/down_proj``, GPT-2
``c_attn, c_proj, c_fc`` and GPT-NeoX ``query_key_value, dense, dense_h_to_4h, dense_4h_to_h``.

probe, plan, train, simulate and Flower all resolve targets through :func:`resolve_targets` (on
the loaded model) or :func:`resolve_targets_for_config` (on a shapes-only meta model), so they
see the same set; a name that matches nothing fails before any work, listing the model's names.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = ["AUTO", "is_auto", "discover_targets", "linear_module_names", "resolve_targets",
           "resolve_targets_for_config", "is_conv1d", "has_conv1d", "module_shape"]

AUTO = ("auto",)


def is_auto(targets) -> bool:
    """None, "", "auto" or a list of just that: discover the targets from the model."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return targets.strip() in ("", "auto")
    items = [str(t).strip() for t in targets if str(t).strip()]
    return not items or items == ["auto"]


def is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return isinstance(module, Conv1D)


def _is_projection(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def module_shape(module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D (Conv1D stores ``(d_in, d_out)``)."""
    d0, d1 = module.weight.shape
    return (int(d1), int(d0)) if is_conv1d(module) else (int(d0), int(d1))


def has_conv1d(model) -> bool:
    return any(is_conv1d(m) for m in model.modules())


def linear_module_names(model) -> list[str]:
    """Short names of every Linear/Conv1D of the model (first-seen order), blocks or not."""
    out: list[str] = []
    for name, mod in model.named_modules():
        if name and _is_projection(mod):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in out:
                out.append(leaf)
    return out


def discover_targets(model) -> tuple[str, ...]:
    """Short names of the projections inside the repeated blocks (a numbered path component)."""
    out: list[str] = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if not _is_projection(mod) or not any(p.isdigit() for p in parts[:-1]):
            continue
        if parts[-1] not in out:
            out.append(parts[-1])
    if not out:
        raise ValueError(f"found no linear projection inside the blocks of {type(model).__name__}; "
                         f"pass --targets (the model's linear layers: {linear_module_names(model)})")
    return tuple(out)


def resolve_targets(model, requested: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The target short names for ``model``: discovered when ``requested`` is auto, else each
    name checked to match at least one Linear/Conv1D (peft's suffix matching)."""
    if is_auto(requested):
        return discover_targets(model)
    names = [str(t).strip() for t in ([requested] if isinstance(requested, str) else requested) if str(t).strip()]
    paths = [n for n, m in model.named_modules() if n and _is_projection(m)]
    unmatched = [t for t in names if not any(p == t or p.endswith("." + t) for p in paths)]
    if unmatched:
        raise ValueError(f"target module(s) {unmatched} match no linear layer of {type(model).__name__}; "
                         f"its linear layers are {linear_module_names(model)} "
                         f"(default 'auto': {list(discover_targets(model))})")
    return tuple(names)


# Names transformers gives the feed-forward block of a decoder layer (LLaMA/Qwen2/Mistral/GPT-2/
# GPT-NeoX: mlp; Falcon-style and others: feed_forward / ffn).
MLP_CONTAINERS = ("mlp", "feed_forward", "ffn")


def ffn_pattern_keys(model, targets: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """``rank_pattern`` keys that select the feed-forward projections among ``targets``:
    ``<container>.<leaf>`` for every targeted projection inside an MLP block of a repeated layer
    (``mlp.gate_proj`` on LLaMA, ``mlp.c_fc``/``mlp.c_proj`` on GPT-2, whose attention has a
    ``c_proj`` too, ``mlp.dense_h_to_4h``/``mlp.dense_4h_to_h`` on GPT-NeoX). Empty when the
    targets hold no MLP projection."""
    leaves = set(resolve_targets(model, targets))
    out: list[str] = []
    for name, mod in model.named_modules():
        parts = name.split(".")
        if (len(parts) >= 2 and _is_projection(mod) and parts[-1] in leaves and parts[-2] in MLP_CONTAINERS
                and any(p.isdigit() for p in parts[:-2])):
            key = f"{parts[-2]}.{parts[-1]}"
            if key not in out:
                out.append(key)
    return tuple(out)


_CONFIG_CACHE: dict[str, tuple[str, ...]] = {}


def meta_model(model_config):
    """The model of ``model_config`` on torch's meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def resolve_targets_for_config(model_config, requested: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """:func:`resolve_targets` on a meta model of ``model_config`` (probe and plan: no weights)."""
    key = json.dumps(model_config.to_dict(), sort_keys=True, default=str) + "|" + json.dumps(
        None if is_auto(requested) else list(requested if not isinstance(requested, str) else [requested]))
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE[key] = resolve_targets(meta_model(model_config), requested)
    return _CONFIG_CACHE[key]
