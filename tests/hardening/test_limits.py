"""Resource limits: each configurable bound is enforced just above its value and not at it,
defaults are safe, and bad limit settings are refused."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import fuzzlib  # noqa: E402

from edge_client.wire import DecodeLimits, decode_update  # noqa: E402
from server.core.aggregation import Aggregator  # noqa: E402
from server.federation.strategies import STRATEGIES, RankSpec, StrategyConfig, make_strategy  # noqa: E402

GOOD = fuzzlib.update_bytes()
MODULE = fuzzlib.MODULE


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def three_modules() -> bytes:
    f = {}
    for i in range(3):
        f |= fuzzlib.valid_factors(module=MODULE.replace("layers.0", f"layers.{i}"), seed=i)
    return fuzzlib.update_bytes(f)


# limit field -> (payload, value that just admits it, pattern of the rejection one below it)
CASES = {
    "max_bytes": (GOOD, len(GOOD), "payload of .* exceeds the limit"),
    "max_header_bytes": (GOOD, header_len(GOOD), "header of .* exceeds the limit"),
    "max_rank": (GOOD, 4, "rank"),
    "max_modules": (three_modules(), 3, "exceed the limit"),
    "max_dim": (GOOD, 8, "above the limit"),
    "max_num_examples": (GOOD, 10, "num_examples must be in"),
}


@pytest.mark.parametrize("field", sorted(CASES))
def test_each_limit_admits_its_value_and_rejects_one_more(field):
    data, value, pattern = CASES[field]
    decode_update(data, limits=DecodeLimits(**{field: value}))
    with pytest.raises(ValueError, match=pattern):
        decode_update(data, limits=DecodeLimits(**{field: value - 1}))


def test_max_delta_norm_admits_the_bound_and_rejects_below_it():
    f = fuzzlib.valid_factors()
    a, b = f[MODULE + ".lora_A.weight"], f[MODULE + ".lora_B.weight"]
    bound = 16.0 / 4 * float(np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)))
    decode_update(GOOD, limits=DecodeLimits(max_delta_norm=bound * (1 + 1e-6)))
    with pytest.raises(ValueError, match="max_delta_norm"):
        decode_update(GOOD, limits=DecodeLimits(max_delta_norm=bound * (1 - 1e-6)))


def test_defaults_are_bounded():
    d = DecodeLimits()
    assert d.max_bytes <= 2 * 1024**3 and d.max_header_bytes <= 16 * 1024**2
    assert d.max_num_examples <= 10**9 and d.max_delta_norm <= 1e8
    # a payload that claims a header larger than the default limit is refused from its first 8 bytes
    with pytest.raises(ValueError, match="header of"):
        decode_update(struct.pack("<Q", d.max_header_bytes + 1) + b"{}")


@pytest.mark.parametrize("field", ["max_bytes", "max_header_bytes", "max_rank", "max_modules", "max_dim",
                                   "max_num_examples", "max_delta_norm"])
@pytest.mark.parametrize("value", [0, -1, True, "10", None, float("nan"), float("inf")])
def test_bad_limit_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"DecodeLimits.{field}"):
        DecodeLimits(**{field: value})


def test_header_size_is_checked_before_the_header_is_read():
    # a header that claims 1 TiB but ships 2 bytes: rejected by the claim, nothing is allocated
    with pytest.raises(ValueError, match="exceeds the limit"):
        decode_update(struct.pack("<Q", 1 << 40) + b"{}")


def test_decode_update_max_rank_argument_caps_ranks():
    decode_update(GOOD, limits=fuzzlib.LIMITS, max_rank=4)
    with pytest.raises(ValueError, match="above the allowed maximum 3"):
        decode_update(GOOD, limits=fuzzlib.LIMITS, max_rank=3)
    with pytest.raises(ValueError, match="above the allowed maximum 2"):
        decode_update(GOOD, limits=fuzzlib.LIMITS, max_rank={"q_proj": 2})
    decode_update(GOOD, limits=fuzzlib.LIMITS, max_rank={"v_proj": 2})  # not named: not capped


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("assigned,sent,ok", [(4, 4, True), (8, 4, True), (3, 4, False)])
def test_a_rank_above_the_assignment_is_refused(name, assigned, sent, ok):
    st = make_strategy(name, StrategyConfig(), **({"rank": assigned} if name == "fedit" else {}))
    data = fuzzlib.update_bytes(fuzzlib.valid_factors(rank=sent), rank=sent)
    spec = st.assign_rank(RankSpec(rank=assigned))
    if ok and sent <= spec.rank:
        assert st.decode_reply(data, spec=spec).rank == sent
    else:
        with pytest.raises(ValueError, match="above the assigned"):
            st.decode_reply(data, spec=spec)


def test_a_rank_pattern_above_the_assignment_is_refused():
    st = make_strategy("flexlora", StrategyConfig())
    f = fuzzlib.valid_factors(rank=6)
    data = fuzzlib.update_bytes(f, rank=2, rank_pattern={"q_proj": 6})
    st.decode_reply(data, spec=RankSpec(rank=2, rank_pattern={"q_proj": 6}))
    with pytest.raises(ValueError, match="above the assigned 4"):
        st.decode_reply(data, spec=RankSpec(rank=2, rank_pattern={"q_proj": 4}))


@pytest.mark.parametrize("clients", [10, 80])
def test_flexlora_aggregator_memory_does_not_grow_with_clients(clients):
    """The streaming aggregator's state is bounded per module (factors below the dense threshold,
    then one dense accumulator), so a round's memory is independent of how many clients reply."""
    d_out, d_in, rank = 48, 32, 8
    agg = Aggregator(16, method="auto")
    rng = np.random.default_rng(0)
    peak = 0
    for k in range(clients):
        f = {"m.q_proj.lora_A.weight": rng.standard_normal((rank, d_in)).astype(np.float32),
             "m.q_proj.lora_B.weight": rng.standard_normal((d_out, rank)).astype(np.float32)}
        agg.add(f, num_examples=1 + k, alpha=16.0, client_id=f"c{k}")
        peak = max(peak, agg.state_bytes())
    threshold = d_out * d_in // (d_out + d_in)
    bound = 4 * max(d_out * d_in, (d_out + d_in) * (threshold + rank))
    assert peak <= bound, (peak, bound)
    assert np.isfinite(agg.finalize().delta("m.q_proj")).all()


def test_metadata_json_is_bounded_by_the_header_limit():
    meta = fuzzlib.update_meta(metrics={f"m{i}": 1.0 for i in range(5000)})
    data = fuzzlib.update_bytes(meta_json=json.dumps(meta))
    with pytest.raises(ValueError, match="header of .* exceeds"):
        decode_update(data, limits=DecodeLimits(max_header_bytes=4096))
    with pytest.raises(ValueError, match="at most 256"):
        decode_update(data)
