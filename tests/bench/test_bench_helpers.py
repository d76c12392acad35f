"""The generic pieces of server/bench that the benchmark scripts share: GEMM rates, round-robin
timing, VmHWM, floors and FLOP counts, err/opt, markdown tables, client types and module shapes."""

from __future__ import annotations

import numpy as np
import pytest

from server.bench import accuracy, machine, measure
from server.bench import flops as F
from server.bench.cases import client_types, lora_module_shapes, module_shapes, target_group, type_counts
from server.bench.report import fmt, markdown_table
from server.workloads.catalog import load_workloads


def test_round_robin_times_every_call_in_turn_after_the_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    timings, outs, peaks = measure.time_round_robin(fns, repeats=3, warmup=1, memory=True)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert outs == {"a": 1, "b": 2}
    assert all(len(t.samples) == 3 and t.best <= t.median for t in timings.values())
    assert all(p >= 0 for p in peaks.values())


def test_round_robin_sees_the_memory_a_call_adds():
    _, _, peaks = measure.time_round_robin({"big": lambda: np.ones(32 * 2**20 // 8).sum()}, repeats=1, warmup=0,
                                           memory=True)
    assert peaks["big"] >= 16 * 2**20


def test_vm_hwm_is_at_least_the_resident_set():
    assert measure.vm_hwm_mb() >= measure.proc_status_kib("VmRSS") / 1024 * 0.99


def test_gemm_rates_are_positive():
    assert machine.gemm_gflops(lambda: None, 64, repeats=2) > 0
    assert machine.core_sgemm_gflops(1, n=128, repeats=1) > 0
    assert machine.dgemm_gflops(1, n=128, repeats=1) > 0
    info = machine.short_info(1)
    assert set(info) == {"cpu", "cores", "threads", "python", "numpy", "torch", "ours_blas", "platform"}


def test_floor_charges_float64_at_the_dgemm_rate():
    assert F.floor_seconds(3e9, 1e9, sgemm_gflops=2.0, dgemm_gflops=1.0) == pytest.approx(2.0)
    assert F.floor_seconds(3e9, 0.0, 3.0, 1.0) == pytest.approx(1.0)


def test_svd_and_sketch_counts():
    assert F.svd_sigma_v(10, 4) == F.svd_sigma_v(4, 10) == 4 * 10 * 16 + 8 * 64
    m, n, R, rank, k, s = 30, 20, 7, 2, 5, 11
    update = 2 * R * ((m + n) * (k + s) + m * k + k * n + s * s)
    assert F.sketch_one_pass(m, n, R, rank, k, s) > update
    assert F.sketch_one_pass(m, n, 2 * R, rank, k, s) - F.sketch_one_pass(m, n, R, rank, k, s) == update


def test_optimum_residual_and_ratio():
    s = np.array([3.0, 2.0, 1.0, 0.5], np.float32)
    assert accuracy.optimum_residual(s, 2) == pytest.approx(np.sqrt(1.25))
    assert accuracy.optimum_residual(s, 4) == 0.0
    assert accuracy.ratio_to_optimum(2.0, 1.0) == 2.0
    assert accuracy.ratio_to_optimum(0.0, 0.0) == 0.0 and accuracy.ratio_to_optimum(1e-3, 0.0) == float("inf")


def test_markdown_table_and_fmt():
    assert markdown_table(["a", "b", "c"], [[1, "x", 2.5]], align="lr") == [
        "| a | b | c |", "| --- | ---: | --- |", "| 1 | x | 2.5 |"]
    assert fmt(None, ".2f") == "-" and fmt(1.234, ".1f") == "1.2"


def test_client_types_follow_the_shares_in_their_order():
    shares = {"a": 0.55, "b": 0.3, "c": 0.15}
    assert type_counts(shares, 10) == {"a": 6, "b": 3, "c": 1}   # remainders .5, 0, .5: the tie goes to a
    assert client_types(shares, 10) == ["a"] * 6 + ["b"] * 3 + ["c"]
    assert sum(type_counts(load_workloads()["rank_distributions"]["heavy_tail_light"], 80).values()) == 80


def test_module_shapes_of_a_model():
    wl = load_workloads()
    shapes = lora_module_shapes(wl["models"]["llama-1.3b"])
    assert shapes["down_proj"] == (2048, 5504) and shapes["up_proj"] == (5504, 2048) and len(shapes) == 7
    assert module_shapes(wl, "llama-1.3b") == {"q_proj": (2048, 2048, "attn"), "up_proj": (5504, 2048, "ffn"),
                                               "down_proj": (2048, 5504, "ffn")}
    assert target_group("v_proj") == "attn" and target_group("gate_proj") == "ffn"
