"""benchmarks/bench_decode.py --quality (issue 20): float32 vs int8 ONNX on held-out real-suite examples."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("pycountry")
pytest.importorskip("periodictable")
pytest.importorskip("tzdata")

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spaced_picks_evenly():
    spaced = _bench()._spaced
    assert spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spaced([1, 2], 5) == [1, 2]


def test_quality_scores_float32_int8_and_torch_on_the_same_examples(tmp_path):
    out = tmp_path / "q.json"
    assert _bench().main(["--quality", "6", "--quality-train-steps", "2", "--max-new", "4", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["unseen_examples"] == 3 and doc["seen_examples"] == 3 and len(doc["references"]) == 6
    res = doc["results"]
    assert sorted(res) == ["onnx float32 (KV cache)", "onnx int8 (dynamic, KV cache)", "torch float32"]
    torch_r, f32, q8 = res["torch float32"], res["onnx float32 (KV cache)"], res["onnx int8 (dynamic, KV cache)"]
    # the float32 graph is the torch model: the same loss and the same greedy answers
    assert f32["heldout_loss"] == pytest.approx(torch_r["heldout_loss"], rel=1e-4)
    assert f32["predictions"] == torch_r["predictions"] and f32["same_as_onnx_float32"] == 1.0
    for r in res.values():
        assert len(r["predictions"]) == 6 and 0 <= r["rougeL"] <= 1 and np.isfinite(r["heldout_loss"])
    # int8 changes the weights: the loss moves (a little), yet stays finite and close
    assert q8["heldout_loss"] != f32["heldout_loss"]
    assert abs(q8["heldout_loss"] - f32["heldout_loss"]) < 0.5


def test_onnx_evaluate_loss_matches_a_hand_computed_cross_entropy():
    from server.workloads.evaluate import onnx_evaluate

    class Fixed:          # a "graph" whose next-token distribution is the same everywhere
        def __init__(self, vocab):
            self.row = np.log(np.arange(1, vocab + 1, dtype=np.float64))

        def greedy(self, ids, n, eos_token_id=None):
            return [int(self.row.argmax())]

        def logits(self, ids):
            return np.tile(self.row, (1, ids.shape[1], 1))

    from edge_client.data import IGNORE_INDEX, tokenize_record
    from edge_client.testing import train_tokenizer

    tok = train_tokenizer()
    ex = [{"instruction": "Copy the words.", "input": "red cat", "output": "red cat", "category": "copy"}]
    lm = Fixed(len(tok))
    out = onnx_evaluate(lm, tok, ex, max_new_tokens=2)
    _, labels = tokenize_record(tok, ex[0], 128)
    targets = [t for t in labels[1:] if t != IGNORE_INDEX]
    logp = lm.row - np.log(np.exp(lm.row).sum())
    assert out["heldout_loss"] == pytest.approx(-np.mean([logp[t] for t in targets]), rel=1e-9)
    assert out["predictions"] == [tok.decode([len(tok) - 1], skip_special_tokens=True).split("\n")[0].strip()]
