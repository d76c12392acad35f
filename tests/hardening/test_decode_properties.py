"""Property tests of the update decoder on hostile input: every rejection is a ValueError with a
reason, nothing else escapes, and whatever is accepted meets the decoder's invariants."""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import fuzzlib  # noqa: E402

from edge_client.wire import DecodeLimits, decode_update  # noqa: E402

LIMITS = fuzzlib.LIMITS
GOOD = fuzzlib.update_bytes()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
A_KEY, B_KEY = fuzzlib.MODULE + ".lora_A.weight", fuzzlib.MODULE + ".lora_B.weight"


def rejected(data: bytes, match: str | None = None, **kw) -> str:
    with pytest.raises(ValueError, match=match) as info:
        decode_update(data, limits=kw.pop("limits", LIMITS), **kw)
    assert str(info.value), "a rejection must carry a reason"
    return str(info.value)


def test_the_seed_payload_is_valid():
    u = decode_update(GOOD, limits=LIMITS)
    assert u.rank == 4 and u.factors[A_KEY].shape == (4, 6)


@FAST
@given(st.integers(0, len(GOOD) - 1))
def test_every_truncation_is_rejected(n):
    rejected(GOOD[:n])


@FAST
@given(st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_rejected(tail):
    rejected(GOOD + tail)


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_are_rejected(data):
    assert fuzzlib.check_one(data).startswith("rejected: ")


@FAST
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_mutations_never_escape_as_another_exception(edits):
    data = bytearray(GOOD)
    for pos, byte in edits:
        data[pos] = byte
    fuzzlib.check_one(bytes(data))  # accepted inputs are checked against the invariants inside


@FAST
@given(st.integers(LIMITS.max_header_bytes + 1, 2**64 - 1))
def test_huge_header_claims_are_rejected_before_parsing(claim):
    rejected(struct.pack("<Q", claim) + GOOD[8:], "header of .* exceeds the limit")


@FAST
@given(st.integers(1, 4096))
def test_oversized_payloads_are_rejected_by_size(extra):
    limits = DecodeLimits(max_bytes=len(GOOD) - 1 + extra % 2)
    data = GOOD + b" " * extra
    if len(data) > limits.max_bytes:
        rejected(data, "exceeds the limit", limits=limits)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "BF16", "F16", "XYZ"]),
       st.sampled_from([A_KEY, B_KEY]))
def test_wrong_tensor_dtypes_are_rejected(code, key):
    f = fuzzlib.valid_factors()
    itemsize = {"F64": 8, "I64": 8, "I32": 4}.get(code, 1 if code in ("U8", "I8", "BOOL", "F8_E4M3") else 2)
    f[key] = np.zeros(f[key].size * itemsize, np.uint8).reshape(f[key].shape[0], -1)
    data = fuzzlib.raw_safetensors(sorted(f.items()), metadata={"flexlora": json.dumps(fuzzlib.update_meta())},
                                   dtype_codes={key: code})
    rejected(data)


@FAST
@given(st.integers(0, 6), st.integers(0, 6), st.integers(0, 9), st.integers(0, 9), st.integers(1, 3), st.integers(1, 3))
def test_inconsistent_shapes_are_rejected(ra, rb, d_in, d_out, a_ndim, b_ndim):
    a_shape = (ra, d_in) + (1,) * (a_ndim - 2) if a_ndim >= 2 else (ra * d_in,)
    b_shape = (d_out, rb) + (1,) * (b_ndim - 2) if b_ndim >= 2 else (d_out * rb,)
    f = {A_KEY: np.full(a_shape, 0.1, np.float32), B_KEY: np.full(b_shape, 0.1, np.float32)}
    data = fuzzlib.update_bytes(f)
    consistent = a_ndim == b_ndim == 2 and ra == rb == 4 and d_in > 0 and d_out > 0
    if consistent:
        assert decode_update(data, limits=LIMITS).factors[A_KEY].shape == (4, d_in)
    else:
        rejected(data)


@FAST
@given(st.sampled_from([A_KEY, B_KEY]), st.integers(0, 23), st.sampled_from([np.nan, np.inf, -np.inf]),
       st.sampled_from(["float32", "float16"]))
def test_non_finite_values_anywhere_are_rejected(key, index, value, dtype):
    f = {k: v.astype(dtype) for k, v in fuzzlib.valid_factors().items()}
    f[key].reshape(-1)[index % f[key].size] = value
    meta = json.dumps(fuzzlib.update_meta(dtype=dtype))
    rejected(fuzzlib.raw_safetensors(sorted(f.items()), metadata={"flexlora": meta}), "NaN or Inf")


@pytest.mark.parametrize("field", sorted(fuzzlib.update_meta()))
def test_duplicated_metadata_keys_are_rejected(field):
    text = json.dumps(fuzzlib.update_meta())
    dup = text[:-1] + f", {json.dumps(field)}: {json.dumps(fuzzlib.update_meta()[field])}}}"
    rejected(fuzzlib.update_bytes(meta_json=dup), "more than once")


@pytest.mark.parametrize("key", [A_KEY, B_KEY, "__metadata__"])
def test_duplicated_header_keys_are_rejected(key):
    f = fuzzlib.valid_factors()
    meta = {"flexlora": json.dumps(fuzzlib.update_meta())}
    tensors = sorted(f.items())
    if key == "__metadata__":
        data = fuzzlib.raw_safetensors(tensors, metadata=meta, header_extra=', "__metadata__": {"flexlora": "{}"}')
    else:
        data = fuzzlib.raw_safetensors(tensors + [(key, f[key])], metadata=meta)
    rejected(data, "more than once")


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=8)


@FAST
@given(st.sampled_from(sorted(fuzzlib.update_meta())), _json)
def test_metadata_that_lies_is_rejected_or_consistent(field, value):
    data = fuzzlib.update_bytes(**{field: value})
    try:
        u = decode_update(data, limits=LIMITS)
    except ValueError as exc:
        assert str(exc)
        return
    fuzzlib.check_accepted(u)
    if field not in ("schema", "kind", "dtype"):
        assert getattr(u, field) == value  # accepted only when the lie is in fact a valid value


@FAST
@given(st.integers(0, 38), st.sampled_from([A_KEY, B_KEY, "both"]), st.floats(1.0, 1e6))
def test_norm_bombs_are_rejected_exactly_above_the_configured_bound(exponent, which, bound):
    f = fuzzlib.valid_factors()
    for key in (A_KEY, B_KEY):
        if which in (key, "both"):
            f[key] = (f[key].astype(np.float64) * 10.0**exponent).astype(np.float32)
    limits = DecodeLimits(max_delta_norm=bound)
    # the bound is on the delta itself: scaling * ||B @ A||_F, exact in float64
    norm = 16.0 / 4 * float(np.linalg.norm(f[B_KEY].astype(np.float64) @ f[A_KEY].astype(np.float64)))
    data = fuzzlib.update_bytes(f)
    if norm > bound * (1 + 1e-5):
        rejected(data, "max_delta_norm", limits=limits)
    elif norm < bound * (1 - 1e-5):
        decode_update(data, limits=limits)


def test_norm_bomb_through_alpha_is_rejected():
    rejected(fuzzlib.update_bytes(alpha=1e30), "max_delta_norm")


def test_default_norm_bound_accepts_trained_sized_updates_and_rejects_float32_extremes():
    decode_update(fuzzlib.update_bytes())
    f = {k: np.full_like(v, 3e38) for k, v in fuzzlib.valid_factors().items()}
    with pytest.raises(ValueError, match="max_delta_norm"):
        decode_update(fuzzlib.update_bytes(f))


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("where", ["header", "metadata"])
def test_deeply_nested_json_is_rejected(depth, where):
    if where == "header":
        data = struct.pack("<Q", depth) + b"[" * depth
        rejected(data, "nests too deeply|not valid JSON", limits=DecodeLimits())
    else:
        rejected(fuzzlib.update_bytes(meta_json="[" * depth), "nests too deeply|not valid JSON",
                 limits=DecodeLimits())


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="x+*?()|[]{}.\\^$1,_", min_size=1, max_size=40))
def test_rank_pattern_keys_cannot_make_decoding_slow(key):
    f = fuzzlib.valid_factors(module="x" * 48 + ".q_proj")
    data = fuzzlib.update_bytes(f, rank_pattern={key: 4})
    t0 = time.perf_counter()
    try:
        decode_update(data, limits=LIMITS)
    except ValueError as exc:
        assert str(exc)
    assert time.perf_counter() - t0 < 1.0, f"rank_pattern key {key!r} took {time.perf_counter() - t0:.1f} s"
