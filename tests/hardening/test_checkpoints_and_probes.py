"""Issue 13, classes 5-7: checkpoint rotation, SHA-256 verification with fallback, the directory
lock and overwrite refusal; Flower probe validation; the cost of rank_pattern matching; CLI
numbers and fault ids; the red-team hook and the adversarial fault kinds."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from test_reply_handling import BASE, honest  # noqa: E402  (tests/hardening on sys.path)

from edge_client.wire import NodeProbe, RankSpec, decode_update, rank_for_module
from server.federation import CheckpointLocked, RoundEngine
from server.federation.checkpoint import CHECKPOINT_NAME, load_checkpoint, lock_directory, save_checkpoint
from server.federation.rounds import ResumeError
from server.federation.strategies import StrategyConfig, make_strategy


def _save(d, rnd, keep=3):
    save_checkpoint(d, meta={"round": rnd}, strategy_tensors={"w": np.full((8, 8), rnd, np.float32)}, keep=keep)


def test_rotation_keeps_the_last_n(tmp_path):
    for rnd in range(1, 7):
        _save(tmp_path, rnd)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([CHECKPOINT_NAME, "checkpoint-r000004.safetensors", "checkpoint-r000005.safetensors",
                            "checkpoint-r000006.safetensors"])
    assert load_checkpoint(tmp_path).meta["round"] == 6


@pytest.mark.parametrize("where", [0.3, 0.9, 0.999])
def test_a_flipped_bit_is_detected_and_resume_falls_back(tmp_path, where, caplog):
    for rnd in (1, 2, 3):
        _save(tmp_path, rnd)
    # the newest round file holds the same bytes as checkpoint.safetensors: damage both
    path = tmp_path / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    i = int(where * (len(data) - 1))
    data[i] ^= 0x04
    path.unlink()
    path.write_bytes(bytes(data))
    (tmp_path / "checkpoint-r000003.safetensors").unlink()
    (tmp_path / "checkpoint-r000003.safetensors").write_bytes(bytes(data))
    ck = load_checkpoint(tmp_path)
    assert ck.meta["round"] == 2 and ck.fallback
    assert float(ck.strategy_tensors["w"][0, 0]) == 2.0


def test_lock_refuses_a_second_run(tmp_path):
    fh = lock_directory(tmp_path)
    with pytest.raises(CheckpointLocked, match="in use by another run"):
        lock_directory(tmp_path)
    fh.close()
    lock_directory(tmp_path).close()


def test_engine_refuses_to_overwrite_and_says_when_nothing_to_resume(tmp_path, caplog):
    st = make_strategy("flexlora", StrategyConfig(base_model=BASE))
    specs = {"c0": RankSpec(rank=4)}
    eng = RoundEngine(st, specs, checkpoint_dir=tmp_path / "ck", overwrite=False)
    assert eng.restore() is False
    assert "nothing to resume" in caplog.text
    eng.start()
    eng.save()
    eng.close()
    eng2 = RoundEngine(st, specs, checkpoint_dir=tmp_path / "ck", overwrite=False)
    with pytest.raises(ResumeError, match="--resume.*--overwrite"):
        eng2.start()
    eng2.close()
    RoundEngine(st, specs, checkpoint_dir=tmp_path / "ck", overwrite=True).start()


def test_unwritable_checkpoint_dir_fails_before_round_1(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    st = make_strategy("flexlora", StrategyConfig(base_model=BASE))
    with pytest.raises(OSError):
        RoundEngine(st, {"c0": RankSpec(rank=4)}, checkpoint_dir=target / "sub").start()


GOOD = {"client-id": "node-1", "rank": 8, "num-examples": 10, "rank-pattern": "", "device": "phone", "reasons": "[]"}


@pytest.mark.parametrize("change", [
    {"client-id": "evil\nINFO round 1: forged"}, {"client-id": "x" * 65}, {"client-id": ""}, {"client-id": 5},
    {"rank": 10**6}, {"rank": 0}, {"num-examples": 10**12}, {"reasons": "[" * 5000}, {"reasons": "{}"},
    {"reasons": json.dumps(["a"] * 40)}, {"rank-pattern": "{" * 3000}, {"rank-pattern": '{"a(b": 4}'},
    {"rank-pattern": json.dumps({f"k{i}": 4 for i in range(100)})}, {"device": "a\x1b[2J"},
])
def test_probe_fields_are_validated(change):
    with pytest.raises(ValueError):
        NodeProbe.from_record({**GOOD, **change})


def test_good_probe_is_accepted():
    p = NodeProbe.from_record({**GOOD, "rank-pattern": '{"gate_proj": 16}'})
    assert p.rank_pattern == {"gate_proj": 16}


class _Msg:
    def __init__(self, src, rec=None, boom=False):
        from types import SimpleNamespace
        self.metadata = SimpleNamespace(src_node_id=src)
        self._rec, self._boom = rec, boom

    def has_error(self):
        return False

    @property
    def content(self):
        from types import SimpleNamespace
        if self._boom:
            raise KeyError("malformed message")
        return SimpleNamespace(config_records={"flexlora.probe": self._rec})


class _Grid:
    def __init__(self, replies):
        self.replies = replies

    def get_node_ids(self):
        return [m.metadata.src_node_id for m in self.replies]

    def send_and_receive(self, messages, timeout):
        return self.replies


def test_a_node_cannot_push_out_another_or_stop_the_run(monkeypatch):
    pytest.importorskip("flwr")
    from server.runtimes.flower import strategy as mod
    from server.runtimes.flower.strategy import probe_nodes
    monkeypatch.setattr(mod, "Message", lambda *a, **k: None)   # no Flower run context here
    grid = _Grid([_Msg(1, {**GOOD, "client-id": "a"}), _Msg(2, {**GOOD, "client-id": "a"}),
                  _Msg(3, boom=True), _Msg(4, {**GOOD, "client-id": "b", "rank": 64}),
                  _Msg(5, {**GOOD, "client-id": "c"})])
    nodes = probe_nodes(grid, min_nodes=2, wait_s=1, timeout_s=1, max_rank=32)
    assert [(n.client_id, n.node_id) for n in nodes] == [("a", 1), ("c", 5)]


def test_rank_pattern_matching_is_linear_and_bounded():
    from edge_client.wire.messages import MAX_PATTERN_KEYS, check_rank_pattern
    with pytest.raises(ValueError, match="keys"):
        check_rank_pattern({f"k{i}": 4 for i in range(MAX_PATTERN_KEYS + 1)}, 64)
    key, module = "a" * 200, "." .join(["a" * 40] * 6)
    t0 = time.perf_counter()
    for _ in range(2000):
        rank_for_module(module, 4, {key: 8, "x.y": 2})
    assert time.perf_counter() - t0 < 1.0


def test_adversarial_faults_pass_the_decoder_and_the_hook_runs():
    from server.runtimes.faults import ADVERSARIAL, INFLATED_EXAMPLES, check_fault, faulty_reply
    u = honest("c0", 0)
    for kind in ADVERSARIAL:
        got = decode_update(faulty_reply(u, kind))
        assert got.client_id == "c0"
        if kind == "inflate":
            assert got.num_examples == INFLATED_EXAMPLES
    out = faulty_reply(u, "python:tests.hardening.redteam_hooks:flip_sign")
    got = decode_update(out)
    for m in u.modules():
        np.testing.assert_allclose(got.module_delta(m), -u.module_delta(m), rtol=1e-6)
    with pytest.raises(ValueError):
        check_fault("c0", "python:no_such_module_xyz:f")
    with pytest.raises(ValueError):
        check_fault("c0", "explode")


def test_flower_run_config_exposes_the_defences_and_limits():
    pytest.importorskip("flwr")
    from server.runtimes.flower.config import to_run_config
    off = to_run_config({}, num_clients=3)
    assert (off.clip_norm, off.clip_adaptive, off.max_weight_share, off.trim_fraction, off.max_norm_growth,
            off.keep_checkpoints) == (None, None, None, 0.0, None, 3)
    on = to_run_config({"clip-norm": 2.0, "clip-adaptive": 3.0, "max-weight-share": 0.3, "trim-fraction": 0.2,
                        "max-norm-growth": 5.0, "max-num-examples": 1000, "keep-checkpoints": 5}, num_clients=3)
    assert (on.clip_norm, on.clip_adaptive, on.max_weight_share, on.trim_fraction, on.max_norm_growth,
            on.keep_checkpoints, on.decode_limits().max_num_examples) == (2.0, 3.0, 0.3, 0.2, 5.0, 5, 1000)
    with pytest.raises(ValueError):
        to_run_config({"trim-fraction": 0.9}, num_clients=3)
