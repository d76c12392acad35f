"""The ClientApp's real-device task (``client-task=edge``) in-process: rank from the node
config, local JSONL data, the edge trainer, and a reply the server's validation accepts."""

from __future__ import annotations

import json

import pytest

from edge_client.flower_app import EdgeTask
from edge_client.wire import TrainOrder, decode_global, encode_global, encode_update
from server.federation.strategies import RankSpec, StrategyConfig, make_strategy
from server.workloads.model import ASSET_MODEL, linear_shapes, load_base

pytestmark = pytest.mark.slow


def test_edge_task_trains_at_the_node_config_rank_and_passes_server_validation(tmp_path):
    from edge_client.trainer import fingerprint

    data = tmp_path / "local.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "Repeat the word.", "input": w, "output": w})
                              for w in ("red", "blue", "green", "cat", "dog", "sun")), encoding="utf-8")
    run_config = {"model": str(ASSET_MODEL), "local-steps": 2, "batch-size": 2, "max-length": 48,
                  "target-modules": "q_proj,v_proj", "lr": 1e-3}
    task = EdgeTask({"data-path": str(data), "rank": 4, "client-id": "phone-1"}, run_config, node_id=9)
    probe = task.describe()
    assert (probe.client_id, probe.rank, probe.num_examples) == ("phone-1", 4, 6)

    model, _ = load_base(None)
    shapes = linear_shapes(model, ["q_proj", "v_proj"])
    strategy = make_strategy("flexlora", StrategyConfig(base_model=fingerprint(model), module_shapes=shapes))
    spec = RankSpec(rank=4)
    first = task.train(TrainOrder(client_id="phone-1", round=1, seed=0, rank=4), state=None)
    update = strategy.decode_reply(encode_update(first), spec=spec)
    assert update.client_id == "phone-1" and update.rank == 4 and set(update.modules()) == set(shapes)
    strategy.aggregate([update], round=1)

    # round 2 from the server's factors at a smaller rank: the adapter follows the order
    wire = encode_global(strategy.configure(client_id="phone-1", spec=RankSpec(rank=2), round=2))
    assert decode_global(wire).rank == 2
    second = task.train(TrainOrder(client_id="phone-1", round=2, seed=0, rank=2, global_bytes=wire), state=None)
    assert second.rank == 2 and second.round == 2
    strategy.decode_reply(encode_update(second), spec=RankSpec(rank=2))
    with pytest.raises(ValueError, match="above the assigned"):
        strategy.decode_reply(encode_update(first), spec=RankSpec(rank=2))


def test_edge_task_needs_local_data_and_a_model():
    with pytest.raises(ValueError, match="data-path"):
        EdgeTask({}, {"model": "x"}, node_id=1)
