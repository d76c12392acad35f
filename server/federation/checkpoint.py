"""Atomic checkpoints: one safetensors file per run directory, no pickle.

Tensors hold the strategy state (``strategy/<key>``) and any runtime tensors
(``runtime/<key>``); the safetensors ``__metadata__`` key ``flexlora_checkpoint`` holds a
JSON document (schema, round completed, strategy meta, RNG state, results so far, the run
configuration it belongs to). The file is written to a temporary name in the same folder,
fsynced, then ``os.replace``d over the previous one, so a crash at any moment leaves either
the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

__all__ = ["CHECKPOINT_NAME", "Checkpoint", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_KEY = "flexlora_checkpoint"
_SCHEMA = 1


@dataclass(kw_only=True)
class Checkpoint:
    meta: dict                                    # JSON document (see module docstring)
    strategy_tensors: dict[str, np.ndarray]
    runtime_tensors: dict[str, np.ndarray]


def save_checkpoint(directory: str | Path, *, meta: Mapping, strategy_tensors: Mapping[str, np.ndarray],
                    runtime_tensors: Mapping[str, np.ndarray] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"strategy/{k}": np.ascontiguousarray(v) for k, v in strategy_tensors.items()}
    tensors.update({f"runtime/{k}": np.ascontiguousarray(v) for k, v in (runtime_tensors or {}).items()})
    doc = json.dumps({"schema": _SCHEMA, **meta}, sort_keys=True)
    data = safetensors.numpy.save(tensors, metadata={_KEY: doc})
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        final = directory / CHECKPOINT_NAME
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none yet."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        tensors = safetensors.numpy.load(data)
        with safetensors.safe_open(str(path), framework="numpy") as fh:
            raw = (fh.metadata() or {}).get(_KEY)
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if raw is None:
        raise ValueError(f"{path}: no {_KEY!r} metadata; not a flexlora checkpoint")
    meta = json.loads(raw)
    if meta.get("schema") != _SCHEMA:
        raise ValueError(f"{path}: checkpoint schema {meta.get('schema')!r}, expected {_SCHEMA}")
    return Checkpoint(meta=meta,
                      strategy_tensors={k[9:]: v for k, v in tensors.items() if k.startswith("strategy/")},
                      runtime_tensors={k[8:]: v for k, v in tensors.items() if k.startswith("runtime/")})
