from __future__ import annotations

import numpy as np
import pytest
from rt_helpers import F32, FINGERPRINT, MODULES, SVD32, make_update

from edge_client.wire import decode_global, encode_global, encode_update
from server.core.oracles import flexlora_delta, truncate_delta
from server.federation.strategies import (
    FedIT,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    RankSpec,
    RoundFailed,
    StrategyConfig,
    make_strategy,
)
from server.federation.strategies.base import split_factors
from server.federation.strategies.fedit import fedavg_factors
from server.federation.strategies.flora import stack_factors
from server.federation.strategies.hetlora import hetlora_aggregate, truncate_factors


def _clients(updates, module, with_n=True):
    out = []
    for u in updates:
        b, a = split_factors(u.factors)[module]
        out.append((b, a, u.module_scaling(module), u.num_examples) if with_n else (b, a, u.module_scaling(module)))
    return out


def _product(msg, module):
    a, b = msg.factors[module + ".lora_A.weight"], msg.factors[module + ".lora_B.weight"]
    return msg.module_scaling(module) * (b.astype(np.float64) @ a)


def test_flexlora_matches_numpy_reference(updates):
    st = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=64, method="exact")
    st.aggregate(updates, round=1)
    spec = RankSpec(rank=2, rank_pattern={"up_proj": 5})
    msg = st.configure(client_id="c0", spec=spec, round=2)
    for module in MODULES:
        dw = flexlora_delta(_clients(updates, module))
        np.testing.assert_allclose(st.global_delta()[module], dw, **SVD32)
        r = spec.module_rank(module)
        b, a = truncate_delta(dw, r, msg.module_scaling(module))
        assert msg.factors[module + ".lora_A.weight"].shape[0] == r
        np.testing.assert_allclose(_product(msg, module), msg.module_scaling(module) * (b.astype(np.float64) @ a),
                                   **SVD32)
        # Eckart-Young: the truncation error is the tail of the singular values
        sv = np.linalg.svd(dw, compute_uv=False)
        err = np.linalg.norm(dw - _product(msg, module))
        assert err == pytest.approx(np.sqrt((sv[r:] ** 2).sum()), rel=1e-3)


def test_hetlora_matches_numpy_reference_and_is_order_free(updates):
    st, st_rev = HetLoRA(StrategyConfig(alpha=16.0)), HetLoRA(StrategyConfig(alpha=16.0))
    st.aggregate(updates, round=1)
    st_rev.aggregate(list(reversed(updates)), round=1)
    for module in MODULES:
        bg, ag = hetlora_aggregate(_clients(updates, module, with_n=False))
        assert st.factors[module][0].shape[1] == max(u.module_rank(module) for u in updates)
        np.testing.assert_allclose(st.global_delta()[module], bg @ ag, **F32)
        np.testing.assert_allclose(st_rev.global_delta()[module], bg @ ag, **F32)
    msg = st.configure(client_id="c0", spec=RankSpec(rank=3), round=2)
    module = next(iter(MODULES))
    bg, ag = st.factors[module]
    b, a = truncate_factors(bg, ag, 3, msg.module_scaling(module))
    np.testing.assert_allclose(msg.factors[module + ".lora_B.weight"], b, **F32)
    np.testing.assert_allclose(_product(msg, module), bg[:, :3].astype(np.float64) @ ag[:3], **F32)


def test_hetlora_weights_follow_product_norms():
    big = make_update("big", 2, seed=3)
    small = make_update("small", 2, seed=4)
    small.factors = {k: v * 0.01 if k.endswith("B.weight") else v for k, v in small.factors.items()}
    bg, _ = hetlora_aggregate(_clients([big, small], next(iter(MODULES)), with_n=False))
    b_big = big.module_scaling(next(iter(MODULES))) * split_factors(big.factors)[next(iter(MODULES))][0]
    assert np.linalg.norm(bg - b_big) < 0.02 * np.linalg.norm(b_big)


def test_flora_stack_is_exact_and_clients_merge_it(updates):
    st = FLoRA(StrategyConfig(alpha=16.0))
    assert st.configure(client_id="c0", spec=RankSpec(rank=2), round=1) is None
    st.aggregate(updates, round=1)
    msg = decode_global(encode_global(st.configure(client_id="c0", spec=RankSpec(rank=2), round=2)))
    assert msg.merge_into_base
    for module in MODULES:
        dw = flexlora_delta(_clients(updates, module))
        b, a = stack_factors(_clients(updates, module))
        assert b.shape[1] == sum(u.module_rank(module) for u in updates)
        np.testing.assert_allclose(b @ a, dw, **F32)
        np.testing.assert_allclose(_product(msg, module), dw, rtol=1e-4, atol=1e-5)  # float32 stack
        np.testing.assert_allclose(st.global_delta()[module], dw, rtol=1e-4, atol=1e-5)
    st.aggregate(updates[:1], round=2)
    module = next(iter(MODULES))
    total = flexlora_delta(_clients(updates, module)) + flexlora_delta(_clients(updates[:1], module))
    np.testing.assert_allclose(st.global_delta()[module], total, rtol=1e-4, atol=1e-5)


def test_fedit_is_homogeneous_fedavg():
    ups = [make_update(f"c{i}", 4, seed=i, num_examples=3 + i) for i in range(3)]
    st = FedIT(StrategyConfig(alpha=16.0), rank=4)
    assert st.assign_rank(RankSpec(rank=16, rank_pattern={"up_proj": 32})) == RankSpec(rank=4)
    st.aggregate(ups, round=1)
    for module in MODULES:
        bg, ag = fedavg_factors(_clients(ups, module))
        np.testing.assert_allclose(st.global_delta()[module], bg @ ag, **F32)
    with pytest.raises(ValueError, match="FedIT runs every client at 4"):
        st.aggregate([make_update("odd", 2, seed=9)], round=2)


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora", "fedit"])
def test_min_clients_fails_round_without_touching_state(name, updates):
    opts = {"rank": 2} if name == "fedit" else {}
    st = make_strategy(name, StrategyConfig(min_clients=2), **opts)
    first = updates[:1] if name != "fedit" else [make_update("c0", 2, seed=0)]
    second = [make_update("cX", 2, seed=7)]
    st.aggregate(first + [make_update("cY", 2, seed=8)], round=1)
    before = {k: v.copy() for k, v in st.global_delta().items()}
    with pytest.raises(RoundFailed, match="min_clients=2"):
        st.aggregate(second, round=2)
    after = st.global_delta()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert st.rounds_completed == 1


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora", "fedit"])
def test_state_round_trip(name, updates):
    opts = {"rank": 2} if name == "fedit" else {}
    ups = updates if name != "fedit" else [make_update(f"c{i}", 2, seed=i) for i in range(2)]
    st = make_strategy(name, StrategyConfig(), **opts)
    st.aggregate(ups, round=1)
    fresh = make_strategy(name, StrategyConfig(), **opts)
    fresh.load_state(st.state_tensors(), st.state_meta())
    assert fresh.rounds_completed == 1
    for k, v in st.global_delta().items():
        np.testing.assert_allclose(fresh.global_delta()[k], v, **F32)
    spec = fresh.assign_rank(RankSpec(rank=2))
    m1 = st.configure(client_id="c0", spec=spec, round=2)
    m2 = fresh.configure(client_id="c0", spec=spec, round=2)
    for k in m1.factors:
        np.testing.assert_allclose(m1.factors[k], m2.factors[k], **F32)
    with pytest.raises(ValueError, match="checkpoint is for strategy"):
        make_strategy("hetlora" if name != "hetlora" else "flora").load_state({}, st.state_meta())


def test_decode_reply_rejects_rank_above_assignment_and_wrong_base():
    st = HetLoRA(StrategyConfig(base_model=FINGERPRINT))
    good = make_update("c0", 4, seed=0)
    assert st.decode_reply(encode_update(good), spec=RankSpec(rank=4)).client_id == "c0"
    with pytest.raises(ValueError, match="above the assigned 2"):
        st.decode_reply(encode_update(good), spec=RankSpec(rank=2))
    with pytest.raises(ValueError, match="above the assigned 2"):
        st.decode_reply(encode_update(make_update("c1", 2, seed=1, rank_pattern={"up_proj": 4})),
                        spec=RankSpec(rank=2, rank_pattern={"q_proj": 4}))
    other = make_update("c2", 2, seed=2)
    other.base_model = "0" * 32
    with pytest.raises(ValueError, match="base_model"):
        st.decode_reply(encode_update(other), spec=RankSpec(rank=4))


def test_duplicate_reply_in_a_round_is_refused(updates):
    agg = HetLoRA().begin_round(1)
    agg.add(updates[0])
    with pytest.raises(ValueError, match="already replied"):
        agg.add(updates[0])


def test_unknown_strategy_and_bad_config():
    with pytest.raises(ValueError, match="strategy='nope'"):
        make_strategy("nope")
    with pytest.raises(ValueError, match="min_clients"):
        StrategyConfig(min_clients=0)
    with pytest.raises(ValueError, match="rank"):
        RankSpec(rank=0)


def test_decode_reply_checks_shapes_against_the_base_model():
    st = HetLoRA(StrategyConfig(module_shapes=MODULES))
    good = make_update("c0", 2, seed=0)
    st.decode_reply(encode_update(good), spec=RankSpec(rank=2))
    narrow = make_update("c1", 2, seed=1, modules={m: (o, i - 1) for m, (o, i) in MODULES.items()})
    with pytest.raises(ValueError, match=r"the base weight is (12|20)x12"):
        st.decode_reply(encode_update(narrow), spec=RankSpec(rank=2))
    alien = make_update("c2", 2, seed=2, modules={"base_model.model.x.q_proj": (12, 12)})
    with pytest.raises(ValueError, match="not a LoRA target"):
        st.decode_reply(encode_update(alien), spec=RankSpec(rank=2))


def test_flora_stack_resent_after_an_uncommitted_round_is_merged_once(updates):
    """A FLoRA stack names the round that produced it; after a round that fails (not committed)
    the same stack goes out again and a client that merged it must not merge it twice."""
    from server.federation.strategies.flora import merge_once

    st = make_strategy("flora", StrategyConfig(min_clients=2))
    st.aggregate(updates[:2], round=1)
    spec = RankSpec(rank=2)
    first = st.configure(client_id="c0", spec=spec, round=2)
    assert first.round == 1 and merge_once(first, 0)
    with pytest.raises(RoundFailed):
        st.aggregate(updates[:1], round=2)
    again = st.configure(client_id="c0", spec=spec, round=3)
    assert again.round == 1 and not merge_once(again, 1)
    st.aggregate(updates[:2], round=3)
    assert merge_once(st.configure(client_id="c0", spec=spec, round=4), 1)
