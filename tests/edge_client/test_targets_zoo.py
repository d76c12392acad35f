"""Default targets discovered from the model, Conv1D (GPT-2) everywhere, on five architectures."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edge_client.memory import estimate
from edge_client.targets import resolve_targets, resolve_targets_for_config
from edge_client.testing import ARCHITECTURES, save_tiny_model, synthetic_records
from edge_client.trainer import LocalTrainer, TrainConfig, load_model, merge_deltas
from edge_client.wire import GlobalFactors, RankSpec
from server.workloads.model import linear_shapes

EXPECTED = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "gpt2": ("c_attn", "c_proj", "c_fc"),
            "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {a: save_tiny_model(a, root / a) for a in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_discovered_targets_train_and_merge(zoo, arch):
    trainer = LocalTrainer.from_pretrained(zoo[arch], config=TrainConfig(steps=2, batch_size=2, lr=5e-2))
    assert trainer.config.target_modules == EXPECTED[arch]
    config = AutoConfig.from_pretrained(zoo[arch])
    assert resolve_targets_for_config(config, "auto") == EXPECTED[arch]      # probe/plan see the same set
    est = estimate(config, ["auto"], 4, batch=1, seq_len=16)
    shapes = linear_shapes(trainer.base, ("auto",))
    assert est.lora_parameter_count == sum(4 * (o + i) for o, i in shapes.values())
    update = trainer.train(synthetic_records(4), round=1)
    assert {m.rsplit(".", 1)[-1] for m in update.modules()} == set(EXPECTED[arch])
    for m in update.modules():   # factors are (d_out x r), (r x d_in) even for Conv1D
        b, a = update.pair(m)
        assert (b.shape[0], a.shape[1]) == shapes[m]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with trainer.current() as model, torch.no_grad():
        ref = model(input_ids=ids).logits
    g = GlobalFactors(factors=update.factors, rank=update.rank, alpha=update.alpha)
    merge_deltas(trainer.base, {m: g.module_delta(m) for m in g.modules()})
    with torch.no_grad():
        merged = trainer.base(input_ids=ids).logits
    assert float((merged - ref).abs().max()) < 1e-5
    assert float(np.abs(g.module_delta(g.modules()[0])).max()) > 0   # the check is not vacuous


def test_unknown_target_fails_before_training_listing_names(zoo):
    with pytest.raises(ValueError, match=r"match no linear layer.*c_attn"):
        LocalTrainer.from_pretrained(zoo["gpt2"], config=TrainConfig(target_modules=("q_proj",)))
    model = AutoModelForCausalLM.from_pretrained(zoo["gpt_neox"])
    assert resolve_targets(model, ["dense"]) == ("dense",)


def test_rank_checks_before_training(zoo, tmp_path):
    trainer = LocalTrainer.from_pretrained(zoo["llama"], config=TrainConfig(steps=1, batch_size=2))
    with pytest.raises(ValueError, match="above its size"):
        trainer.train(synthetic_records(2), spec=RankSpec(rank=64))
    with pytest.raises(ValueError, match="match no target module"):
        trainer.check_spec(RankSpec(rank=2, rank_pattern={"c_fc": 4}), strict_pattern=True)
    # the wire's caps, before any training: bytes at the chosen wire dtype, rank, module count
    from edge_client.wire import DecodeLimits
    shapes = trainer.module_shapes()
    need = sum(4 * (o + i) * 4 for o, i in shapes.values())      # rank 4, 4 bytes per float32
    trainer.check_spec(RankSpec(rank=4), limits=DecodeLimits(max_bytes=need))
    with pytest.raises(ValueError, match="above the wire's cap"):
        trainer.check_spec(RankSpec(rank=4), limits=DecodeLimits(max_bytes=need - 1))
    trainer.check_spec(RankSpec(rank=4), wire_dtype="bfloat16", limits=DecodeLimits(max_bytes=need // 2))
    with pytest.raises(ValueError, match="max_rank 2"):
        trainer.check_spec(RankSpec(rank=4), limits=DecodeLimits(max_rank=2))
    with pytest.raises(ValueError, match="max_modules"):
        trainer.check_spec(RankSpec(rank=4), limits=DecodeLimits(max_modules=len(shapes) - 1))


def test_load_errors_name_the_cause(zoo, tmp_path):
    with pytest.raises(ValueError, match="local model path .* does not exist"):
        load_model(str(tmp_path / "nope" / "model"))
    folder = tmp_path / "no-tok"
    AutoModelForCausalLM.from_pretrained(zoo["llama"]).save_pretrained(folder)
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_model(str(folder))


def test_flower_run_config_auto():
    assert TrainConfig.from_run_config({"target-modules": ""}).target_modules == ("auto",)
    assert TrainConfig.from_run_config({"target-modules": "auto"}).target_modules == ("auto",)


@pytest.mark.slow
def test_model_zoo_table_all_pass():
    spec = importlib.util.spec_from_file_location("model_zoo", Path(__file__).parents[2] / "scripts" / "model_zoo.py")
    zoo_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo_mod)
    assert zoo_mod.main([]) == 0


FFN_KEYS = {"llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
            "qwen2": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
            "mistral": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
            "gpt2": ("mlp.c_fc", "mlp.c_proj"),
            "gpt_neox": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ffn_rank_pattern_reaches_the_ffn_only(zoo, arch):
    """The simulation's mixed client type (attention rank 4, FFN rank 16) puts its FFN rank on the
    model's FFN projections and nowhere else, whatever the architecture calls them."""
    from edge_client.targets import ffn_pattern_keys
    from edge_client.wire import rank_for_module
    from server.workloads.devices import assign_devices

    model, _ = load_model(zoo[arch])
    keys = ffn_pattern_keys(model, "auto")
    assert keys == FFN_KEYS[arch]
    devices = assign_devices([f"c{i}" for i in range(40)], seed=0, rank_distribution="uniform",
                             rank_map={8: 2, 30: 4, 200: 16}, ffn_keys=keys)
    spec = next(d.spec for d in devices if d.client_type == "r30_200")
    shapes = linear_shapes(model, ("auto",))
    ranks = {m: rank_for_module(m, spec.rank, spec.rank_pattern) for m in shapes}
    ffn = {m for m in shapes if ".mlp." in m}
    assert ffn and all(ranks[m] == 16 for m in ffn)                  # every FFN projection at the FFN rank
    assert all(ranks[m] == 4 for m in set(shapes) - ffn)            # attention (GPT-2's attn.c_proj too) at 4
