import json

import numpy as np
import pytest
import torch

from edge_client.testing import synthetic_records
from edge_client.trainer import LocalTrainer, TrainConfig, fingerprint, load_model
from edge_client.wire import GlobalFactors, RankSpec, decode_update, encode_update


def test_training_lowers_loss_and_returns_update(tiny_model, tokenizer):
    records = synthetic_records(32, seed=3)
    tr = LocalTrainer(tiny_model, tokenizer, config=TrainConfig(batch_size=8, lr=5e-3, steps=20, max_length=96,
                                                                target_modules=("q_proj", "v_proj")),
                      spec=RankSpec(rank=4, rank_pattern={"v_proj": 8}), client_id="c7")
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
    # the base model is left a plain transformers model between rounds
    assert not any("lora_" in n for n, _ in tiny_model.named_parameters())


def test_same_seed_same_update_and_epochs_bound_the_steps(tiny_model, tokenizer):
    records = synthetic_records(12, seed=5)
    cfg = TrainConfig(batch_size=4, steps=None, epochs=2, target_modules=("q_proj",))
    tr = LocalTrainer(tiny_model, tokenizer, config=cfg, spec=RankSpec(rank=2))
    a, b = tr.train(records, seed=3), tr.train(records, seed=3)
    assert a.metrics["steps"] == 6.0 and all(np.array_equal(a.factors[k], b.factors[k]) for k in a.factors)
    c = tr.train(records, seed=4)
    assert any(not np.array_equal(a.factors[k], c.factors[k]) for k in a.factors)


def test_response_only_labels(tokenizer):
    from edge_client.data import IGNORE_INDEX, format_prompt, tokenize_record
    r = synthetic_records(1)[0]
    ids, labels = tokenize_record(tokenizer, r, 200)
    n_resp = sum(l != IGNORE_INDEX for l in labels)
    assert tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX], skip_special_tokens=True) == r["output"]
    assert len(ids) - n_resp == 1 + len(tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"])


def test_load_global_rescales_keeps_fresh_slots_and_merges(tiny_model, tokenizer):
    records = synthetic_records(16, seed=4)
    cfg = TrainConfig(batch_size=8, steps=3, lr=1e-2, target_modules=("q_proj", "v_proj"))
    tr = LocalTrainer(tiny_model, tokenizer, config=cfg, spec=RankSpec(rank=4))
    u = tr.train(records)
    trained = tr.evaluate_loss(records)
    # the same factors sent back at the same rank and alpha: the same model
    tr.factors = None
    tr.load_global(GlobalFactors(factors=u.factors, rank=4, alpha=16.0))
    assert tr.evaluate_loss(records) == pytest.approx(trained, abs=1e-5)
    # sent with alpha 32 and trained at rank 8: B rescaled to this adapter's scaling, the extra
    # slots keep peft's fresh init (A random, B zero), so the model's function is unchanged
    tr.load_global(GlobalFactors(factors={k: v * (0.5 if ".lora_B." in k else 1.0) for k, v in u.factors.items()},
                                 rank=4, alpha=32.0))
    with tr.adapter(RankSpec(rank=8), factors=tr.init) as model:
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape[0] == 8 and float(b[:, 4:].abs().sum()) == 0 and float(a[4:].abs().sum()) > 0
        base_a = u.factors[next(k for k in u.factors if k.endswith("q_proj.lora_A.weight"))]
        np.testing.assert_allclose(a[:4].detach().numpy(), base_a, rtol=0, atol=0)
    before_merge = tr.evaluate_loss(records)
    assert before_merge == pytest.approx(trained, abs=1e-5)
    # FLoRA: merged into the base weights, the next adapter starts fresh; the function is unchanged
    tr.load_global(GlobalFactors(factors=u.factors, rank=4, alpha=16.0, merge_into_base=True))
    assert tr.init is None and tr.factors is None
    assert tr.evaluate_loss(records) == pytest.approx(trained, abs=1e-4)
    with pytest.raises(ValueError, match="no adapter"):
        with tr.adapter(factors={"base_model.model.nope.lora_A.weight": np.zeros((4, 4)),
                                 "base_model.model.nope.lora_B.weight": np.zeros((4, 4))}):
            pass


def test_offline_failure_names_model(tmp_path):
    with pytest.raises(ValueError, match="could not load model .*missing-model"):
        load_model(str(tmp_path / "missing-model"), local_files_only=True)


def test_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.steps "):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="TrainConfig.lr "):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="target_modules"):
        TrainConfig(target_modules="q_proj")
    cfg = TrainConfig.from_run_config({"local-steps": 3, "lr": 1, "target-modules": "q_proj, v_proj"})
    assert (cfg.steps, cfg.lr, cfg.target_modules) == (3, 1.0, ("q_proj", "v_proj"))


def test_onnx_matches_torch(tiny_model, tokenizer, tmp_path):
    from edge_client.export import OnnxLM, export_onnx, greedy_torch, merged_model
    tr = LocalTrainer(tiny_model, tokenizer, spec=RankSpec(rank=4))
    with tr.adapter() as model:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.2)
        path = export_onnx(model, tmp_path / "m.onnx")
        lm = OnnxLM(path)
        ids = np.random.default_rng(0).integers(3, 400, (3, 13))
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_allclose(lm.logits(ids), ref, rtol=0, atol=1e-4)
        ids2 = ids[:1, :5]
        with torch.no_grad():
            ref2 = model(input_ids=torch.from_numpy(ids2)).logits.numpy()
        np.testing.assert_allclose(lm.logits(ids2), ref2, rtol=0, atol=1e-4)
        prompt = [1, 5, 9, 30]
        assert lm.greedy(prompt, 6) == greedy_torch(merged_model(model), prompt, 6)


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
                 "--steps", "2", "--offline", "--json"]) == 0
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


def test_cli_export_honours_alpha_pattern(model_dir, tmp_path, capsys):
    """A peft folder with an alpha_pattern exports with peft's own scaling per module."""
    import numpy as np
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_client.cli import main
    from edge_client.export import OnnxLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"down_proj": 64}, target_modules=["q_proj", "down_proj"],
                     init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, cfg)
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model_dir), "--adapter", str(folder), "--out", str(out), "--offline",
                 "--json"]) == 0
    capsys.readouterr()
    ids = np.array([[1, 5, 6, 7, 8, 9]], dtype=np.int64)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).eval()
    with torch.no_grad():
        ref = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
        plain = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = OnnxLM(str(out)).logits(ids)
    assert np.abs(ref - plain).max() > 1e-3          # the adapter changes the outputs
    assert np.abs(got - ref).max() < 1e-4            # and the export applies it at peft's per-module scale


def test_evaluate_answers_agrees_with_loss_and_greedy_decoding(tiny_model, tokenizer):
    records = synthetic_records(4, seed=11, task="copy")
    tr = LocalTrainer(tiny_model, tokenizer, config=TrainConfig(batch_size=4, lr=1e-2, steps=150, max_length=96,
                                                                target_modules=("q_proj", "v_proj", "o_proj",
                                                                                "gate_proj", "up_proj", "down_proj")),
                      spec=RankSpec(rank=8))
    before = tr.evaluate_answers(records)
    assert before["loss"] == pytest.approx(tr.evaluate_loss(records), rel=1e-5)
    tr.train(records, seed=0)
    after = tr.evaluate_answers(records)
    assert after["loss"] == pytest.approx(tr.evaluate_loss(records), rel=1e-5)
    assert after["token_accuracy"] > before["token_accuracy"] and 0 <= after["exact"] <= 1
    # exact (every response token, eos included, is the argmax) is what greedy decoding writes
    outs = tr.generate(records, max_new_tokens=24)
    greedy = sum(o.strip() == r["output"] for o, r in zip(outs, records)) / len(records)
    assert after["exact"] == greedy
    assert after["exact"] > 0
