import json
import struct

import numpy as np
import pytest

from edge_client.wire import (
    ClientUpdate,
    DecodeLimits,
    GlobalFactors,
    decode_global,
    decode_update,
    encode_global,
    encode_update,
    module_names,
    rank_for_module,
    scaling,
)

PREFIX = "base_model.model.model.layers.{}.{}.{}"


def make_factors(rank=4, ffn_rank=8, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    f = {}
    for layer in range(layers):
        for block, name, d_in, d_out, r in (("self_attn", "q_proj", 16, 16, rank), ("mlp", "down_proj", 40, 16, ffn_rank)):
            m = PREFIX.format(layer, block, name)
            f[m + ".lora_A.weight"] = rng.standard_normal((r, d_in)).astype(np.float32)
            f[m + ".lora_B.weight"] = rng.standard_normal((d_out, r)).astype(np.float32)
    return f


def make_update(**kw):
    args = dict(client_id="c1", factors=make_factors(), num_examples=7, rank=4, rank_pattern={"down_proj": 8},
                alpha=16.0, base_model="ab" * 32, target_modules=["q_proj", "down_proj"], round=3,
                metrics={"train_loss": 1.5})
    args.update(kw)
    return ClientUpdate(**args)


def test_helpers():
    assert rank_for_module("a.layers.0.mlp.down_proj", 4, {"down_proj": 8}) == 8
    assert rank_for_module("a.layers.0.mlp.up_proj", 4, {"down_proj": 8}) == 4
    assert rank_for_module("x.layers.1.mlp.down_proj", 4, {r"layers\.0\.mlp\.down_proj": 8}) == 4
    assert scaling(16, 4, False) == 4.0 and scaling(16, 4, True) == 8.0
    assert module_names(make_factors(layers=1)) == [PREFIX.format(0, "mlp", "down_proj"), PREFIX.format(0, "self_attn", "q_proj")]
    u = make_update()
    assert u.module_rank(PREFIX.format(0, "mlp", "down_proj")) == 8
    assert u.module_scaling(PREFIX.format(0, "self_attn", "q_proj")) == 4.0


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_update_roundtrip(dtype, tol):
    u = make_update()
    v = decode_update(encode_update(u, dtype=dtype), expected_base_model=u.base_model, max_rank=8)
    for k, a in u.factors.items():
        np.testing.assert_allclose(v.factors[k], a, rtol=tol, atol=tol)
        assert v.factors[k].dtype == np.float32
    for name in ("client_id", "num_examples", "rank", "rank_pattern", "alpha", "rslora", "base_model",
                 "target_modules", "round", "metrics"):
        assert getattr(v, name) == getattr(u, name)


def test_bfloat16_rounds_to_nearest_even():
    f = make_factors(layers=1)
    key = next(iter(f))
    f[key][0, :3] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -3.0]  # ties: down to 1.0, up to 1+2**-6
    v = decode_update(encode_update(make_update(factors=f, rank_pattern={"down_proj": 8}), dtype="bfloat16"))
    np.testing.assert_array_equal(v.factors[key][0, :3], [1.0, 1.0 + 2**-6, -3.0])


def test_global_roundtrip_and_padding_rank():
    f = make_factors(rank=2, ffn_rank=2)
    g = GlobalFactors(factors=f, rank=4, rank_pattern={"down_proj": 8}, alpha=8.0, round=2, strategy="flexlora",
                      base_model="x", merge_into_base=True)
    h = decode_global(encode_global(g))
    assert (h.rank, h.rank_pattern, h.alpha, h.round, h.strategy, h.base_model, h.merge_into_base) == \
        (4, {"down_proj": 8}, 8.0, 2, "flexlora", "x", True)
    with pytest.raises(ValueError, match="above the declared rank"):
        GlobalFactors(factors=make_factors(rank=8), rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="kind"):
        decode_update(encode_global(g))


def _rewrite(data: bytes, edit_meta=None, edit_header=None) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if edit_meta:
        meta = json.loads(header["__metadata__"]["flexlora"])
        edit_meta(meta)
        header["__metadata__"]["flexlora"] = json.dumps(meta)
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _nan_payload():
    u = make_update()
    data = bytearray(encode_update(u))
    data[-4:] = np.array([np.nan], dtype="<f4").tobytes()
    return bytes(data)


GOOD = encode_update(make_update())
BAD = {
    "not bytes": ("abc", "must be bytes"),
    "too short": (b"\x01\x02", "too short"),
    "header too long": (struct.pack("<Q", 10**9) + b"{}", "header of"),
    "header beyond payload": (struct.pack("<Q", 100) + b"{}", "claims"),
    "header not json": (struct.pack("<Q", 8) + b"not json", "not valid JSON"),
    "no metadata": (_rewrite(GOOD, edit_header=lambda h: h.pop("__metadata__")), "lacks"),
    "bad schema": (_rewrite(GOOD, _set("schema", 99)), "schema"),
    "missing field": (_rewrite(GOOD, lambda m: m.pop("alpha")), "missing \\['alpha'\\]"),
    "extra field": (_rewrite(GOOD, _set("evil", 1)), "unexpected \\['evil'\\]"),
    "negative examples": (_rewrite(GOOD, _set("num_examples", 0)), "num_examples"),
    "bool rank": (_rewrite(GOOD, _set("rank", True)), "rank must be an int"),
    "alpha inf": (_rewrite(GOOD, _set("alpha", "inf")), "alpha"),
    "rank mismatch": (_rewrite(GOOD, _set("rank", 5)), "rank 4, but the metadata gives"),
    "pattern regex": (_rewrite(GOOD, _set("rank_pattern", {"(": 3})), "regular expression"),
    "unknown target": (_rewrite(GOOD, _set("target_modules", ["q_proj"])), "not one of the target modules"),
    "target without factors": (_rewrite(GOOD, _set("target_modules", ["q_proj", "down_proj", "v_proj"])), "no factors"),
    "bad target name": (_rewrite(GOOD, _set("target_modules", ["q proj", "down_proj"])), "short module name"),
    "dtype mismatch": (_rewrite(GOOD, _set("dtype", "float16")), "metadata says"),
    "int tensor": (_rewrite(GOOD, edit_header=lambda h: [v.__setitem__("dtype", "I32") for k, v in h.items() if k != "__metadata__"]), "dtype"),
    "bad offsets": (_rewrite(GOOD, edit_header=lambda h: [v.__setitem__("data_offsets", [0, 4]) for k, v in h.items() if k != "__metadata__"]), "invalid safetensors"),
    "nan": (_nan_payload(), "NaN or Inf"),
    "missing B": (_rewrite(GOOD, edit_header=lambda h: h.pop(sorted(k for k in h if k.endswith("lora_B.weight"))[-1])), "invalid safetensors|lacks"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_decode_rejects(case):
    data, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        decode_update(data)


def test_decode_limits_and_policy():
    with pytest.raises(ValueError, match="exceeds the limit"):
        decode_update(GOOD, limits=DecodeLimits(max_bytes=100))
    with pytest.raises(ValueError, match="outside \\[1, 4\\]|rank_pattern"):
        decode_update(GOOD, limits=DecodeLimits(max_rank=4))
    with pytest.raises(ValueError, match="tensors exceed"):
        decode_update(GOOD, limits=DecodeLimits(max_modules=1))
    with pytest.raises(ValueError, match="does not match the expected"):
        decode_update(GOOD, expected_base_model="other")
    with pytest.raises(ValueError, match="above the allowed maximum 4"):
        decode_update(GOOD, max_rank=4)
    with pytest.raises(ValueError, match="above the allowed maximum 6"):
        decode_update(GOOD, max_rank={"down_proj": 6})
    assert decode_update(GOOD, max_rank={"q_proj": 4}).rank == 4
    with pytest.raises(ValueError, match="max_bytes"):
        DecodeLimits(max_bytes=0)


def test_constructor_validation():
    with pytest.raises(ValueError, match="lacks"):
        f = make_factors()
        f.pop(next(k for k in f if k.endswith("lora_B.weight")))
        make_update(factors=f)
    with pytest.raises(ValueError, match="columns"):
        f = make_factors()
        k = next(k for k in f if k.endswith("lora_B.weight"))
        f[k] = f[k][:, :3]
        make_update(factors=f)
    with pytest.raises(ValueError, match="overflows float16"):
        f = make_factors()
        next(iter(f.values()))[0, 0] = 1e6
        encode_update(make_update(factors=f), dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        encode_update(make_update(), dtype="int8")
