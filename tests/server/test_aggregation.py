"""Streaming Aggregator and GlobalAdapter against the reference implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from server.core.aggregation import Aggregator, GlobalAdapter
from server.core.oracles import reference_aggregate, reference_client_factors

MODULES = {"model.layers.0.self_attn.q_proj": (24, 20), "model.layers.0.mlp.down_proj": (18, 30)}


class _Update:  # ClientUpdate-like, for the reference
    def __init__(self, factors, num_examples, alpha, rslora=False):
        self.factors, self.num_examples, self.alpha, self.rslora = factors, num_examples, alpha, rslora


def _client(rng, rank, scale=1.0):
    f = {}
    for m, (d_out, d_in) in MODULES.items():
        f[m + ".lora_B.weight"] = (scale * rng.standard_normal((d_out, rank))).astype(np.float32)
        f[m + ".lora_A.weight"] = rng.standard_normal((rank, d_in)).astype(np.float32)
    return f


def _clients(seed=0, ranks=(2, 4, 8, 3)):
    rng = np.random.default_rng(seed)
    return [_Update(_client(rng, r), int(rng.integers(1, 50)), float(rng.choice([8.0, 16.0])),
                    bool(i % 2)) for i, r in enumerate(ranks)]


def _check_against_reference(agg, updates, max_rank, rtol=1e-4):
    for u in updates:
        agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha, rslora=u.rslora)
    got = agg.finalize()
    ref = reference_aggregate(updates, max_rank)
    assert set(got.modules) == set(ref)
    for m, (U, S, Vt) in ref.items():
        np.testing.assert_allclose(got.modules[m][1], S, rtol=rtol, atol=rtol * S[0])
        np.testing.assert_allclose(got.delta(m), (U * S) @ Vt, rtol=0, atol=10 * rtol * S[0])
    return got


@pytest.mark.parametrize("method", ["auto", "exact", "randomized", "dense"])
def test_matches_reference(method):
    # oversample covers the whole operator, so every route is exact here
    _check_against_reference(Aggregator(5, method=method, oversample=40), _clients(), 5)


def test_auto_folds_into_dense_and_still_matches():
    agg = Aggregator(5, dense_threshold=6)
    got = _check_against_reference(agg, _clients(1), 5, rtol=1e-3)
    assert set(agg.routes_planned().values()) == {"dense"}
    assert set(got.routes.values()) == {"dense"}


def test_dense_state_is_flat_in_number_of_clients():
    sizes = []
    for n in (2, 8):
        agg = Aggregator(4, method="dense")
        for u in _clients(2, ranks=(3,) * n):
            agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha)
        sizes.append(agg.state_bytes())
    assert sizes[0] == sizes[1] == sum(4 * a * b for a, b in MODULES.values())


def test_client_factors_reproduce_truncation_for_both_splits():
    updates = _clients(3)
    agg = Aggregator(6, method="exact")
    for u in updates:
        agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha, rslora=u.rslora)
    g = agg.finalize()
    for split in ("balanced", "reference"):
        for rank, rslora in ((3, False), (6, True)):
            f = g.client_factors(rank, alpha=16.0, rslora=rslora, split=split)
            s = 16.0 / (math.sqrt(rank) if rslora else rank)
            for m, (U, S, Vt) in g.modules.items():
                B, A = f[m + ".lora_B.weight"], f[m + ".lora_A.weight"]
                assert B.shape == (U.shape[0], rank) and A.shape == (rank, Vt.shape[1])
                np.testing.assert_allclose(s * B @ A, (U[:, :rank] * S[:rank]) @ Vt[:rank],
                                           rtol=0, atol=1e-5 * S[0])
    ref = reference_client_factors(g.modules, 3, 16.0)
    ours = g.client_factors(3, alpha=16.0, split="reference")
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-6)


def test_rank_pattern_and_too_large_rank():
    agg = Aggregator(6)
    for u in _clients(4):
        agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha)
    g = agg.finalize()
    f = g.client_factors(4, rank_pattern={"down_proj": 2})
    assert f["model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 2
    assert f["model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    f2 = g.client_factors({"q_proj": 5})
    assert f2["model.layers.0.self_attn.q_proj.lora_B.weight"].shape[1] == 5
    assert f2["model.layers.0.mlp.down_proj.lora_B.weight"].shape[1] == 6
    with pytest.raises(ValueError, match=r"rank 7 for module .* exceeds max_rank 6"):
        g.client_factors(7)
    with pytest.raises(ValueError, match="split must be one of"):
        g.client_factors(2, split="even")


def test_serialisation_roundtrip():
    agg = Aggregator(3)
    for u in _clients(5):
        agg.add(u.factors, num_examples=u.num_examples, alpha=u.alpha)
    g = agg.finalize()
    h = GlobalAdapter.from_bytes(g.to_bytes())
    assert h.max_rank == 3 and h.routes == g.routes
    for m in g.modules:
        for x, y in zip(g.modules[m], h.modules[m]):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="safetensors"):
        GlobalAdapter.from_bytes(b"\x01")


def test_add_update_with_client_update_and_rank_check():
    from edge_client.wire import ClientUpdate
    rng = np.random.default_rng(6)
    factors = _client(rng, 4)
    up = ClientUpdate(client_id="c0", factors=factors, num_examples=10, rank=4, alpha=8.0,
                      base_model="abc123", target_modules=["q_proj", "down_proj"])
    agg = Aggregator(4, method="exact")
    agg.add_update(up)
    assert agg.num_clients == 1 and agg.total_weight == 10.0
    g = agg.finalize()
    m = "model.layers.0.self_attn.q_proj"
    expect = 2.0 * factors[m + ".lora_B.weight"].astype(np.float64) @ factors[m + ".lora_A.weight"]
    np.testing.assert_allclose(g.delta(m), expect, rtol=0, atol=1e-4 * np.abs(expect).max())
    with pytest.raises(ValueError, match="rank/rank_pattern say 3"):
        agg.add(factors, num_examples=1, alpha=8.0, rank=3)


def test_zero_weight_client_and_single_client():
    rng = np.random.default_rng(7)
    a, b = _client(rng, 3), _client(rng, 5)
    one = Aggregator(4, method="exact")
    one.add(a, num_examples=5, alpha=16.0)
    two = Aggregator(4, method="exact")
    two.add(a, num_examples=5, alpha=16.0)
    two.add(b, num_examples=5, alpha=16.0, weight=0.0)
    g1, g2 = one.finalize(), two.finalize()
    for m in g1.modules:
        d1 = g1.delta(m)
        np.testing.assert_allclose(d1, g2.delta(m), rtol=0, atol=1e-5 * np.abs(d1).max())


def test_rejected_client_leaves_state_unchanged():
    rng = np.random.default_rng(8)
    agg = Aggregator(4)
    agg.add(_client(rng, 3), num_examples=5, alpha=16.0, client_id="ok")
    before = agg.state_bytes()
    bad = _client(rng, 3)
    bad["model.layers.0.mlp.down_proj.lora_A.weight"] = np.zeros((3, 31), np.float32)
    with pytest.raises(ValueError, match=r"client 'x': module 'model.layers.0.mlp.down_proj' is 18x31"):
        agg.add(bad, num_examples=5, alpha=16.0, client_id="x")
    nan = _client(rng, 3)
    nan["model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="contains NaN"):
        agg.add(nan, num_examples=5, alpha=16.0)
    missing = {k: v for k, v in _client(rng, 3).items() if "q_proj.lora_B" not in k}
    with pytest.raises(ValueError, match=r"q_proj.lora_B.weight' is missing"):
        agg.add(missing, num_examples=5, alpha=16.0)
    for kw, match in ((dict(num_examples=0, alpha=1.0), "num_examples"),
                      (dict(num_examples=1, alpha=-1.0), "alpha"),
                      (dict(num_examples=1, alpha=1.0, weight=-2.0), "weight")):
        with pytest.raises(ValueError, match=match):
            agg.add(_client(rng, 3), **kw)
    assert agg.state_bytes() == before and agg.num_clients == 1


def test_constructor_and_finalize_errors():
    with pytest.raises(ValueError, match="max_rank must be >= 1"):
        Aggregator(0)
    with pytest.raises(ValueError, match="method must be one of"):
        Aggregator(4, method="svd")
    with pytest.raises(ValueError, match="at least one client"):
        Aggregator(4).finalize()


def test_cpu_and_cuda_aggregators_share_one_base():
    # issue 11: one base with backend hooks; CudaAggregator only adds device handling
    from server.core.aggregation import AggregatorBase
    from server.core.cuda_aggregation import CudaAggregator
    assert issubclass(Aggregator, AggregatorBase) and issubclass(CudaAggregator, AggregatorBase)
    for name in ("add_update", "_add_module", "_threshold", "state_bytes", "modules", "_svd_tasks"):
        assert name not in vars(CudaAggregator), name
    for hook in ("_keep", "_zeros", "_fold", "_accumulate"):
        assert hook in vars(Aggregator) and hook in vars(CudaAggregator), hook
