import json

import numpy as np
import pytest
import torch

from edge_client.testing import synthetic_records
from edge_client.trainer import LocalTrainer, TrainConfig, fingerprint, load_model
from edge_client.update import GlobalFactors, decode_update, encode_update


def test_training_lowers_loss_and_returns_update(tiny_model, tokenizer):
    records = synthetic_records(32, seed=3)
    tr = LocalTrainer(tiny_model, tokenizer, config=TrainConfig(rank=4, rank_pattern={"v_proj": 8}, batch_size=8,
                                                                learning_rate=5e-3, epochs=6, max_steps=20,
                                                                max_seq_len=96), client_id="c7")
    before = tr.evaluate_loss(records)
    u = tr.train(records, round=2)
    after = tr.evaluate_loss(records)
    assert after < before - 0.3
    assert u.metrics["steps"] == 20 and u.num_examples == 32 and u.round == 2 and u.client_id == "c7"
    v = next(k for k in u.factors if "v_proj.lora_A" in k)
    q = next(k for k in u.factors if "q_proj.lora_A" in k)
    assert u.factors[v].shape[0] == 8 and u.factors[q].shape[0] == 4
    assert q.startswith("base_model.model.model.layers.0.self_attn.q_proj")
    assert decode_update(encode_update(u)).base_model == u.base_model == fingerprint(tiny_model)


def test_response_only_labels(tokenizer):
    from edge_client.data import IGNORE_INDEX, format_prompt, tokenize_record
    r = synthetic_records(1)[0]
    ids, labels = tokenize_record(tokenizer, r, 200)
    n_resp = sum(l != IGNORE_INDEX for l in labels)
    assert tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX], skip_special_tokens=True) == r["output"]
    assert len(ids) - n_resp == 1 + len(tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"])


def test_load_global_rank_change_and_merge(tiny_model, tokenizer):
    records = synthetic_records(16, seed=4)
    tr = LocalTrainer(tiny_model, tokenizer, config=TrainConfig(rank=4, batch_size=8, max_steps=3, learning_rate=1e-2))
    u = tr.train(records)
    trained = tr.evaluate_loss(records)
    # same factors sent back at the same rank and alpha: identical model
    tr.reset_adapter()
    tr.load_global(GlobalFactors(factors=u.factors, rank=4, alpha=16.0))
    assert tr.evaluate_loss(records) == pytest.approx(trained, abs=1e-5)
    # rank changed: adapter rebuilt at rank 8, factors zero-padded, B rescaled to the new scaling
    tr.load_global(GlobalFactors(factors=u.factors, rank=8, alpha=32.0))
    assert tr.config.rank == 8 and next(iter(tr.lora_modules().values())).lora_A["default"].weight.shape[0] == 8
    assert tr.evaluate_loss(records) == pytest.approx(trained, abs=1e-5)
    # FLoRA: merge into base weights, start a fresh adapter; the model's function is unchanged
    tr.configure(rank=4, alpha=16.0)
    tr.load_global(GlobalFactors(factors=u.factors, rank=4, alpha=16.0, merge_into_base=True))
    assert all(float(m.lora_B["default"].weight.abs().sum()) == 0 for m in tr.lora_modules().values())
    assert tr.evaluate_loss(records) == pytest.approx(trained, abs=1e-4)
    with pytest.raises(ValueError, match="no adapter"):
        tr.set_factors({"base_model.model.nope.lora_A.weight": np.zeros((4, 4)), "base_model.model.nope.lora_B.weight": np.zeros((4, 4))})


def test_offline_failure_names_model(tmp_path):
    with pytest.raises(ValueError, match="could not load model .*missing-model"):
        load_model(str(tmp_path / "missing-model"), local_files_only=True)


def test_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.rank "):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_onnx_matches_torch(tiny_model, tokenizer, tmp_path):
    from edge_client.export import OnnxLM, export_onnx, greedy_torch, merged_model
    tr = LocalTrainer(tiny_model, tokenizer, config=TrainConfig(rank=4))
    with torch.no_grad():
        for m in tr.lora_modules().values():
            m.lora_B["default"].weight.normal_(0, 0.2)
    path = export_onnx(tr.model, tmp_path / "m.onnx")
    lm = OnnxLM(path)
    ids = np.random.default_rng(0).integers(3, 400, (3, 13))
    with torch.no_grad():
        ref = tr.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(lm.logits(ids), ref, rtol=0, atol=1e-4)
    ids2 = ids[:1, :5]
    with torch.no_grad():
        ref2 = tr.model(input_ids=torch.from_numpy(ids2)).logits.numpy()
    np.testing.assert_allclose(lm.logits(ids2), ref2, rtol=0, atol=1e-4)
    prompt = [1, 5, 9, 30]
    assert lm.greedy(prompt, 6) == greedy_torch(merged_model(tr.model), prompt, 6)


def test_cli(model_dir, tmp_path, capsys):
    from edge_client.cli import main
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in synthetic_records(8)))
    assert main(["probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"]["cpus"] >= 1
    assert main(["plan", "--model", str(model_dir), "--ranks", "4,8", "--seq-len", "32"]) == 0
    assert "total" in capsys.readouterr().out
    out = tmp_path / "u.safetensors"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--rank", "4",
                 "--max-steps", "2", "--offline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2.0
    assert decode_update(out.read_bytes()).rank == 4
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(out), "--offline"]) == 2
    assert "could not load model" in capsys.readouterr().err


def test_cli_export(model_dir, tmp_path, capsys):
    from edge_client.cli import main
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--offline", "--json", "--time-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] < 1e-4 and result["onnxruntime_ms_per_token"] > 0 and out.exists()
