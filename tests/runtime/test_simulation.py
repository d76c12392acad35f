"""End-to-end runs of the embedded runtime on small federations (a few seconds each)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.cli import main
from server.federation.checkpoint import CHECKPOINT_NAME, load_checkpoint
from server.runtimes.config import RunConfig
from server.runtimes.simulate import SimulationError, run_simulation
from server.workloads.devices import DEVICE_MIX, assign_devices

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_clients=4, num_heldout=1, local_steps=2, batch_size=4, rank_distribution="uniform",
             threads=1, progress=False, eval_max_new_tokens=6)


def _numbers(doc):
    return [(r["round"], r["rougeL"], r["exact_match"], r["train_loss"], sorted(r["ranks"].items()))
            for r in doc["rounds"]]


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "flora", "fedit"])
def test_same_seed_same_numbers(strategy):
    a = run_simulation(RunConfig(strategy=strategy, rounds=2, seed=5, **SMALL))
    b = run_simulation(RunConfig(strategy=strategy, rounds=2, seed=5, **SMALL))
    assert a["rounds_completed"] == 2 and _numbers(a) == _numbers(b)
    assert a["base"] == b["base"] and 0.0 <= a["base"]["rougeL"] <= 1.0
    assert all(r["aggregation_s"] >= 0 and r["clients"] == 4 for r in a["rounds"])
    if strategy == "fedit":
        assert len({v for r in a["rounds"] for v in r["ranks"].values()}) == 1
    else:
        assert len({v for r in a["rounds"] for v in r["ranks"].values()}) > 1


def test_device_mix_gives_heterogeneous_ranks_from_the_rank_policy():
    devices = assign_devices([f"c{i}" for i in range(20)], seed=0)
    assert {d.device for d in devices} <= {c.name for c in DEVICE_MIX}
    assert len({d.client_type for d in devices}) >= 3
    assert assign_devices([f"c{i}" for i in range(20)], seed=0)[7].spec == devices[7].spec
    weakest = min(DEVICE_MIX, key=lambda c: c.free_memory_gib)
    strongest = max(DEVICE_MIX, key=lambda c: c.free_memory_gib)
    types = {d.device: d.client_type for d in devices}
    assert types.get(weakest.name, "r8") == "r8" and types.get(strongest.name, "r200") == "r200"


def test_faulty_replies_are_rejected_with_reasons_and_round_goes_on(caplog):
    faults = {"client-000": "nan", "client-001": "truncated", "client-002": "wrong_base", "client-003": "rank_above",
              "client-004": "bad_shape", "client-005": "straggler"}
    cfg = RunConfig(rounds=1, **{**SMALL, "num_clients": 7}, faults=faults, client_timeout_s=5.0)
    with caplog.at_level(logging.WARNING, logger="flexlora.simulate"):
        doc = run_simulation(cfg)
    rej = doc["rounds"][0]["rejected"]
    assert sorted(rej) == sorted(faults) and doc["rounds"][0]["clients"] == 1
    assert "NaN" in rej["client-000"]
    assert "base_model" in rej["client-002"]
    assert "above the assigned" in rej["client-003"]
    assert "no reply within 5 s" in rej["client-005"]
    for cid in faults:
        assert cid in caplog.text


def test_below_min_clients_fails_clearly_and_keeps_last_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    run_simulation(RunConfig(rounds=1, checkpoint_dir=str(ck), **SMALL))
    before = (ck / CHECKPOINT_NAME).read_bytes()
    bad = {f"client-00{i}": "nan" for i in range(3)}
    cfg = RunConfig(rounds=2, checkpoint_dir=str(ck), resume=True, min_clients=2, faults=bad, **SMALL)
    # the failed round is recorded, not committed, and the run goes on (issue 21)
    doc = run_simulation(cfg)
    assert "1 valid replies, min_clients=2" in doc["rounds"][-1]["failed"]
    after, kept = load_checkpoint(ck), load_checkpoint(ck, round=1)
    assert after.meta["round"] == 2 and after.meta["history"][-1]["failed"]
    assert after.strategy_tensors.keys() == kept.strategy_tensors.keys()
    for key, value in kept.strategy_tensors.items():
        np.testing.assert_array_equal(after.strategy_tensors[key], value)
    assert (ck / "checkpoint-r000001.safetensors").read_bytes() == before


def test_resume_refuses_other_settings(tmp_path):
    run_simulation(RunConfig(rounds=1, checkpoint_dir=str(tmp_path), **SMALL))
    with pytest.raises(SimulationError, match="other settings"):
        run_simulation(RunConfig(rounds=2, checkpoint_dir=str(tmp_path), resume=True, **{**SMALL, "lr": 0.5}))


def test_cli_json_and_one_line_errors(capsys):
    rc = main(["simulate", "--rounds", "1", "--clients", "3", "--heldout-clients", "1", "--local-steps", "1",
               "--rank-distribution", "normal", "--threads", "1", "--no-progress", "--json", "--strategy", "hetlora"])
    out = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out.out)
    assert doc["strategy"] == "hetlora" and doc["rounds_completed"] == 1 and doc["peak_rss_bytes"] > 0
    assert main(["--clients", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flexlora simulate: error: --clients 0 is outside [1, 1000000]"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    args = ["--rounds", "3", "--clients", "4", "--heldout-clients", "1", "--local-steps", "2", "--batch-size", "4",
            "--rank-distribution", "uniform", "--threads", "1", "--no-progress", "--seed", "11"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "server.cli", "simulate", *args, "--checkpoint-dir", str(ck), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (ck / CHECKPOINT_NAME).exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    killed_at = load_checkpoint(ck).meta["round"]
    assert 1 <= killed_at < 3
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300, check=True)
    full = subprocess.run([sys.executable, "-m", "server.cli", "simulate", *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    a, b = json.loads(resumed.stdout), json.loads(full.stdout)
    assert a["resumed"] and a["rounds_completed"] == b["rounds_completed"] == 3
    assert _numbers(a) == _numbers(b) and a["base"] == b["base"]


def test_rslora_federation_accepts_every_reply(monkeypatch):
    """rslora reaches the clients and the server alike: the server refuses a reply whose rslora
    differs from the run's, so every reply accepted means the two agree."""
    cfg = RunConfig(rounds=1, rslora=True, **{**SMALL, "num_clients": 2, "local_steps": 1})
    doc = run_simulation(cfg)
    r = doc["rounds"][0]
    assert doc["rounds_completed"] == 1 and r["clients"] == 2 and not r["rejected"] and not r.get("failed")
    # the check is live: clients that train without rslora are refused
    import server.runtimes.build as build
    plain = build.train_config_for
    monkeypatch.setattr(build, "train_config_for", lambda c: dataclasses.replace(plain(c), rslora=False))
    doc = run_simulation(cfg)
    assert all("rslora=False differs" in why for why in doc["rounds"][0]["rejected"].values())
    assert len(doc["rounds"][0]["rejected"]) == 2
