"""The Flower run config takes the embedded runtime's defaults: a key left out means what
``flexlora simulate`` means by it."""

from __future__ import annotations

import dataclasses

import pytest

from server.runtimes.config import RunConfig
from server.runtimes.flower.config import run_config_defaults, to_run_config

pytestmark = pytest.mark.flower


def test_empty_run_config_maps_to_simulation_defaults():
    ours = to_run_config({}, num_clients=7)
    theirs = RunConfig(num_clients=7, rounds=ours.rounds, progress=False)
    assert ours.identity() == theirs.identity()
    assert (ours.eval_max_new_tokens, ours.min_clients) == (theirs.eval_max_new_tokens, theirs.min_clients)


def test_defaults_follow_simulation_config_fields():
    fields = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    d = run_config_defaults()
    assert (d["lr"], d["local-steps"], d["batch-size"], d["alpha"]) == \
        (fields["lr"], fields["local_steps"], fields["batch_size"], fields["alpha"])


def test_given_keys_override_defaults():
    cfg = to_run_config({"lr": 0.02, "local-steps": 3, "model": "", "seed": 9}, num_clients=2)
    assert (cfg.lr, cfg.local_steps, cfg.model, cfg.seed) == (0.02, 3, None, 9)
    with pytest.raises(ValueError, match="'lr'"):
        to_run_config({"lr": "fast"}, num_clients=2)


def test_rslora_key_reaches_the_server_and_the_edge_clients():
    from edge_client.trainer import TrainConfig

    assert run_config_defaults()["rslora"] is False and to_run_config({}, num_clients=2).rslora is False
    assert to_run_config({"rslora": True}, num_clients=2).rslora is True
    assert TrainConfig.from_run_config({"rslora": True}).rslora is True
    with pytest.raises(ValueError, match="'rslora' must be true or false"):
        to_run_config({"rslora": "yes"}, num_clients=2)
    with pytest.raises(ValueError, match="'rslora' must be true or false"):
        TrainConfig.from_run_config({"rslora": "yes"})


def test_pyproject_flower_config_matches_simulation_defaults():
    """`flwr run` fills keys from [tool.flwr.app.config]; they must mean what `flexlora simulate` means."""
    import tomllib
    from pathlib import Path

    from server.runtimes.flower.config import run_config_defaults

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = run_config_defaults()
    mismatched = {k: (app_config[k], v) for k, v in defaults.items() if k in app_config and app_config[k] != v}
    assert not mismatched, f"pyproject [tool.flwr.app.config] vs RunConfig defaults: {mismatched}"
