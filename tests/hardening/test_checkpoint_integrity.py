"""Issue 21, class 7: a checkpoint whose checksum record is removed is refused, round files are
independent of ``checkpoint.safetensors``, the hashes cover the tensor layout, and with an
operator key (``$FLEXLORA_CHECKPOINT_KEY``) an HMAC makes tampering by someone who can write
the directory evident."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct

import numpy as np
import pytest

from server.federation.checkpoint import CHECKPOINT_NAME, KEY_ENV, load_checkpoint, save_checkpoint

KEY = "operator-secret-0123456789"


def _save(d, rnd: int) -> None:
    save_checkpoint(d, meta={"round": rnd}, strategy_tensors={"w": np.full((8, 8), rnd, np.float32),
                                                              "v": np.full((8, 8), -rnd, np.float32)})


def _split(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _rehash(header: dict, body: bytes) -> None:
    """What someone who can write the directory does: recompute the SHA-256 record."""
    meta = header["__metadata__"]
    layout = json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True)
    meta["flexlora_sha256"] = json.dumps({"doc": hashlib.sha256(meta["flexlora_checkpoint"].encode()).hexdigest(),
                                          "layout": hashlib.sha256(layout.encode()).hexdigest(),
                                          "data": hashlib.sha256(body).hexdigest()}, sort_keys=True)


def _files(d):
    return [d / CHECKPOINT_NAME, *sorted(d.glob("checkpoint-r*.safetensors"))]


def _drop_record(directory, record: str) -> None:
    """Remove one metadata record from every checkpoint file, as someone who can write there would."""
    for path in _files(directory):
        header, body = _split(path)
        del header["__metadata__"][record]
        _write(path, header, body)


def test_a_checkpoint_without_its_checksum_record_is_refused(tmp_path):
    _save(tmp_path, 1)
    _drop_record(tmp_path, "flexlora_sha256")
    with pytest.raises(ValueError, match="no 'flexlora_sha256' record"):
        load_checkpoint(tmp_path)


def test_a_record_without_the_layout_hash_is_refused(tmp_path):
    _save(tmp_path, 1)
    for path in _files(tmp_path):
        header, body = _split(path)
        record = json.loads(header["__metadata__"]["flexlora_sha256"])
        del record["layout"]
        header["__metadata__"]["flexlora_sha256"] = json.dumps(record)
        _write(path, header, body)
    with pytest.raises(ValueError, match="record has no layout hash"):
        load_checkpoint(tmp_path)


def test_round_files_are_independent_copies_so_truncation_in_place_falls_back(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest, round_file = tmp_path / CHECKPOINT_NAME, tmp_path / "checkpoint-r000002.safetensors"
    assert os.stat(newest).st_nlink == 1 and os.stat(newest).st_ino != os.stat(round_file).st_ino
    with open(newest, "r+b") as fh:   # damage in place, the same inode
        fh.truncate(os.path.getsize(newest) // 2)
    ck = load_checkpoint(tmp_path)
    assert ck.meta["round"] == 2 and ck.path == round_file and ck.fallback
    assert float(ck.strategy_tensors["w"][0, 0]) == 2.0


def test_the_hashes_cover_the_tensor_layout(tmp_path):
    _save(tmp_path, 1)
    for path in _files(tmp_path):
        header, body = _split(path)
        # same shapes: the data hash still matches, but "w" now reads "v"'s bytes
        header["strategy/v"], header["strategy/w"] = header["strategy/w"], header["strategy/v"]
        _write(path, header, body)
    with pytest.raises(ValueError, match="SHA-256 mismatch \\(layout\\)"):
        load_checkpoint(tmp_path)


def test_hmac_makes_rewriting_the_directory_evident(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    _save(tmp_path, 1)
    assert load_checkpoint(tmp_path).meta["round"] == 1
    # the attacker edits the document and recomputes the SHA-256 record (no key)
    for path in _files(tmp_path):
        header, body = _split(path)
        doc = json.loads(header["__metadata__"]["flexlora_checkpoint"])
        doc["round"] = 7
        header["__metadata__"]["flexlora_checkpoint"] = json.dumps(doc, sort_keys=True)
        _rehash(header, body)
        _write(path, header, body)
    with pytest.raises(ValueError, match="HMAC mismatch"):
        load_checkpoint(tmp_path)
    # ... or also removes the MAC
    _drop_record(tmp_path, "flexlora_hmac")
    with pytest.raises(ValueError, match="no 'flexlora_hmac' record"):
        load_checkpoint(tmp_path)
    # ... or signs it with a key of its own
    for path in _files(tmp_path):
        header, body = _split(path)
        record = header["__metadata__"]["flexlora_sha256"]
        header["__metadata__"]["flexlora_hmac"] = hmac.new(b"x" * 32, b"flexlora-checkpoint-hmac-v1\0" + record.encode(),
                                                           hashlib.sha256).hexdigest()
        _write(path, header, body)
    with pytest.raises(ValueError, match="HMAC mismatch"):
        load_checkpoint(tmp_path)


def test_hmac_key_rules(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    _save(tmp_path / "a", 1)
    monkeypatch.setenv(KEY_ENV, KEY + "-other")
    with pytest.raises(ValueError, match="HMAC mismatch"):
        load_checkpoint(tmp_path / "a")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"carries an HMAC .*{KEY_ENV} is not set"):
        load_checkpoint(tmp_path / "a")
    _save(tmp_path / "b", 1)          # written without a key: refused once a key is required
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(ValueError, match="no 'flexlora_hmac' record"):
        load_checkpoint(tmp_path / "b")
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"{KEY_ENV} is 5 characters long"):
        _save(tmp_path / "c", 1)


def test_a_bad_key_fails_before_round_1(tmp_path, monkeypatch):
    from test_reply_handling import BASE  # noqa: E402  (tests/hardening on sys.path)

    from server.federation import RoundEngine
    from server.federation.strategies import RankSpec, StrategyConfig, make_strategy

    monkeypatch.setenv(KEY_ENV, "short")
    eng = RoundEngine(make_strategy("flexlora", StrategyConfig(base_model=BASE)), {"c0": RankSpec(rank=4)},
                      checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match=KEY_ENV):
        eng.start()
