import json
import subprocess
import sys

import pytest

from edge_client.memory import estimate
from edge_client.rank_policy import NoRankFitsError, RankCandidate, choose_rank, paper_candidates
from edge_client.resources import DeviceProfile, probe, read_cgroup_limits
from edge_client.testing import tiny_llama_config


def test_probe_fields_json():
    p = probe(accelerator=False)
    assert 0 < p.available_memory_bytes <= p.total_memory_bytes
    assert 1 <= p.cpus <= p.logical_cpus
    assert p.cpu_freq_mhz is None or p.cpu_freq_mhz > 0
    d = json.loads(p.to_json())
    assert d["memory_budget_bytes"] == p.memory_budget_bytes
    assert DeviceProfile.from_dict(d) == p


def test_import_resources_and_wire_without_torch_flower_or_server():
    code_light = ("import sys, edge_client.resources, edge_client.wire;"
                  "print('torch' in sys.modules, 'flwr' in sys.modules,"
                  " any(m == 'server' or m.startswith('server.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code_light], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_edge_client_never_imports_server():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "edge_client"
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import server" not in text and "from server" not in text, f


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2(tmp_path):
    _write(tmp_path / "proc", "0::/user.slice\n")
    _write(tmp_path / "cg/user.slice/memory.max", "1073741824\n")
    _write(tmp_path / "cg/user.slice/memory.current", "104857600\n")
    _write(tmp_path / "cg/user.slice/cpu.max", "150000 100000\n")
    lim = read_cgroup_limits(tmp_path / "cg", tmp_path / "proc")
    assert (lim.version, lim.memory_limit_bytes, lim.memory_usage_bytes, lim.cpu_quota) == (2, 2**30, 100 * 2**20, 1.5)
    _write(tmp_path / "cg/user.slice/memory.max", "max\n")
    assert read_cgroup_limits(tmp_path / "cg", tmp_path / "proc").memory_limit_bytes is None
    p = probe(accelerator=False, cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc")
    assert p.cgroup_version == 2 and p.cpus <= 2


def test_cgroup_v1(tmp_path):
    _write(tmp_path / "proc", "4:memory:/docker/abc\n1:cpu,cpuacct:/\n")
    _write(tmp_path / "cg/memory/docker/abc/memory.limit_in_bytes", "536870912\n")
    _write(tmp_path / "cg/memory/docker/abc/memory.usage_in_bytes", "1000\n")
    _write(tmp_path / "cg/cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cg/cpu/cpu.cfs_period_us", "100000\n")
    lim = read_cgroup_limits(tmp_path / "cg", tmp_path / "proc")
    assert (lim.version, lim.memory_limit_bytes, lim.memory_usage_bytes, lim.cpu_quota) == (1, 2**29, 1000, None)
    p = probe(accelerator=False, cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc")
    assert p.total_memory_bytes == 2**29 and p.memory_budget_bytes <= 2**29 - 1000
    _write(tmp_path / "cg/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")
    assert read_cgroup_limits(tmp_path / "cg", tmp_path / "proc").memory_limit_bytes is None
    assert read_cgroup_limits(tmp_path / "none", tmp_path / "missing").version is None


def test_simulated_profile_validation():
    p = DeviceProfile.simulated(memory_bytes=2**30, cpus=2)
    assert p.memory_budget_bytes == 2**30 and p.is_simulated
    with pytest.raises(ValueError, match="available_memory_bytes"):
        DeviceProfile(total_memory_bytes=1, available_memory_bytes=2)


CFG = tiny_llama_config(vocab_size=512, hidden=128, layers=2, heads=4)


def test_estimate_breakdown_grows_with_rank_and_seq():
    a = estimate(CFG, ["q_proj", "v_proj"], 4, batch=2, seq_len=64)
    b = estimate(CFG, ["q_proj", "v_proj"], 32, batch=2, seq_len=64)
    c = estimate(CFG, ["q_proj", "v_proj"], 4, batch=2, seq_len=256)
    n_base = sum(v for v in (CFG.vocab_size * 128 * 2,))  # embeddings + lm_head
    assert a.base_weights > n_base * 4
    assert a.lora_parameter_count == 2 * 2 * 4 * (128 + 128)
    assert b.lora_parameters == 8 * a.lora_parameters and b.optimizer_states == 2 * b.lora_parameters
    assert c.activations > 3 * a.activations and c.logits == pytest.approx(4 * a.logits, rel=0.01)
    assert a.total == sum(v for k, v in a.to_dict().items() if k in (
        "base_weights", "lora_parameters", "gradients", "optimizer_states", "activations", "logits",
        "runtime_overhead")) - a.heap_reuse
    gc = estimate(CFG, ["q_proj", "v_proj"], 4, batch=2, seq_len=256, gradient_checkpointing=True)
    assert gc.activations < c.activations
    with pytest.raises(ValueError, match="optimizer"):
        estimate(CFG, ["q_proj"], 4, batch=1, seq_len=8, optimizer="lion")


def test_gradients_and_optimizer_states_fill_the_heap_the_activations_left():
    """peak = fixed + max(retention x saved, saved + gradients + optimizer states) (issue 20)."""
    from edge_client.memory import ACTIVATION_RETENTION as R
    for rank, seq in ((4, 256), (512, 16), (64, 64)):
        e = estimate(CFG, ["q_proj", "v_proj", "gate_proj"], rank, batch=2, seq_len=seq)
        saved = e.activations / R
        fixed = e.base_weights + e.lora_parameters + e.logits + e.runtime_overhead
        want = fixed + max(e.activations, saved + e.gradients + e.optimizer_states)
        assert e.total == pytest.approx(want, abs=2)
        assert 0 <= e.heap_reuse <= e.gradients + e.optimizer_states
    # large activations, small adapter: every optimizer byte reuses the heap; the reverse: none beyond it
    small = estimate(CFG, ["q_proj"], 1, batch=8, seq_len=256)
    assert small.heap_reuse == small.gradients + small.optimizer_states
    big = estimate(CFG, ["q_proj", "v_proj", "gate_proj"], 512, batch=1, seq_len=8)
    assert big.heap_reuse == pytest.approx(big.activations * (1 - 1 / R), abs=2)
    # the policy's monotonicity survives the max: more rank never needs less memory
    totals = [estimate(CFG, ["q_proj", "v_proj"], r, batch=2, seq_len=256).total for r in (1, 4, 16, 64, 256)]
    assert totals == sorted(totals)


def test_16bit_weights_use_their_own_activation_retention():
    from edge_client.memory import ACTIVATION_RETENTION, ACTIVATION_RETENTION_16BIT
    kw = dict(batch=2, seq_len=64, dtype="bfloat16")
    bf = estimate(CFG, ["q_proj", "v_proj"], 4, **kw)
    assert bf.activations == estimate(CFG, ["q_proj", "v_proj"], 4, activation_retention=ACTIVATION_RETENTION_16BIT,
                                      **kw).activations
    at_fp32_rule = estimate(CFG, ["q_proj", "v_proj"], 4, activation_retention=ACTIVATION_RETENTION, **kw)
    assert bf.activations < at_fp32_rule.activations and bf.base_weights < estimate(
        CFG, ["q_proj", "v_proj"], 4, batch=2, seq_len=64).base_weights


def test_policy_monotone_and_error():
    ranks = [4, 8, 16, 64, 256]
    kw = dict(targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], batch=2, seq_len=64,
              system_reserve_bytes=0)
    need = {r: estimate(CFG, kw["targets"], r, batch=2, seq_len=64).total for r in ranks}
    chosen = []
    lo, hi = int(need[4] * 1.1), int(need[256] * 1.3)
    for budget in range(lo, hi, (hi - lo) // 25):
        c = choose_rank(DeviceProfile.simulated(memory_bytes=budget), CFG, ranks, **kw)
        assert c.needed_bytes <= budget and c.reasons
        chosen.append(c.rank)
    assert chosen == sorted(chosen) and chosen[0] == 4 and chosen[-1] == 256
    with pytest.raises(NoRankFitsError, match="needs .* but only") as err:
        choose_rank(DeviceProfile.simulated(memory_bytes=need[4] // 2), CFG, ranks, **kw)
    assert err.value.needed_bytes > err.value.available_bytes


def test_policy_paper_patterns():
    cands = paper_candidates()
    assert [c.name for c in cands] == ["r8", "r30", "r30_200", "r200"]
    kw = dict(batch=1, seq_len=32, system_reserve_bytes=0, safety_margin=0.0)
    totals = {c.name: estimate(CFG, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               c.rank, c.pattern, batch=1, seq_len=32).total for c in cands}
    budget = (totals["r30_200"] + totals["r200"]) // 2
    c = choose_rank(DeviceProfile.simulated(memory_bytes=budget), CFG, candidates=cands, **kw)
    assert c.label == "r30_200" and c.rank == 30 and c.rank_pattern == {"gate_proj": 200, "up_proj": 200, "down_proj": 200}
    with pytest.raises(ValueError, match="allowed_ranks\\[1\\]"):
        choose_rank(DeviceProfile.simulated(memory_bytes=budget), CFG, [4, 0])
    with pytest.raises(ValueError, match="rank"):
        RankCandidate(rank=0)
