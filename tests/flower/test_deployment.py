"""FlexLoRA on Flower's Deployment Engine, for real: a ``flower-superlink`` and two
``flower-supernode`` processes on loopback, ``flwr run`` for two rounds, and the final global
adapter compared with the embedded runtime's (``run_simulation``) for the same seed and client
order. ``flwr run`` exits 0 even when the run fails, so the ServerApp's results file decides.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytestmark = [pytest.mark.flower, pytest.mark.slow]

# tiny and quick: 2 nodes = 2 clients, 2 rounds, 2 local steps; one thread everywhere
SETTINGS = {"strategy": "flexlora", "num-server-rounds": 2, "seed": 3, "num-heldout": 1, "local-steps": 2,
            "batch-size": 4, "threads": 1, "eval-max-new-tokens": 4, "min-nodes": 2, "node-wait-s": 60.0,
            "round-timeout-s": 120.0, "evaluate": False}
NODES = ["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"]
F32 = {"rtol": 1.3e-6, "atol": 1e-5}   # float32; atol for entries near zero after two SVD round trips


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    from flower_deploy import deployment

    root = tmp_path_factory.mktemp("flower")
    out = root / "out"
    with deployment(root, NODES, threads=1) as dep:
        proc = dep.run({**SETTINGS, "output-dir": str(out)}, timeout=240)
        logs = dep.logs()
    results = out / "flower-results.json"
    assert results.exists(), f"no results file; flwr run said:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{logs}"
    doc = json.loads(results.read_text())
    return {"doc": doc, "out": out, "stdout": proc.stdout, "rc": proc.returncode, "logs": logs}


def _global_delta(directory, strategy_name: str) -> dict[str, np.ndarray]:
    from server.federation.checkpoint import load_checkpoint
    from server.federation.strategies import make_strategy

    ck = load_checkpoint(directory)
    assert ck is not None, f"no checkpoint in {directory}"
    strategy = make_strategy(strategy_name)
    strategy.load_state(ck.strategy_tensors, ck.meta["strategy"])
    return strategy.global_delta()


def test_two_rounds_through_superlink_and_two_supernodes(flower_run):
    doc = flower_run["doc"]
    assert flower_run["rc"] == 0
    assert doc["status"] == "ok", f"{doc.get('error')}\n{flower_run['logs']}"
    assert doc["rounds_completed"] == 2
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["clients"] == 2 and r["rejected"] == {} for r in doc["rounds"])
    assert sorted(n["client_id"] for n in doc["nodes"]) == ["client-000", "client-001"]
    assert len({n["node_id"] for n in doc["nodes"]}) == 2
    assert "round 2:" in flower_run["stdout"]   # our progress line came through `flwr run --stream`
    delta = _global_delta(flower_run["out"], "flexlora")
    assert delta and all(np.isfinite(d).all() and np.abs(d).max() > 0 for d in delta.values())


def test_same_final_adapter_as_embedded_runtime(flower_run, tmp_path):
    import torch

    from server.runtimes.flower.config import to_run_config
    from server.runtimes.simulate import run_simulation

    assert flower_run["doc"]["status"] == "ok", flower_run["doc"].get("error")
    # the embedded run gets the RunConfig of the run config the ServerApp actually ran with
    # (pyproject's [tool.flwr.app.config] defaults + SETTINGS), not a hand-written copy of it
    run_config = flower_run["doc"]["run_config"]
    assert {k: run_config[k] for k in SETTINGS} == SETTINGS
    cfg = dataclasses.replace(to_run_config(run_config, num_clients=len(NODES)),
                              checkpoint_dir=str(tmp_path / "embedded"), progress=False)
    assert (cfg.strategy, cfg.rounds, cfg.seed, cfg.local_steps, cfg.batch_size, cfg.threads) == \
        ("flexlora", 2, SETTINGS["seed"], 2, 4, 1)
    assert cfg.identity() == flower_run["doc"]["config"]
    threads = torch.get_num_threads()
    try:
        embedded = run_simulation(cfg)
    finally:
        torch.set_num_threads(threads)
    assert embedded["rounds_completed"] == 2
    flower_ranks = [r["ranks"] for r in flower_run["doc"]["rounds"]]
    assert flower_ranks == [r["ranks"] for r in embedded["rounds"]]
    ours, theirs = _global_delta(flower_run["out"], "flexlora"), _global_delta(tmp_path / "embedded", "flexlora")
    assert sorted(ours) == sorted(theirs)
    worst = max(float(np.abs(ours[m] - theirs[m]).max()) for m in ours)
    print(f"max |dW_flower - dW_embedded| over {len(ours)} modules: {worst:.3e}")
    for module in ours:
        np.testing.assert_allclose(ours[module], theirs[module], **F32, err_msg=module)
