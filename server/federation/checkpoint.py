"""Atomic checkpoints: one safetensors file per run directory, no pickle.

Tensors hold the strategy state (``strategy/<key>``) and any runtime tensors
(``runtime/<key>``); the safetensors ``__metadata__`` key ``flexlora_checkpoint`` holds a
JSON document (schema, round completed, strategy meta, RNG state, results so far, the run
configuration it belongs to). The file is written to a temporary name in the same folder,
fsynced, then ``os.replace``d over the previous one, so a crash at any moment leaves either
the old or the new checkpoint, never a torn one.

Besides the newest (``checkpoint.safetensors``) the last ``keep`` rounds stay as
``checkpoint-rNNNNNN.safetensors`` (hard links where the file system allows). The metadata key
``flexlora_sha256`` holds the SHA-256 of the JSON document and of the tensor data; a file whose
hashes do not match is refused on load, and :func:`load_checkpoint` falls back to the newest
good round file and says so (``Checkpoint.fallback``). :func:`lock_directory` takes an exclusive
``flock`` on ``<dir>/.lock`` so that two runs never write one directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy

__all__ = ["CHECKPOINT_NAME", "Checkpoint", "CheckpointLocked", "save_checkpoint", "load_checkpoint",
           "lock_directory", "check_writable", "has_checkpoint", "DEFAULT_KEEP"]

CHECKPOINT_NAME = "checkpoint.safetensors"
LOCK_NAME = ".lock"
DEFAULT_KEEP = 3
_KEY = "flexlora_checkpoint"
_HASH_KEY = "flexlora_sha256"
_SCHEMA = 1
_ROUND_RE = re.compile(r"checkpoint-r(\d{6,})\.safetensors")
log = logging.getLogger("flexlora.checkpoint")


class CheckpointLocked(RuntimeError):
    """Another run holds the checkpoint directory."""


def _round_name(rnd: int) -> str:
    return f"checkpoint-r{rnd:06d}.safetensors"


def _round_files(directory: Path) -> list[Path]:
    """Round files, newest first."""
    found = []
    for p in directory.iterdir() if directory.is_dir() else []:
        m = _ROUND_RE.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CHECKPOINT_NAME).exists() or bool(_round_files(directory))


def lock_directory(directory: str | Path):
    """Exclusive, non-blocking lock on ``directory`` (created if missing); returns the open lock
    file (closing it releases the lock; so does the process ending). CheckpointLocked if taken."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise CheckpointLocked(f"checkpoint directory {directory} is in use by another run "
                               f"(it holds {directory / LOCK_NAME}); refusing to share it") from None
    return fh


def check_writable(directory: str | Path) -> None:
    """Fail now (OSError with the path) rather than after round 1 if ``directory`` cannot take files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def _hashes(data: bytes) -> tuple[str, str]:
    """SHA-256 of (the JSON document, the tensor data section) of serialized ``data``."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    doc = (header.get("__metadata__") or {}).get(_KEY, "")
    return hashlib.sha256(doc.encode()).hexdigest(), hashlib.sha256(data[8 + n:]).hexdigest()


@dataclass(kw_only=True)
class Checkpoint:
    meta: dict                                    # JSON document (see module docstring)
    strategy_tensors: dict[str, np.ndarray]
    runtime_tensors: dict[str, np.ndarray]
    path: Path | None = None                      # the file it was read from
    fallback: str | None = None                   # why newer files were skipped (None: newest was good)


def save_checkpoint(directory: str | Path, *, meta: Mapping, strategy_tensors: Mapping[str, np.ndarray],
                    runtime_tensors: Mapping[str, np.ndarray] | None = None, keep: int = DEFAULT_KEEP) -> Path:
    """Write the checkpoint atomically; with an int ``meta["round"]`` also keep it as that round's
    file and delete round files beyond the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"strategy/{k}": np.ascontiguousarray(v) for k, v in strategy_tensors.items()}
    tensors.update({f"runtime/{k}": np.ascontiguousarray(v) for k, v in (runtime_tensors or {}).items()})
    doc = json.dumps({"schema": _SCHEMA, **meta}, sort_keys=True)
    doc_hash, data_hash = _hashes(safetensors.numpy.save(tensors, metadata={_KEY: doc}))
    data = safetensors.numpy.save(tensors, metadata={
        _KEY: doc, _HASH_KEY: json.dumps({"doc": doc_hash, "data": data_hash})})
    rnd = meta.get("round")
    round_file = directory / _round_name(rnd) if isinstance(rnd, int) and keep >= 1 else None
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if round_file is not None:
            _place_copy(tmp, data, round_file)
        final = directory / CHECKPOINT_NAME
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if round_file is not None:
        for old in _round_files(directory)[keep:]:
            old.unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def _place_copy(tmp: str, data: bytes, target: Path) -> None:
    """Atomically make ``target`` a copy of the temporary file ``tmp`` (a hard link if possible)."""
    link = f"{tmp}.link"
    try:
        os.link(tmp, link)
    except OSError:
        with open(link, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    try:
        os.replace(link, target)
    except BaseException:
        if os.path.exists(link):
            os.unlink(link)
        raise


def _read_file(path: Path) -> Checkpoint:
    data = path.read_bytes()
    try:
        tensors = safetensors.numpy.load(data)
        (n,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
        raw = metadata.get(_KEY)
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if raw is None:
        raise ValueError(f"{path}: no {_KEY!r} metadata; not a flexlora checkpoint")
    stored = metadata.get(_HASH_KEY)
    if stored is not None:
        try:
            want = json.loads(stored)
        except ValueError:
            raise ValueError(f"{path}: unreadable SHA-256 record; the file was altered") from None
        doc_hash, data_hash = _hashes(data)
        if not isinstance(want, dict) or want.get("doc") != doc_hash or want.get("data") != data_hash:
            raise ValueError(f"{path}: SHA-256 mismatch; the file was altered or damaged")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{path}: metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("schema") != _SCHEMA:
        got = meta.get("schema") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: checkpoint schema {got!r}, expected {_SCHEMA}")
    return Checkpoint(meta=meta,
                      strategy_tensors={k[9:]: v for k, v in tensors.items() if k.startswith("strategy/")},
                      runtime_tensors={k[8:]: v for k, v in tensors.items() if k.startswith("runtime/")},
                      path=path)


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest good checkpoint in ``directory``, or None when there is none yet.

    A damaged or altered newest file is skipped for the newest good round file (logged, and said
    in ``Checkpoint.fallback``); ValueError when every file is bad."""
    directory = Path(directory)
    candidates = [p for p in [directory / CHECKPOINT_NAME, *_round_files(directory)] if p.exists()]
    if not candidates:
        return None
    errors = []
    for path in candidates:
        try:
            ck = _read_file(path)
        except (ValueError, OSError) as exc:
            errors.append(str(exc))
            continue
        if errors:
            ck.fallback = "; ".join(errors)
            log.warning("resume: skipped damaged checkpoint(s) (%s); using %s (round %s)", ck.fallback,
                        path.name, ck.meta.get("round"))
        return ck
    raise ValueError("no readable checkpoint: " + "; ".join(errors))
