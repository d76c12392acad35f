"""Atomic checkpoints: one safetensors file per run directory, no pickle.

Tensors hold the strategy state (``strategy/<key>``) and any runtime tensors
(``runtime/<key>``); the safetensors ``__metadata__`` key ``flexlora_checkpoint`` holds a
JSON document (schema, round completed, strategy meta, RNG state, results so far, the run
configuration it belongs to). The file is written to a temporary name in the same folder,
fsynced, then ``os.replace``d over the previous one, so a crash at any moment leaves either
the old or the new checkpoint, never a torn one.

Besides the newest (``checkpoint.safetensors``) the last ``keep`` rounds stay as
``checkpoint-rNNNNNN.safetensors``, each an independent copy (never a hard link, so damage to
one file in place cannot reach another). The metadata key ``flexlora_sha256`` holds the SHA-256
of the JSON document, of the tensor layout (the safetensors header without its metadata) and of
the tensor data; a file whose record is missing or does not match is refused on load, and
:func:`load_checkpoint` falls back to the newest good round file and says so
(``Checkpoint.fallback``). The hashes detect damage, not tampering: anyone who can write the
directory can recompute them. For tamper evidence the operator sets a secret key in the
environment variable ``FLEXLORA_CHECKPOINT_KEY`` (at least 16 characters, kept outside the
checkpoint directory): every file then carries ``flexlora_hmac``, an HMAC-SHA256 under that key
of the hash record, and with the key set a file without a valid MAC is refused; a file with a MAC
is refused when no key is set (it cannot be verified). :func:`lock_directory` takes an exclusive
``flock`` on ``<dir>/.lock`` so that two runs never write one directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
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
           "lock_directory", "check_writable", "has_checkpoint", "DEFAULT_KEEP", "KEY_ENV", "checkpoint_key"]

CHECKPOINT_NAME = "checkpoint.safetensors"
LOCK_NAME = ".lock"
DEFAULT_KEEP = 3
_KEY = "flexlora_checkpoint"
_HASH_KEY = "flexlora_sha256"
_MAC_KEY = "flexlora_hmac"
KEY_ENV = "FLEXLORA_CHECKPOINT_KEY"
_MIN_KEY_CHARS = 16
_MAC_CONTEXT = b"flexlora-checkpoint-hmac-v1\0"
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


def checkpoint_key() -> bytes | None:
    """The operator's checkpoint MAC key from ``$FLEXLORA_CHECKPOINT_KEY`` (None when unset)."""
    raw = os.environ.get(KEY_ENV)
    if not raw:
        return None
    if len(raw) < _MIN_KEY_CHARS:
        raise ValueError(f"{KEY_ENV} is {len(raw)} characters long; a checkpoint key needs at least "
                         f"{_MIN_KEY_CHARS} (a secret kept outside the checkpoint directory)")
    return raw.encode()


def _hashes(data: bytes) -> dict[str, str]:
    """SHA-256 of the JSON document, the tensor layout and the tensor data of serialized ``data``."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    doc = (header.get("__metadata__") or {}).get(_KEY, "")
    layout = json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True)
    return {"doc": hashlib.sha256(doc.encode()).hexdigest(),
            "layout": hashlib.sha256(layout.encode()).hexdigest(),
            "data": hashlib.sha256(data[8 + n:]).hexdigest()}


def _mac(key: bytes, record: str) -> str:
    return hmac.new(key, _MAC_CONTEXT + record.encode(), hashlib.sha256).hexdigest()


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
    record = json.dumps(_hashes(safetensors.numpy.save(tensors, metadata={_KEY: doc})), sort_keys=True)
    metadata = {_KEY: doc, _HASH_KEY: record}
    key = checkpoint_key()
    if key is not None:
        metadata[_MAC_KEY] = _mac(key, record)
    data = safetensors.numpy.save(tensors, metadata=metadata)
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
    """Atomically make ``target`` an independent copy of ``data`` (the bytes of ``tmp``): a file
    of its own, never a hard link, so damaging one in place leaves the other intact."""
    link = f"{tmp}.copy"
    try:
        with open(link, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(link, target)
    except BaseException:
        if os.path.exists(link):
            os.unlink(link)
        raise


def _verify(path: Path, data: bytes, metadata: Mapping) -> None:
    """The SHA-256 record must be present and match; with a key set the MAC must too (see the
    module docstring). ValueError naming the file and what failed."""
    stored = metadata.get(_HASH_KEY)
    if stored is None:
        raise ValueError(f"{path}: no {_HASH_KEY!r} record; a checkpoint whose checksum is missing is refused "
                         f"(removed, or not written by flexlora)")
    try:
        want = json.loads(stored)
    except ValueError:
        raise ValueError(f"{path}: unreadable SHA-256 record; the file was altered") from None
    got = _hashes(data)
    missing = sorted(set(got) - set(want)) if isinstance(want, dict) else []
    if missing:
        raise ValueError(f"{path}: the SHA-256 record has no {', '.join(missing)} hash (altered, or written by an "
                         f"older flexlora whose checkpoints are not verified in full); refused")
    if not isinstance(want, dict) or any(want.get(part) != digest for part, digest in got.items()):
        bad = [part for part, digest in got.items() if not isinstance(want, dict) or want.get(part) != digest]
        raise ValueError(f"{path}: SHA-256 mismatch ({', '.join(bad)}); the file was altered or damaged")
    key = checkpoint_key()
    mac = metadata.get(_MAC_KEY)
    if key is None:
        if mac is not None:
            raise ValueError(f"{path}: the checkpoint carries an HMAC ({_MAC_KEY!r}) but {KEY_ENV} is not set; "
                             f"set it to the key the run was started with to verify it")
        return
    if mac is None:
        raise ValueError(f"{path}: no {_MAC_KEY!r} record but {KEY_ENV} is set; the file was not written with "
                         f"this key or its MAC was removed")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, stored)):
        raise ValueError(f"{path}: HMAC mismatch; the file was altered or written with another {KEY_ENV}")


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
    _verify(path, data, metadata)
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


def load_checkpoint(directory: str | Path, *, round: int | None = None) -> Checkpoint | None:
    """The newest good checkpoint in ``directory``, or None when there is none yet.

    A damaged or altered newest file is skipped for the newest good round file (logged, and said
    in ``Checkpoint.fallback``); ValueError when every file is bad. With ``round`` only that
    round's file is read (to resume from an earlier, known-good state); ValueError if it is not
    kept or not good."""
    directory = Path(directory)
    if round is not None:
        path = directory / _round_name(round)
        if not path.exists():
            kept = sorted(int(_ROUND_RE.fullmatch(p.name).group(1)) for p in _round_files(directory))
            raise ValueError(f"{directory} keeps no checkpoint of round {round}; it keeps rounds {kept}")
        return _read_file(path)
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
