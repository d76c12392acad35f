"""One run config, one assembly: RunConfig validation, build_federation / build_workload as every
runtime uses them, FLoRA's merge-once state, the Flower task registry, the device option."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.wire import GlobalFactors
from server.runtimes.clients import MergedStacks, fresh_or_global
from server.runtimes.config import RunConfig, experiment_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kw, match", [
    ({"rounds": 0}, "rounds must be an int >= 1"),
    ({"strategy": "fedsgd"}, "strategy must be one of"),
    ({"split": "sqrt"}, "split must be one of 'reference', 'balanced'"),
    ({"rank_assignment": "allot"}, "rank_assignment 'allot' needs a rank_distribution"),
    ({"data_split": "random"}, "data_split must be one of"),
    ({"suite": "other"}, "suite must be one of"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"carry": True, "strategy": "hetlora"}, "carry is an option of strategy 'flexlora'"),
    ({"device": "gpu"}, "device must be cpu, cuda or cuda:N"),
    ({"device": "cuda", "strategy": "fedit"}, "only flexlora and raflora aggregate on a GPU"),
    ({"max_reply_bytes": 0}, "max_bytes must be a positive int"),
    ({"trim_fraction": 0.9}, "trim_fraction"),
    ({"rslora": "yes"}, "rslora must be a bool"),
    ({"rslora": 1}, "rslora must be a bool"),
])
def test_run_config_names_the_bad_field(kw, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**kw)


def test_device_cuda_without_a_cuda_build_or_gpu_is_one_clear_error():
    from server.core import cuda
    ok, why = cuda.available()
    if ok:
        pytest.skip("a CUDA backend runs here")
    with pytest.raises(ValueError, match="CUDA aggregator cannot run here") as exc:
        RunConfig(device="cuda")
    assert why in str(exc.value)
    out = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--device", "cuda", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "device 'cuda'" in lines[0] and "Traceback" not in out.stderr


def test_experiment_settings_keep_the_stored_grids_identity():
    """The per-cell settings are a RunConfig now; a stored grid's identity hash is unchanged, so
    its finished cells are still reused (results/experiments/rank, made before the change)."""
    from server.runtimes.experiments.config import ExperimentConfig
    doc = json.loads((ROOT / "results/experiments/rank/experiment.json").read_text())
    cfg = ExperimentConfig(settings=doc["settings"], arms=doc["arms"], distributions=doc["distributions"],
                           seeds=doc["seeds"])
    assert cfg.identity_hash() == doc["identity_hash"]
    changed = ExperimentConfig(settings={**doc["settings"], "data_split": "round_robin"}, arms=doc["arms"],
                               distributions=doc["distributions"], seeds=doc["seeds"])
    assert changed.identity_hash() != doc["identity_hash"]   # a new field counts once it is set


@pytest.fixture(scope="module")
def base():
    from server.runtimes.build import load_shared_base
    return load_shared_base(None, threads=1)


def test_simulate_and_experiment_configs_assemble_the_same_way(base):
    """Draw (simulate) and allot (experiments) give each client a RankSpec from the same client
    types; the Flower simulated nodes' workload is the embedded one."""
    from server.runtimes.build import build_federation, build_workload
    from server.workloads.catalog import load_workloads

    drawn = RunConfig(num_clients=8, rank_distribution="uniform", progress=False)
    fed = build_federation(drawn, base=base)
    assert sorted(fed.specs) == sorted(fed.workload.examples) and fed.evaluator is not None
    assert {d.client_type for d in fed.workload.devices.values()} <= set(load_workloads()["client_types"])
    again = build_workload(drawn, base)
    assert {c: d.spec for c, d in again.devices.items()} == fed.specs
    allotted = build_workload(experiment_settings(num_clients=8, rank_distribution="uniform"), base)
    counts = {}
    for d in allotted.devices.values():
        counts[d.client_type] = counts.get(d.client_type, 0) + 1
    assert counts == {"r8": 2, "r30": 2, "r30_200": 2, "r200": 2}   # uniform, 8 clients: exactly 2 each
    fedit = build_federation(drawn.replace(strategy="fedit", fedit_rank="max"), base=base, evaluate=False)
    assert fedit.strategy.rank == max(s.max_rank() for s in fed.specs.values()) and fedit.evaluator is None


def test_merged_stacks_merge_each_stack_once_and_round_trip():
    rng = np.random.default_rng(0)
    factors = {"m.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
               "m.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32)}
    stack = GlobalFactors(factors=factors, rank=2, alpha=2.0, round=1, strategy="flora", merge_into_base=True)
    plain = GlobalFactors(factors=factors, rank=2, alpha=2.0, round=2, strategy="flexlora")
    st = MergedStacks()
    assert st.absorb(stack) and not st.absorb(stack) and not st.absorb(plain) and not st.absorb(None)
    np.testing.assert_allclose(st.delta["m"], stack.module_delta("m"))
    assert st.round == 1
    again = MergedStacks()
    again.load_state(st.state_tensors())
    assert again.round == 1 and np.array_equal(again.delta["m"], st.delta["m"])
    assert fresh_or_global(stack) is None and fresh_or_global(plain) is plain and fresh_or_global(None) is None


def test_flower_tasks_are_found_by_name_not_by_a_server_path():
    import edge_client.flower_app as app

    source = Path(app.__file__).read_text()
    assert "server." not in source.replace("the server", "")   # the client package names no server module
    from server.runtimes.flower.simulated import SimulatedTask
    assert app.task_factory("simulated") is SimulatedTask      # the server's entry point
    assert app.task_factory("edge") is app.EdgeTask
    with pytest.raises(ValueError, match="client-task='nope' is not one of"):
        app.task_factory("nope")

    class Probe:
        pass
    app.register_task("probe-task", Probe)
    try:
        assert app.task_factory("probe-task") is Probe
    finally:
        app._TASKS.pop("probe-task")


def test_rslora_reaches_the_strategy_the_clients_and_the_identity():
    from server.runtimes.build import train_config_for

    on, off = RunConfig(rslora=True), RunConfig()
    assert on.strategy_config(base_model=None, module_shapes=None).rslora is True
    assert off.strategy_config(base_model=None, module_shapes=None).rslora is False
    assert train_config_for(on).rslora is True and train_config_for(off).rslora is False
    assert on.identity()["rslora"] is True
    assert "rslora" not in off.identity()          # older checkpoints (without the field) still resume
    assert {k: v for k, v in on.identity().items() if k != "rslora"} == off.identity()
    assert "rslora" not in experiment_settings().identity()


def test_simulate_flags_rslora_targets_and_suite_reach_the_run_config(capsys):
    from server.cli import build_parser, check_numbers, main, simulate_config

    def config(*argv):
        args = build_parser().parse_args(["simulate", *argv])
        check_numbers(args)
        return simulate_config(args)

    cfg = config("--rslora", "--targets", "q_proj, v_proj", "--suite", "facts")
    assert (cfg.rslora, cfg.target_modules, cfg.suite) == (True, ("q_proj", "v_proj"), "facts")
    plain = config()
    assert (plain.rslora, plain.target_modules, plain.suite) == (False, RunConfig().target_modules, "bundled")
    assert (plain.num_heldout, plain.unseen_tasks, plain.heldout_examples) == \
        (RunConfig().num_heldout, (), RunConfig().heldout_examples)
    chosen = config("--suite", "real", "--unseen-tasks", "date_words, sort_symbols", "--heldout-examples", "12")
    assert (chosen.unseen_tasks, chosen.num_heldout, chosen.heldout_examples) == (("date_words", "sort_symbols"), 2, 12)
    assert config("--heldout-clients", "3").num_heldout == 3
    assert main(["simulate", "--targets", "q-proj,v_proj"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--targets 'q-proj,v_proj'" in err[0] and "module names" in err[0]


def test_experiment_flags_rslora_and_targets_reach_the_cell_settings(capsys):
    from server.runtimes.experiments.cli import add_arguments, build_config, main
    from server.runtimes.experiments.config import ExperimentConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["run", "--rslora", "--targets", "q_proj,v_proj", "--suite", "facts"])
    cfg = build_config(args)
    assert (cfg.settings.rslora, cfg.settings.target_modules, cfg.settings.suite) == \
        (True, ("q_proj", "v_proj"), "facts")
    ident = cfg.identity()
    assert ident["rslora"] is True and ident["target_modules"] == ["q_proj", "v_proj"] and ident["suite"] == "facts"
    default = build_config(parser.parse_args(["run"]))
    assert default.settings == experiment_settings() and "rslora" not in default.identity()
    assert default.identity_hash() == ExperimentConfig().identity_hash()
    assert main(["run", "--targets", "q_proj,,v_proj", "--out", "unused"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--targets 'q_proj,,v_proj'" in err[0] and "an empty name" in err[0]
