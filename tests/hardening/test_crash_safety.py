"""Crash safety of checkpoints: a write interrupted at any point leaves the previous checkpoint
readable, and a damaged checkpoint file is refused with a ValueError (never loaded half-way).
The end-to-end SIGKILL loop over `flexlora simulate` is benchmarks/kill_loop.py; a short run of
it is the slow test at the bottom."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from server.federation import checkpoint as ckpt_mod
from server.federation.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from server.federation.testing import CrashingOs

ROOT = Path(__file__).resolve().parents[2]


class Boom(Exception):
    pass


def save(directory, rnd: int) -> None:
    save_checkpoint(directory, meta={"round": rnd}, strategy_tensors={"w": np.full((64, 64), rnd, np.float32)},
                    runtime_tensors={"r": np.arange(rnd + 1, dtype=np.float32)})


def test_roundtrip(tmp_path):
    save(tmp_path, 3)
    ck = load_checkpoint(tmp_path)
    assert ck.meta["round"] == 3 and ck.strategy_tensors["w"][0, 0] == 3 and ck.runtime_tensors["r"].size == 4


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    save(tmp_path, 1)

    def boom():
        raise Boom

    monkeypatch.setattr(ckpt_mod, "os", CrashingOs(where, boom))
    with pytest.raises(Boom):
        save(tmp_path, 2)
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path)
    assert ck.meta["round"] == 1 and ck.strategy_tensors["w"][0, 0] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary files were removed


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage-meta", "flip"])
def test_a_damaged_checkpoint_is_refused_with_a_value_error(tmp_path, damage):
    save(tmp_path, 2)
    path = tmp_path / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "zero":
        data = bytearray()
    elif damage == "garbage-meta":
        start = data.index(b'"flexlora_checkpoint"')
        brace = data.index(b"{", start)  # the JSON document inside the metadata string
        data[brace:brace + 1] = b"["
    else:
        data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    # the round file is an independent copy: in-place damage to the newest file does not reach it
    ck = load_checkpoint(tmp_path)
    assert ck.meta["round"] == 2 and ck.fallback and ck.path.name == "checkpoint-r000002.safetensors"
    (tmp_path / "checkpoint-r000002.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path)


@pytest.mark.slow
def test_kill_loop_short(tmp_path):
    """Three SIGKILLs of `flexlora simulate` (inside aggregation, half-way through the checkpoint
    write, before the rename), each followed by --resume; then the run is finished."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kill_loop

    rc = kill_loop.main(["--trials", "3", "--points", "aggregation,ckpt-write,ckpt-rename", "--rounds", "4",
                         "--no-compare", "--workdir", str(tmp_path)])
    assert rc == 0
