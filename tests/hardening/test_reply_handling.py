"""The server's reply handling under hostile replies, for every strategy: rejections are
ValueErrors with a reason, and a round that also received garbage ends in exactly the state of
the same round without it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import fuzzlib  # noqa: E402

from edge_client.wire import ClientUpdate, encode_update  # noqa: E402
from server.federation.strategies import STRATEGIES, RankSpec, StrategyConfig, make_strategy  # noqa: E402

SHAPES = {"base_model.model.model.layers.0.self_attn.q_proj": (12, 12),
          "base_model.model.model.layers.0.mlp.up_proj": (20, 12)}
BASE = "e" * 32
SPEC = RankSpec(rank=4)


def honest(cid: str, seed: int, rank: int = 4, shapes=SHAPES, alpha: float = 16.0) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    f = {}
    for module, (d_out, d_in) in shapes.items():
        f[module + ".lora_A.weight"] = (0.1 * rng.standard_normal((rank, d_in))).astype(np.float32)
        f[module + ".lora_B.weight"] = (0.1 * rng.standard_normal((d_out, rank))).astype(np.float32)
    return ClientUpdate(client_id=cid, factors=f, num_examples=5 + seed, rank=rank, alpha=alpha, base_model=BASE,
                        target_modules=sorted({m.rsplit(".", 1)[-1] for m in shapes}), round=1)


def strategy(name: str, **config):
    opts = {"rank": 4} if name == "fedit" else {}
    return make_strategy(name, StrategyConfig(base_model=BASE, **config), **opts)


def run_round(st_, replies: list[bytes]) -> tuple[dict[str, np.ndarray], list[str]]:
    agg, reasons = st_.begin_round(1), []
    for data in replies:
        try:
            agg.add(st_.decode_reply(data, spec=SPEC))
        except ValueError as exc:
            assert str(exc)
            reasons.append(str(exc))
    agg.finalize()
    return st_.global_delta(), reasons


HONEST = [encode_update(honest(f"c{i}", i)) for i in range(3)]


def _garbage(kind: str, data: bytes) -> bytes:
    if kind == "truncated":
        return data[: len(data) // 3]
    if kind == "norm_bomb":
        u = honest("g", 9)
        return fuzzlib.update_bytes({k: v * np.float32(1e15) for k, v in u.factors.items()}, client_id="g",
                                    base_model=BASE, target_modules=u.target_modules, rank=4)
    if kind == "wrong_base":
        u = honest("g", 9)
        return fuzzlib.update_bytes(u.factors, client_id="g", base_model="0" * 32, target_modules=u.target_modules)
    if kind == "rank_above":
        return encode_update(honest("g", 9, rank=8))
    if kind == "duplicate":
        return data
    raise AssertionError(kind)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("kind", ["truncated", "norm_bomb", "wrong_base", "rank_above", "duplicate"])
def test_garbage_replies_are_rejected_and_leave_the_round_unchanged(name, kind):
    clean, reasons = run_round(strategy(name), HONEST)
    assert reasons == []
    mixed, reasons = run_round(strategy(name), [HONEST[0], _garbage(kind, HONEST[0]), HONEST[1], HONEST[2]])
    assert len(reasons) == 1
    assert clean.keys() == mixed.keys()
    for module in clean:
        np.testing.assert_array_equal(mixed[module], clean[module])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_wrong_shape_reply_arriving_first_cannot_lock_out_honest_clients(name):
    """With the base model's module shapes configured, the first reply does not define the shapes."""
    bad_shapes = {m: (d_out, d_in - 1) for m, (d_out, d_in) in SHAPES.items()}
    first = encode_update(honest("g", 9, shapes=bad_shapes))
    clean, _ = run_round(strategy(name, module_shapes=SHAPES), HONEST)
    mixed, reasons = run_round(strategy(name, module_shapes=SHAPES), [first, *HONEST])
    assert len(reasons) == 1 and "g" in reasons[0]
    for module in clean:
        np.testing.assert_array_equal(mixed[module], clean[module])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_module_the_base_model_lacks_is_rejected(name):
    extra = dict(SHAPES) | {"base_model.model.model.layers.7.self_attn.q_proj": (12, 12)}
    with pytest.raises(ValueError, match="layers.7"):
        strategy(name, module_shapes=SHAPES).decode_reply(encode_update(honest("g", 3, shapes=extra)), spec=SPEC)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(STRATEGIES)),
       st.lists(st.tuples(st.integers(0, len(HONEST[1]) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_replies_only_ever_raise_value_error(name, edits):
    data = bytearray(HONEST[1])
    for pos, byte in edits:
        data[pos] = byte
    st_ = strategy(name)
    agg = st_.begin_round(1)
    agg.add(st_.decode_reply(HONEST[0], spec=SPEC))
    try:
        agg.add(st_.decode_reply(bytes(data), spec=SPEC))
    except ValueError as exc:
        assert str(exc)
    agg.finalize()
    for module, delta in st_.global_delta().items():
        assert np.isfinite(delta).all(), module
