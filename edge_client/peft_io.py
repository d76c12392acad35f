"""peft adapter folders in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

In: :func:`read_peft_adapter` turns a folder that peft wrote (``save_pretrained``) into a
``ClientUpdate``, honouring ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
``use_rslora`` and ``target_modules``. The per-module rank is read from the tensors and the
per-module alpha resolved with peft's own key matching, then both are written back as exact
(escaped) module paths, so the wire sees no regular expression it would refuse. A folder has no
example count: ``flexlora.json`` beside the adapter may give ``num_examples`` and ``client_id``,
otherwise the adapter weighs 1 (equal weights). DoRA, ``modules_to_save`` and LoRA on embeddings
are refused with one line: FlexLoRA aggregates only ``s B A`` products.

Out: :func:`write_peft_adapter` writes factors (a client's update, the server's global factors at
any rank) as a folder ``PeftModel.from_pretrained`` loads with the same outputs.

:func:`read_update_path` is what every place that takes an update file calls: a folder is a
peft adapter, a file is a wire-format update.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .wire import ClientUpdate, DecodeLimits, decode_update, module_names, short_name

__all__ = ["is_peft_folder", "read_peft_adapter", "write_peft_adapter", "read_update_path"]

CONFIG_NAME, WEIGHTS_NAME, SIDE_NAME = "adapter_config.json", "adapter_model.safetensors", "flexlora.json"
_PREFIX = "base_model.model."


def is_peft_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def _peft_pattern_value(pattern: Mapping, module_path: str):
    """peft's ``get_pattern_key`` semantics on the path without the ``base_model.model.`` prefix."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def _exact_key(module: str) -> str:
    path = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
    return path.replace(".", "\\.")


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.detach().to(dtype=__import__("torch").float32).numpy() for k, v in load_file(str(path)).items()}


def read_peft_adapter(folder, *, client_id: str | None = None, num_examples: int | None = None,
                      base_model: str | None = None, limits: DecodeLimits | None = None) -> ClientUpdate:
    """A peft LoRA adapter folder as a ``ClientUpdate`` (see the module docstring)."""
    folder = Path(folder)
    where = f"peft adapter {str(folder)!r}"
    if not is_peft_folder(folder):
        raise ValueError(f"{where}: no {CONFIG_NAME} (not a peft adapter folder)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{where}: no {WEIGHTS_NAME} (pickled adapter_model.bin is not read; re-save with "
                         "safe_serialization=True)")
    from .wire.codec import json_loads_strict

    cfg = json_loads_strict(Path(folder / CONFIG_NAME).read_text(encoding="utf-8"), f"{where}: {CONFIG_NAME}")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: {CONFIG_NAME} is not a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora) are not supported: the magnitude vector has no "
                         "FlexLoRA aggregate; train with use_dora=False")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported: only LoRA "
                         "factors are aggregated; train without modules_to_save")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={cfg['bias']!r} is not supported (only bias='none')")
    tensors = _load_tensors(weights)
    odd = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise ValueError(f"{where}: tensors other than lora_A/lora_B weights are not supported "
                         f"(e.g. {odd[0]!r}: DoRA magnitude, embedding LoRA or a saved module)")
    modules = module_names(tensors)
    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", r))
    rank_pattern, alpha_pattern = {}, {}
    for m in modules:
        path = m[len(_PREFIX):] if m.startswith(_PREFIX) else m
        inner = int(tensors[m + ".lora_A.weight"].shape[0])
        if inner != r:
            rank_pattern[_exact_key(m)] = inner
        a = _peft_pattern_value(cfg.get("alpha_pattern") or {}, path)
        if a is not None and float(a) != alpha:
            alpha_pattern[_exact_key(m)] = float(a)
    targets = sorted({short_name(m) for m in modules})
    declared = cfg.get("target_modules")
    if isinstance(declared, (list, tuple)) and declared:
        unknown = [t for t in targets if not any(t == d or t.endswith("." + d) or d.endswith("." + t) for d in declared)]
        if unknown:
            raise ValueError(f"{where}: tensors for modules {unknown} that target_modules {declared} does not name")
    side = {}
    if (folder / SIDE_NAME).is_file():
        side = json_loads_strict((folder / SIDE_NAME).read_text(encoding="utf-8"), f"{where}: {SIDE_NAME}")
    update = ClientUpdate(client_id=client_id or side.get("client_id") or folder.name[:200] or "peft",
                          factors=tensors, num_examples=int(num_examples or side.get("num_examples", 1)),
                          rank=r, rank_pattern=rank_pattern, alpha=alpha, alpha_pattern=alpha_pattern,
                          rslora=bool(cfg.get("use_rslora", False)),
                          base_model=str(base_model or side.get("base_model")
                                         or cfg.get("base_model_name_or_path") or "unknown")[:256],
                          target_modules=targets)
    if limits is not None:
        update._validate(limits)
    return update


def read_update_path(path, *, limits: DecodeLimits | None = None, **peft_kwargs) -> ClientUpdate:
    """A ``ClientUpdate`` from a wire-format update file or a peft adapter folder."""
    p = Path(path)
    if p.is_dir():
        return read_peft_adapter(p, limits=limits, **peft_kwargs)
    if not p.exists():
        raise ValueError(f"update {str(p)!r} does not exist")
    return decode_update(p.read_bytes(), limits=limits)


def write_peft_adapter(out_dir, factors: Mapping[str, np.ndarray], *, alpha: float,
                       alpha_pattern: Mapping[str, float] | None = None, rslora: bool = False,
                       base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False,
                       extra: Mapping | None = None) -> str:
    """Write peft-named ``factors`` as a peft LoRA folder; ranks come from the tensors (the most
    common one is ``r``, the others exact ``rank_pattern`` entries). ``alpha_pattern`` keys use
    the wire's semantics (matched against the module path)."""
    from peft import LoraConfig
    from safetensors.numpy import save_file

    from .wire.naming import pattern_matches

    modules = module_names(factors)
    ranks = {m: int(np.asarray(factors[m + ".lora_A.weight"]).shape[0]) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {_exact_key(m): k for m, k in ranks.items() if k != r}
    alphas = {}
    for m in modules:
        for key, value in (alpha_pattern or {}).items():
            if pattern_matches(key, m):
                if float(value) != float(alpha):
                    alphas[_exact_key(m)] = float(value)
                break
    config = LoraConfig(r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alphas, use_rslora=rslora,
                        target_modules=sorted({short_name(m) for m in modules}), bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out,
                        base_model_name_or_path=base_model_name_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in factors.items()}, str(out / WEIGHTS_NAME))
    if extra:
        (out / SIDE_NAME).write_text(json.dumps(dict(extra), indent=1), encoding="utf-8")
    return str(out)
