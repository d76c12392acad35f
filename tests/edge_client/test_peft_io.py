"""peft adapter folders in and out; alpha_pattern on the wire; flexlora aggregate."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from edge_client.peft_io import read_peft_adapter, write_peft_adapter
from edge_client.wire import ClientUpdate, GlobalFactors, decode_global, decode_update, encode_global, encode_update

ROOT = Path(__file__).parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_round_trip(arch):
    res = _script("peft_round_trip").round_trip(arch, rank=32)
    assert res["wire_vs_peft_delta"] < 1e-6            # rank_pattern and alpha_pattern honoured on the way in
    assert res["loaded_vs_by_hand_logits"] < 1e-5      # PeftModel.from_pretrained == factors applied by hand
    assert res["aggregate_vs_weighted_average"] < 1e-5  # full rank: the exact example-weighted average


def _factors(rng, modules, r, d=8):
    out = {}
    for m in modules:
        out[f"{m}.lora_A.weight"] = rng.standard_normal((r, d)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = rng.standard_normal((d, r)).astype(np.float32)
    return out


MODS = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj"]


def test_alpha_pattern_scales_and_travels():
    rng = np.random.default_rng(0)
    u = ClientUpdate(client_id="c", factors=_factors(rng, MODS, 2), num_examples=3, rank=2, alpha=16.0,
                     alpha_pattern={"down_proj": 128.0}, base_model="b", target_modules=["q_proj", "down_proj"])
    assert u.module_scaling(MODS[0]) == 8.0 and u.module_scaling(MODS[1]) == 64.0
    back = decode_update(encode_update(u))
    assert back.alpha_pattern == {"down_proj": 128.0} and back.module_scaling(MODS[1]) == 64.0
    plain = ClientUpdate(client_id="c", factors=u.factors, num_examples=3, rank=2, alpha=16.0, base_model="b",
                         target_modules=["q_proj", "down_proj"])
    assert b"alpha_pattern" not in encode_update(plain)          # old decoders still read plain updates
    assert decode_update(encode_update(plain)).alpha_pattern == {}
    g = GlobalFactors(factors=u.factors, rank=2, alpha=4.0, alpha_pattern={"q_proj": 2.0})
    assert decode_global(encode_global(g)).module_scaling(MODS[0]) == 1.0
    with pytest.raises(ValueError, match="alpha_pattern"):
        GlobalFactors(factors=u.factors, rank=2, alpha=4.0, alpha_pattern={"q_proj": -1.0})


def test_peft_folder_refusals(tmp_path):
    rng = np.random.default_rng(1)
    folder = Path(write_peft_adapter(tmp_path / "a", _factors(rng, MODS, 2), alpha=8.0))
    assert read_peft_adapter(folder).rank == 2
    cfg = json.loads((folder / "adapter_config.json").read_text())
    for key, value, msg in (("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save")):
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=msg):
            read_peft_adapter(folder)
    with pytest.raises(ValueError, match="adapter_config.json"):
        read_peft_adapter(tmp_path)


def test_aggregate_cli_writes_rank_and_wire(tmp_path):
    from server.cli import main

    rng = np.random.default_rng(2)
    paths = []
    for k, r in enumerate((2, 4)):
        u = ClientUpdate(client_id=f"c{k}", factors=_factors(rng, MODS, r), num_examples=k + 1, rank=r,
                         alpha=16.0, base_model="b", target_modules=["q_proj", "down_proj"])
        paths.append(tmp_path / f"u{k}.safetensors")
        paths[-1].write_bytes(encode_update(u))
    assert main(["aggregate", *map(str, paths), "--rank", "3", "--out", str(tmp_path / "g")]) == 0
    g = read_peft_adapter(tmp_path / "g")
    assert g.rank == 3 and g.pair(MODS[0])[0].shape == (8, 3)
    assert main(["aggregate", *map(str, paths), "--rank", "3", "--out", str(tmp_path / "g.safetensors")]) == 0
    wire = decode_global((tmp_path / "g.safetensors").read_bytes())
    assert np.allclose(wire.module_delta(MODS[1]), g.module_delta(MODS[1]), rtol=1e-5, atol=1e-5)
    assert main(["aggregate", str(paths[0]), "--rank", "9", "--out", str(tmp_path / "x")]) == 1   # above 8


def test_streaming_aggregator_honours_alpha_pattern():
    from server.core.aggregation import Aggregator
    from server.core.oracles import flexlora_delta

    rng = np.random.default_rng(3)
    u = ClientUpdate(client_id="c", factors=_factors(rng, MODS, 2), num_examples=3, rank=2, alpha=16.0,
                     alpha_pattern={"down_proj": 128.0}, base_model="b", target_modules=["q_proj", "down_proj"])
    agg = Aggregator(max_rank=2, method="exact")
    agg.add_update(u)
    adapter = agg.finalize()
    for m in MODS:
        b, a = u.pair(m)
        want = flexlora_delta([(b, a, u.module_scaling(m), 3)])
        np.testing.assert_allclose(adapter.delta(m), want, rtol=1e-4, atol=1e-3)


def test_offline_aggregate_is_the_rank_r_truncation_of_the_weighted_sum():
    """``flexlora aggregate`` runs the streaming aggregator: its adapter's delta per module is the
    rank-R truncated SVD of sum_k p_k s_k B_k A_k (NumPy oracle), each update at its own
    scaling (alpha_pattern included), whatever the ranks (here R = 3 between them)."""
    from server.core.offline import aggregate_updates
    from server.core.oracles import flexlora_delta, truncate_delta

    rng = np.random.default_rng(7)
    updates = [ClientUpdate(client_id=f"c{k}", factors=_factors(rng, MODS, r), num_examples=n, rank=r, alpha=16.0,
                            alpha_pattern={"down_proj": 64.0} if k == 1 else {}, base_model="b",
                            target_modules=["q_proj", "down_proj"])
               for k, (r, n) in enumerate(((2, 1), (4, 3), (1, 2)))]
    g = aggregate_updates(updates, 3, alpha=8.0)
    assert g.rank == 3 and g.alpha == 8.0
    for m in MODS:
        dw = flexlora_delta([(*u.pair(m), u.module_scaling(m), u.num_examples) for u in updates])
        b, a = truncate_delta(dw, 3, g.module_scaling(m))
        np.testing.assert_allclose(g.module_delta(m), g.module_scaling(m) * (b.astype(np.float64) @ a),
                                   rtol=1e-4, atol=1e-4 * np.abs(dw).max())
