"""Issue 21, classes 5 and 6.

Class 5: the defences measure what each strategy aggregates. raFLoRA weighs slot i of client k
by ``p_k / w_i`` (a lone high-rank client: weight 1 in its top slots, whatever its ``p_k`` and
the weight-share cap), so a reply whose columns cancel in ``B A`` but not per slot passed every
defence; carry adds the tail of the global the client was not sent and moves the global by the
client's change only, so bounding the reply bounded the wrong thing. Class 6: an attacker that
sends the truncation it was sent minus twice its own change stays inside the honest spread of
norms and distances; direction trimming (median cosine with the others' changes) drops it."""
from __future__ import annotations

import numpy as np
import pytest
from test_reply_handling import BASE, SHAPES, honest  # noqa: E402  (tests/hardening on sys.path)

from edge_client.wire import ClientUpdate, decode_global, decode_update, encode_global
from server.federation.strategies import RankSpec, RobustConfig, StrategyConfig, make_strategy
from server.federation.strategies.robust import direction_scores, slot_shares, trim_by_direction
from server.runtimes.faults import ADVERSARIAL, faulty_reply

TARGETS = sorted({m.rsplit(".", 1)[-1] for m in SHAPES})


def _strategy(name: str, carry: bool = False, **robust):
    opts = {"carry": True} if carry else {}
    return make_strategy(name, StrategyConfig(base_model=BASE, module_shapes=SHAPES,
                                              robust=RobustConfig(**robust) if robust else None), **opts)


def _delta_norm(strat) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(d, np.float64) ** 2) for d in strat.global_delta().values())))


def _dist(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(a[m], np.float64) - np.asarray(b[m], np.float64)) ** 2) for m in a)))


# ------------------------------------------------------------------ class 5: raFLoRA, per slot

def _ra_round(attack: bool, **robust) -> tuple[object, object]:
    """Four rank-2 clients and a lone rank-8 client (``attack``: its reply re-factored by the
    ``slot_cancel`` fault, the same ``B A``)."""
    ups = [honest(f"p{i}", i, rank=2) for i in range(4)]
    lone = honest("l0", 7, rank=8)
    if attack:
        lone = decode_update(faulty_reply(lone, "slot_cancel"))
    strat = _strategy("raflora", **robust)
    agg = strat.begin_round(1)
    for u in [*ups, lone]:
        agg.add(u)
    agg.finalize()
    return strat, agg


def test_slot_cancel_reply_has_the_same_product():
    u = honest("l0", 7, rank=8)
    v = decode_update(faulty_reply(u, "slot_cancel"))
    for m in u.modules():
        np.testing.assert_allclose(v.module_delta(m), u.module_delta(m), atol=1e-4)
        assert np.linalg.norm(v.pair(m)[0]) > 5 * np.linalg.norm(u.pair(m)[0])   # but not per slot


def test_slot_shares_hold_the_cap_in_every_slot():
    sh = slot_shares([2, 2, 2, 2, 8], [10, 10, 10, 10, 10])
    np.testing.assert_allclose(sh[4], [0.2, 0.2, 1, 1, 1, 1, 1, 1])     # plain raFLoRA: weight 1 up top
    capped = slot_shares([2, 2, 2, 2, 8], [10, 10, 10, 10, 10], 0.25)
    np.testing.assert_allclose(capped[4], [0.2, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25])
    assert max(float(s.max()) for s in capped) <= 0.25
    # a slot with enough contributors still sums to 1 (water-filling)
    w = slot_shares([4, 4, 4, 4, 4], [100, 1, 1, 1, 1], 0.25)
    np.testing.assert_allclose(sum(s[0] for s in w), 1.0)
    assert w[0][0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="weights"):
        slot_shares([2, 2], [1, 0])


def test_raflora_defences_bound_a_reply_that_cancels_only_in_BA():
    clean, _ = _ra_round(False)
    undefended, _ = _ra_round(True)
    # the fault leaves B A as it was, but raFLoRA gives the lone rank-8 client weight 1 in
    # slots 3-8 and 0.2 in slots 1-2: the re-factored term survives, ~16x its honest norm
    assert _dist(undefended.global_delta(), clean.global_delta()) > 5 * _delta_norm(clean)
    # clipping measures what raFLoRA forms (before: s B A, the honest norm, never clipped)
    clipped, agg = _ra_round(True, clip_adaptive=2.0)
    assert agg.robust_report["clipped"] == ["l0"]
    # the bound is 2x the law on the client's own scale times its slot multipliers (weight 1 in
    # slots 3-8 is what raFLoRA gives an honest lone rank-8 client, which is not clipped): the
    # attacker is left at most ~2x an honest contribution there (undefended: ~12x the global)
    assert _dist(clipped.global_delta(), clean.global_delta()) < 2.0 * _delta_norm(clean)
    assert _ra_round(False, clip_adaptive=2.0)[1].robust_report["clipped"] == []
    # the cap holds in every slot (before: the lone client kept weight 1 up top, never "capped")
    capped, agg = _ra_round(True, max_weight_share=0.25)
    assert agg.robust_report["capped"] == ["l0"]
    assert _dist(capped.global_delta(), clean.global_delta()) < 1.5 * _delta_norm(clean)
    both, agg = _ra_round(True, clip_adaptive=2.0, max_weight_share=0.25)
    clean_both, _ = _ra_round(False, clip_adaptive=2.0, max_weight_share=0.25)
    assert _dist(both.global_delta(), clean_both.global_delta()) < 1.0 * _delta_norm(clean_both)


def test_raflora_with_the_cap_forms_the_capped_slot_weights():
    strat, agg = _ra_round(False, max_weight_share=0.25)
    ups = [honest(f"p{i}", i, rank=2) for i in range(4)] + [honest("l0", 7, rank=8)]
    shares = slot_shares([2, 2, 2, 2, 8], [u.num_examples for u in ups], 0.25)
    for m in SHAPES:
        want = sum(u.module_scaling(m) * (u.pair(m)[0].astype(np.float64) * sh) @ u.pair(m)[1].astype(np.float64)
                   for u, sh in zip(ups, shares))
        np.testing.assert_allclose(strat.global_delta()[m], want, atol=1e-5)
    assert agg.robust_report["capped"] == ["l0"]


# ------------------------------------------------------------------ class 5: carry, the change

def _carry_round2(evil_scale: float, name: str = "flexlora", carry: bool = True, **robust):
    strat = _strategy(name, carry=carry, **robust)
    strat.aggregate([honest(f"x{i}", i, rank=8) for i in range(3)], round=1)
    g1 = {m: np.asarray(d, np.float64) for m, d in strat.global_delta().items()}
    rng = np.random.default_rng(5)
    ups, sent = [], {}
    for i, (cid, r) in enumerate([("a0", 2), ("a1", 2), ("a2", 2), ("a3", 2), ("b0", 8)]):
        msg = strat.configure(client_id=cid, spec=RankSpec(rank=r), round=2)
        sent[cid] = msg
        k = evil_scale if cid == "a0" else 1.0
        f = {key: (v + k * 0.01 * rng.standard_normal(v.shape) * (np.abs(v).mean() + 1e-3)).astype(np.float32)
             for key, v in msg.factors.items()}
        ups.append(ClientUpdate(client_id=cid, factors=f, num_examples=10, rank=r, alpha=16.0, base_model=BASE,
                                target_modules=TARGETS, round=2))
    agg = strat.begin_round(2)
    for u in ups:
        agg.add(u)
    agg.finalize()
    return strat, agg, g1, ups, sent


def test_carry_clipping_bounds_the_change_the_global_gets():
    # a0 changed 20x more than the others: its reply is still mostly what it was sent, so its
    # norm is within 2x the median of the replies (old statistic: never clipped), but carry
    # moves the global by the change alone
    strat, agg, g1, ups, sent = _carry_round2(20.0, clip_adaptive=2.0)
    assert "a0" in agg.robust_report["clipped"]
    # the global is G_1 + sum_k p_k c_k Delta_k with a0's change clipped to 2x its class's median;
    # the lone rank-8 client b0 is bounded by the rank-scale law anchored on the rank-2 class
    # (slope LAW_SLOPE = -0.5: 2x the median / 2)
    changes = {u.client_id: {m: u.module_delta(m).astype(np.float64) - sent[u.client_id].module_delta(m).astype(np.float64)
                             for m in u.modules()} for u in ups}
    norms = {c: float(np.sqrt(sum(np.sum(x ** 2) for x in d.values()))) for c, d in changes.items()}
    median_a = float(np.median([norms[c] for c in ("a0", "a1", "a2", "a3")]))
    bound = {c: 2.0 * median_a * ((8 / 2) ** -0.5 if c == "b0" else 1.0) for c in norms}
    mult = {c: min(1.0, bound[c] / n) for c, n in norms.items()}
    assert mult["a0"] < 0.2
    assert sorted(agg.robust_report["clipped"]) == sorted(c for c, x in mult.items() if x < 1)
    for m in SHAPES:
        want = g1[m] + sum(0.2 * mult[c] * changes[c][m] for c in changes)
        np.testing.assert_allclose(strat.global_delta()[m], want, atol=2e-4)


def _clip_oracle(ups, sent, slot_mult=None):
    """Per client: its change (dense, per unit of weight; ``slot_mult``: raFLoRA's per-slot
    multipliers) and the multiplier adaptive clipping 2.0 gives it (a0-a3 one rank-2 class, the
    lone rank-8 b0 on the law anchored on it, slope -0.5, times the rms of its slot multipliers,
    each weighted by its module's d_out + d_in)."""
    def view_scale(u):
        if slot_mult is None:
            return 1.0
        sizes = {m: sum(SHAPES[m]) for m in u.modules()}
        num = sum(sizes[m] * np.sum(slot_mult[u.client_id][m][:u.pair(m)[0].shape[1]] ** 2) for m in u.modules())
        return float(np.sqrt(num / sum(sizes[m] * u.pair(m)[0].shape[1] for m in u.modules())))

    def dense(u, scale, b, a, m):
        w = np.ones(b.shape[1]) if slot_mult is None else slot_mult[u.client_id][m]
        return scale * (b.astype(np.float64) * w) @ a.astype(np.float64)
    changes = {u.client_id: {m: dense(u, u.module_scaling(m), *u.pair(m), m)
                             - dense(u, sent[u.client_id].module_scaling(m), *sent[u.client_id].pair(m), m)
                             for m in u.modules()} for u in ups}
    norms = {c: float(np.sqrt(sum(np.sum(x ** 2) for x in d.values()))) for c, d in changes.items()}
    median_a = float(np.median([norms[c] for c in ("a0", "a1", "a2", "a3")]))
    scale = {u.client_id: view_scale(u) for u in ups}
    assert all(scale[c] == pytest.approx(1.0) for c in ("a0", "a1", "a2", "a3"))   # slots 1-2: everyone's
    bound = {c: 2.0 * median_a * ((8 / 2) ** -0.5 * scale[c] if c == "b0" else 1.0) for c in norms}
    return changes, {c: min(1.0, bound[c] / n) for c, n in norms.items()}


def test_plain_flexlora_clipping_bounds_the_change_not_the_reply():
    # the reply is mostly what the client was sent (its norm falls only as ~rank^-0.17), so a
    # bound on replies cannot follow the alpha / r law; every FlexLoRA variant bounds the change:
    # X_k' = T_{r_k}(G_t) + c_k Delta_k, and the global is sum_k p_k X_k'
    strat, agg, _g1, ups, sent = _carry_round2(20.0, carry=False, clip_adaptive=2.0)
    changes, mult = _clip_oracle(ups, sent)
    assert mult["a0"] < 0.2
    assert sorted(agg.robust_report["clipped"]) == sorted(c for c, x in mult.items() if x < 1)
    for m in SHAPES:
        want = sum(0.2 * (sent[u.client_id].module_delta(m).astype(np.float64) + mult[u.client_id] * changes[u.client_id][m])
                   for u in ups)
        np.testing.assert_allclose(strat.global_delta()[m], want, atol=2e-4)


def test_raflora_clipping_bounds_the_change_slot_by_slot():
    # raFLoRA's slot-weighted reply grows with rank (slope +0.5..0.65 in honest rounds); it too
    # bounds the change, each slot i as c b_i a_i^T + (1 - c) (slot i of what it was sent),
    # weighed by p_k / w_i as the slot
    strat, agg, _g1, ups, sent = _carry_round2(20.0, name="raflora", carry=False, clip_adaptive=2.0)
    ranks = [u.rank for u in ups]
    shares = slot_shares(ranks, [float(u.num_examples) for u in ups])
    per_unit = {u.client_id: {m: sh / sh[0] for m in SHAPES} for u, sh in zip(ups, shares)}
    changes, mult = _clip_oracle(ups, sent, per_unit)
    assert mult["a0"] < 0.2
    assert sorted(agg.robust_report["clipped"]) == sorted(c for c, x in mult.items() if x < 1)
    for m in SHAPES:
        want = 0
        for u, sh in zip(ups, shares):
            c, msg = mult[u.client_id], sent[u.client_id]
            b, a = (x.astype(np.float64) for x in u.pair(m))
            b0, a0 = (x.astype(np.float64) for x in msg.pair(m))
            want = want + c * u.module_scaling(m) * (b * sh) @ a + (1 - c) * msg.module_scaling(m) * (b0 * sh) @ a0
        np.testing.assert_allclose(strat.global_delta()[m], want, atol=2e-4)


def test_carry_without_clipping_is_unchanged_by_robust_buffering():
    plain, _, g1, ups, sent = _carry_round2(20.0)
    buffered, agg, *_ = _carry_round2(20.0, clip_norm=1e9)
    assert agg.robust_report["clipped"] == []
    for m, d in plain.global_delta().items():
        np.testing.assert_allclose(buffered.global_delta()[m], d, atol=1e-5)


# ------------------------------------------------------------------ class 6: inside the honest spread

def test_within_spread_fault_sends_the_truncation_minus_twice_the_change():
    assert {"within_spread", "slot_cancel"} <= set(ADVERSARIAL)
    strat = _strategy("flexlora")
    strat.aggregate([honest(f"x{i}", i, rank=8) for i in range(3)], round=1)
    msg = strat.configure(client_id="c", spec=RankSpec(rank=8), round=2)
    sent = decode_global(encode_global(msg))
    rng = np.random.default_rng(0)
    f = {k: (v + 0.002 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in msg.factors.items()}
    u = ClientUpdate(client_id="c", factors=f, num_examples=10, rank=8, alpha=16.0, base_model=BASE,
                     target_modules=TARGETS, round=2)
    v = decode_update(faulty_reply(u, "within_spread", sent))
    for m in u.modules():
        t, x = sent.module_delta(m).astype(np.float64), u.module_delta(m).astype(np.float64)
        want = t - 2 * (x - t)
        # truncated back to rank 8: the best rank-8 approximation of 3T - 2X
        sv = np.linalg.svd(want, compute_uv=False)
        err = float(np.linalg.norm(v.module_delta(m) - want))
        assert err <= float(np.sqrt(np.sum(sv[8:] ** 2))) + 1e-4
        assert abs(np.linalg.norm(v.module_delta(m)) - np.linalg.norm(x)) < 0.2 * np.linalg.norm(x)   # near honest


def test_direction_scores_single_out_the_reversed_change():
    rng = np.random.default_rng(1)
    common = rng.standard_normal(50)
    changes = [common + 0.8 * rng.standard_normal(50) for _ in range(7)]
    changes.append(-2 * (common + 0.8 * rng.standard_normal(50)))       # -2 x an honest change
    x = np.stack(changes)
    g = x @ x.T
    s = direction_scores(g)
    assert int(np.argmin(s)) == 7 and s[7] < 0 < min(s[:7])
    assert trim_by_direction(g, 0.15) == list(range(7))
    # only among those still kept; never all
    assert len(trim_by_direction(g, 0.15, among=[0, 1, 2])) == 2
    assert trim_by_direction(g[:1, :1], 0.4) == [0]


SIZES = [1.0, 1.5, 2.0, 1.2, 1.8, 0.8, 2.5, 0.6]


def _spread_round(**robust):
    """Round 2 of 8 rank-4 clients whose changes share a direction and differ in size; c7, whose
    own change is small, sends T - 2 Delta (a change of median size, pointing the other way)."""
    strat = _strategy("flexlora", **robust)
    strat.aggregate([honest(f"x{i}", i, rank=4) for i in range(3)], round=1)
    rng = np.random.default_rng(3)
    common = {m: 0.05 * rng.standard_normal((d_out, d_in)) for m, (d_out, d_in) in SHAPES.items()}
    ups = []
    for i in range(8):
        cid = f"c{i}"
        msg = strat.configure(client_id=cid, spec=RankSpec(rank=4), round=2)
        f = {}
        for m in SHAPES:
            t = msg.module_delta(m).astype(np.float64)
            x = t + SIZES[i] * (common[m] + 0.08 * rng.standard_normal(t.shape))
            u_, s_, vt = np.linalg.svd(x, full_matrices=False)
            sc = msg.module_scaling(m)
            f[m + ".lora_A.weight"] = vt[:4].astype(np.float32)
            f[m + ".lora_B.weight"] = (u_[:, :4] * (s_[:4] / sc)).astype(np.float32)
        u = ClientUpdate(client_id=cid, factors=f, num_examples=10, rank=4, alpha=16.0, base_model=BASE,
                         target_modules=TARGETS, round=2)
        if cid == "c7":
            u = decode_update(faulty_reply(u, "within_spread", decode_global(encode_global(msg))))
        ups.append(u)
    agg = strat.begin_round(2)
    for u in ups:
        agg.add(u)
    agg.finalize()
    return agg


def test_direction_trimming_drops_the_attacker_inside_the_spread():
    # what the distance and norm statistics see: c7 is inside the honest spread
    assert _spread_round(trim_fraction=0.125).robust_report["trimmed"] == ["c6"]   # the largest honest change
    assert _spread_round(clip_adaptive=2.0).robust_report["clipped"] == []
    agg = _spread_round(trim_fraction=0.125, direction_trim=0.125, clip_adaptive=2.0)
    assert "c7" in agg.robust_report["trimmed"]
    assert "c7" not in agg.robust_report.get("clipped", [])
    only = _spread_round(direction_trim=0.125)
    assert only.robust_report["trimmed"] == ["c7"]


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.6, float("nan"), True])
def test_direction_trim_is_validated(bad):
    with pytest.raises(ValueError, match="direction_trim"):
        RobustConfig(direction_trim=bad)
    with pytest.raises(ValueError, match="trim_fraction \\+ direction_trim"):
        RobustConfig(trim_fraction=0.3, direction_trim=0.2)
