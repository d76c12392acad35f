"""Compute-aware rank choice (time model, deadline, battery) and KV-cache ONNX decoding."""
import numpy as np
import pytest
import torch

from edge_client.rank_policy import NoRankFitsError
from edge_client.resources import DeviceProfile
from edge_client.testing import tiny_llama_config, tiny_model_and_tokenizer
from edge_client.timing import TimeModel, calibrate, choose_rank_for_deadline, step_flops
from edge_client.trainer import LocalTrainer, TrainConfig
from edge_client.wire import RankSpec

CFG = tiny_llama_config(hidden=64, layers=2)
PROFILE = DeviceProfile.simulated(memory_bytes=64 * 2**30)


def test_flops_grow_with_rank_and_length():
    f = {(r, s): step_flops(CFG, ("auto",), RankSpec(rank=r), batch=1, seq_len=s) for r in (4, 32) for s in (16, 64)}
    assert f[(4, 16)] < f[(32, 16)] < f[(32, 64)]
    assert step_flops(CFG, ("auto",), RankSpec(rank=4), batch=1, seq_len=16, gradient_checkpointing=True) > f[(4, 16)]


def test_deadline_and_battery_choose_and_explain():
    tm = TimeModel(flops_per_s=1e9, overhead_s=0.0, calibration=[])
    ranks = [2, 8, 32]
    t = {r: tm.round_seconds(CFG, ("auto",), RankSpec(rank=r), steps=10, batch=1, seq_len=64) for r in ranks}
    deadline = (t[8] + t[32]) / 2
    choice, predicted = choose_rank_for_deadline(PROFILE, CFG, ranks, time_model=tm, deadline_s=deadline, steps=10,
                                                 seq_len=64)
    assert choice.rank == 8 and predicted == pytest.approx(t)
    assert any("past the deadline" in r for r in choice.reasons)
    low = {"percent": 5.0, "plugged": False}
    choice, _ = choose_rank_for_deadline(PROFILE, CFG, ranks, time_model=tm, deadline_s=deadline, steps=10,
                                         seq_len=64, battery=low)
    assert choice.rank == 2 and any("battery" in r for r in choice.reasons)
    with pytest.raises(NoRankFitsError, match="skipping"):
        choose_rank_for_deadline(PROFILE, CFG, ranks, time_model=tm, deadline_s=deadline, steps=10, seq_len=64,
                                 battery=low, on_low_battery="skip")
    with pytest.raises(NoRankFitsError, match="deadline"):
        choose_rank_for_deadline(PROFILE, CFG, ranks, time_model=tm, deadline_s=t[2] / 2, steps=10, seq_len=64)


def test_calibrate_on_device():
    model, tok = tiny_model_and_tokenizer(hidden=32, layers=1)
    trainer = LocalTrainer(model, tok, config=TrainConfig())
    tm = calibrate(trainer, seq_lens=(8, 32), steps=1, high_rank=16)
    assert tm.flops_per_s > 0 and tm.overhead_s >= 0 and len(tm.calibration) == 3   # 2 lengths + 1 high rank
    assert tm.step_seconds(model, ("auto",), RankSpec(rank=4), batch=1, seq_len=32) > 0


def test_kv_cache_export_matches_torch_and_int8(tmp_path):
    from edge_client.export import merged_model
    from edge_client.export_kv import OnnxKVLM, export_onnx_kv, greedy_torch_cache, quantize_int8

    model, _ = tiny_model_and_tokenizer(hidden=32, layers=2)
    path = export_onnx_kv(model, tmp_path / "kv.onnx")
    ref = merged_model(model)
    ref.config.use_cache = True
    lm = OnnxKVLM(path)
    prompt = [1, 5, 6, 7, 8, 9]
    ids = np.array([prompt])
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(lm.logits(ids), want, rtol=1e-4, atol=1e-4)
    assert lm.greedy(prompt, 12) == greedy_torch_cache(ref, prompt, 12)
    q8 = quantize_int8(path, tmp_path / "kv.int8.onnx")
    assert (tmp_path / "kv.int8.onnx").stat().st_size < (tmp_path / "kv.onnx").stat().st_size
    assert np.abs(OnnxKVLM(q8).logits(ids) - want).max() < 0.5


def test_chat_and_completion_records_and_non_utf8(tmp_path, tokenizer):
    from edge_client.data import load_jsonl, prompt_ids

    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]}\n'
                    '{"prompt": "Copy: x", "completion": "x"}\n')
    chat, completion = load_jsonl(path)
    assert (chat["output"], completion["instruction"], completion["output"]) == ("b a", "Copy: x", "x")
    assert prompt_ids(tokenizer, chat)[1:] == prompt_ids(tokenizer, {"instruction": "Reverse: a b"})[1:]
    tokenizer_with_template = __import__("copy").deepcopy(tokenizer)
    tokenizer_with_template.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    ids = prompt_ids(tokenizer_with_template, chat)
    assert tokenizer_with_template.decode(ids) == "<user>Reverse: a b<assistant>"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8"):
        load_jsonl(bad)
