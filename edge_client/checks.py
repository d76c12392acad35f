"""Checks that run before any work and name the cause: a model folder that is missing or lacks
tokenizer files, and ranks that a model's modules cannot hold."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["check_local_model", "looks_like_path", "check_spec"]

_PEFT_PREFIX = "base_model.model."
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_local_model(name_or_path: str) -> bool:
    """True for an existing local folder (checked for a config and tokenizer files); a name that
    can only be a local path (see :func:`looks_like_path`) and does not exist fails here with one
    line naming the path, before any hub lookup. False: a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {str(path)!r} has no config.json (save it with save_pretrained)")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"model folder {str(path)!r} has no tokenizer files (expected one of "
                             f"{', '.join(_TOKENIZER_FILES)}; save the tokenizer with save_pretrained too)")
        return True
    if path.exists():
        raise ValueError(f"model path {name_or_path!r} is a file, expected a model folder or a .gguf file")
    if looks_like_path(name_or_path):
        raise ValueError(f"local model path {name_or_path!r} does not exist")
    return False


_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".json")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path, not a hub id (``name`` or ``org/name``):
    absolute, ``./``, ``../``, ``~``, a backslash, more than one ``/``, a weights-file suffix, or
    an ``a/b`` whose ``a`` is an existing local folder."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name.count("/") > 1:
        return True
    if Path(name).is_absolute() or name.lower().endswith(_FILE_SUFFIXES):
        return True
    head = name.split("/", 1)[0]
    return "/" in name and bool(head) and Path(head).expanduser().is_dir()


_WIRE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_spec(shapes: Mapping[str, tuple[int, int]], spec, targets: Sequence[str], *,
               strict_pattern: bool = False, wire_dtype: str = "float32", limits=None) -> None:
    """Every module's rank within its size; the update this spec produces within the wire's caps
    (``limits``: the decoder's ``DecodeLimits``, default the defaults: rank, module count, bytes at
    ``wire_dtype``); with ``strict_pattern`` every ``rank_pattern`` key must match one of the
    targeted modules (``shapes``: peft module path -> (d_out, d_in))."""
    from .wire import DecodeLimits
    from .wire.naming import pattern_matches

    limits = limits or DecodeLimits()
    if wire_dtype not in _WIRE_BYTES:
        raise ValueError(f"wire dtype must be one of {sorted(_WIRE_BYTES)}, got {wire_dtype!r}")
    total = 0
    for module, shape in shapes.items():
        r = spec.module_rank(module)
        if r > min(shape):
            raise ValueError(f"rank {r} of module {module.removeprefix(_PEFT_PREFIX)!r} is above its size "
                             f"{shape[0]} x {shape[1]}; use rank <= {min(shape)}")
        if r > limits.max_rank:
            raise ValueError(f"rank {r} of module {module.removeprefix(_PEFT_PREFIX)!r} is above the wire's "
                             f"max_rank {limits.max_rank}: the server would reject the update")
        total += r * (shape[0] + shape[1]) * _WIRE_BYTES[wire_dtype]
    if len(shapes) > limits.max_modules:
        raise ValueError(f"{len(shapes)} target modules exceed the wire's max_modules {limits.max_modules}: "
                         f"the server would reject the update")
    if total > limits.max_bytes:
        raise ValueError(f"the update would be {total:,} bytes of {wire_dtype} factors, above the wire's cap of "
                         f"{limits.max_bytes:,} bytes: lower the rank or send float16/bfloat16")
    if strict_pattern:
        unused = [k for k in spec.rank_pattern if not any(pattern_matches(k, m) for m in shapes)]
        if unused:
            raise ValueError(f"rank_pattern keys {unused} match no target module (targets: {list(targets)})")
