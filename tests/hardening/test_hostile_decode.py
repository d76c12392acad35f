"""Issue 13, classes 1 and 8: the delta-norm bound is exact (float64, Gram matrices) on the
contribution the aggregator adds, the weighted contribution must be finite in float32, and
nothing but ValueError leaves the decoder; huge finite entries get a clear error before the
native core."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import fuzzlib  # noqa: E402

from edge_client.wire import DecodeLimits, decode_update, product_norm  # noqa: E402

A_KEY, B_KEY = fuzzlib.MODULE + ".lora_A.weight", fuzzlib.MODULE + ".lora_B.weight"


@pytest.mark.parametrize("seed", range(5))
def test_product_norm_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    b, a = rng.standard_normal((30, 1 + seed)), rng.standard_normal((1 + seed, 17))
    assert product_norm(b, a) == pytest.approx(np.linalg.norm(b @ a), rel=1e-10)


def test_tiny_factors_with_huge_alpha_do_not_underflow_past_the_bound():
    # float32 norms of 1e-30 entries square to 0 (underflow); the old bound read 0 here
    f = {A_KEY: np.full((4, 6), 1e-30, np.float32), B_KEY: np.full((8, 4), 1e-30, np.float32)}
    data = fuzzlib.update_bytes(f, alpha=4e66)
    with pytest.raises(ValueError, match="max_delta_norm"):
        decode_update(data, limits=DecodeLimits(max_delta_norm=1e6))


def test_weighted_contribution_must_be_finite_in_float32():
    # per-module delta under the bound, but num_examples x scaling x B A overflows float32
    f = {A_KEY: np.full((4, 6), 1e17, np.float32), B_KEY: np.full((8, 4), 1e17, np.float32)}
    limits = DecodeLimits(max_delta_norm=1e300, max_num_examples=10**9)
    with pytest.raises(ValueError, match="not finite in float32"):
        decode_update(fuzzlib.update_bytes(f, num_examples=10**9), limits=limits)


@pytest.mark.parametrize("field,value", [("num_examples", 10**400), ("alpha", 10**400), ("rank", 10**400),
                                         ("round", 10**400), ("alpha", -(10**400))])
def test_huge_integers_raise_value_error_only(field, value):
    meta = fuzzlib.update_meta()
    meta[field] = value
    data = fuzzlib.update_bytes(meta_json=json.dumps(meta))
    with pytest.raises(ValueError):
        decode_update(data, limits=fuzzlib.LIMITS)


def test_empty_dimensions_are_rejected():
    f = {A_KEY: np.zeros((4, 0), np.float32), B_KEY: np.zeros((0, 4), np.float32)}
    with pytest.raises(ValueError, match="empty dimension"):
        decode_update(fuzzlib.update_bytes(f), limits=fuzzlib.LIMITS)


def test_huge_finite_entries_get_a_clear_error_before_the_native_core():
    from server.core.aggregation import Aggregator
    agg = Aggregator(4)
    b = np.full((8, 4), 1e30, np.float32)
    a = np.full((4, 6), 1e30, np.float32)
    with pytest.raises(ValueError, match="too large"):
        agg.add({"m.lora_A.weight": a, "m.lora_B.weight": b}, num_examples=1, alpha=4.0)
    assert agg.num_clients == 0 and agg.modules == []
