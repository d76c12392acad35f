"""The CI smoke grid: every arm x two rank distributions x one seed, two rounds, tiny
federation; then resume (nothing recomputed), the report, and the traffic figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.runtimes.experiments.cli import main
from server.runtimes.experiments.config import ARMS

pytestmark = pytest.mark.slow

TINY = ["--distributions", "uniform,heavy_tail_strong", "--seeds", "0", "--rounds", "2", "--clients", "4",
        "--local-steps", "2", "--batch-size", "4", "--heldout-clients", "2", "--heldout-examples", "4",
        "--eval-max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


def _cell(out: Path, arm: str, dist: str = "uniform") -> dict:
    return json.loads((out / "cells" / f"{arm}__{dist}__s0.json").read_text())


def test_every_cell_finishes_with_scores_and_spectrum(grid):
    files = sorted(p.name for p in (grid / "cells").glob("*.json"))
    assert len(files) == len(ARMS) * 2
    for arm in ARMS:
        doc = _cell(grid, arm)
        assert [r["round"] for r in doc["rounds"]] == [1, 2]
        for r in doc["rounds"]:
            assert 0.0 <= r["rougeL"] <= 1.0 and r["aggregation_s"] >= 0 and r["clients"] == 4
            assert set(r["families"]) == {f for fam in doc["heldout_families"] for f in fam}
            for m in r["spectrum"].values():
                shares = [m["retained"][k] for k in sorted(m["retained"], key=int)]
                assert shares == sorted(shares) and 0.0 <= shares[0] <= shares[-1] <= 1.0 + 1e-9
    # FedIT trains every client at one rank: smallest for fedit_min, largest for fedit_max
    assert _cell(grid, "fedit_min")["fedit_rank"] < _cell(grid, "fedit_max")["fedit_rank"]
    assert len({t["rank"] for t in _cell(grid, "fedit_min")["rounds"][0]["traffic"]}) == 1


def test_traffic_follows_ranks_and_methods(grid):
    flex = _cell(grid, "flexlora")
    r1, r2 = flex["rounds"]
    assert all(t["received"] == 0 for t in r1["traffic"])           # nothing global before round 1
    by_type = {}
    for t in r2["traffic"]:
        by_type.setdefault(t["type"], set()).add((t["sent"], t["received"]))
    assert len(by_type) == 4 and all(len(v) == 1 for v in by_type.values())   # bytes depend on rank only
    sent = {k: next(iter(v))[0] for k, v in by_type.items()}
    assert sent["r8"] < sent["r30"] < sent["r30_200"] < sent["r200"]
    # FLoRA sends every client the whole stack (sum of the round's ranks): more than any FlexLoRA client gets
    flora = _cell(grid, "flora")["rounds"][1]["traffic"]
    assert min(t["received"] for t in flora) > max(t["received"] for t in r2["traffic"])


def test_resume_recomputes_nothing_and_settings_must_match(grid, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in (grid / "cells").glob("*.json")}
    assert main(["run", "--out", str(grid), *TINY[:-1]]) == 0
    assert f"{len(ARMS) * 2} already done, 0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (grid / "cells").glob("*.json")} == stamps
    other = [("3" if x == "2" and i > 0 and TINY[i - 1] == "--rounds" else x) for i, x in enumerate(TINY)]
    assert main(["run", "--out", str(grid), *other]) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and err.count("\n") == 1


def test_report_has_table_breakdowns_and_plots(grid):
    report = (grid / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in report
    for heading in ("Held-out Rouge-L", "Per task family", "Traffic per client", "aggregation time",
                    "Spectrum diagnostic", "flexlora >= hetlora", "flexlora >= fedit_min",
                    "Seed-paired differences with 95% intervals", "| flexlora − hetlora | uniform |"):
        assert heading in report
    assert "Command: `flexlora experiment run" in report
    summary = json.loads((grid / "summary.json").read_text())
    assert summary["cells"] == len(ARMS) * 2 and summary["table"]["flexlora"]["uniform"]["n"] == 1
    assert len(summary["curves"]["flora"]["uniform"]["mean"]) == 3        # base + 2 rounds
    for png in ("rouge_over_rounds.png", "spectrum.png"):
        data = (grid / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_module_entry_point_help():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "server.runtimes.experiments", "run", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and "--distributions" in res.stdout


def test_heldout_loss_matches_the_models_own_loss(grid):
    import random

    import torch

    from edge_client.data import tokenize_record
    from server.workloads.evaluate import heldout_loss
    from server.workloads.model import load_base
    from server.workloads.tasks import make_example

    model, tok = load_base()
    rng = random.Random(0)
    examples = [make_example("reverse_words", rng) for _ in range(3)]
    ids, labels = tokenize_record(tok, examples[0], 128)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert heldout_loss(model, tok, examples[:1]) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # batching and padding do not change the token mean
    assert heldout_loss(model, tok, examples, batch_size=1) == pytest.approx(
        heldout_loss(model, tok, examples, batch_size=3), rel=1e-5, abs=1e-6)
    doc = _cell(grid, "flexlora")
    assert all(r["heldout_loss"] > 0 for r in doc["rounds"]) and doc["final"]["heldout_loss"] > 0
    assert "Held-out loss of the global model" in (grid / "report.md").read_text()


def test_a_fedit_cell_at_a_finished_cells_rank_is_that_run(tmp_path):
    """fedit_min trains every client at the smallest rank, 8 under both uniform and
    heavy_tail_light with 8 clients: the second distribution's cell is the first one's run
    (reused_from), and equals the cell computed from scratch except for its distribution."""
    common = ["--arms", "fedit_min", "--seeds", "0", "--rounds", "2", "--clients", "8", "--clients-per-round", "3",
              "--local-steps", "2", "--batch-size", "4", "--heldout-clients", "2", "--heldout-examples", "4",
              "--eval-max-new-tokens", "4", "--no-progress", "--no-report"]
    grid, alone = tmp_path / "grid", tmp_path / "alone"
    assert main(["run", "--out", str(grid), "--distributions", "uniform,heavy_tail_light", *common]) == 0
    assert main(["run", "--out", str(alone), "--distributions", "heavy_tail_light", *common]) == 0
    first = _cell(grid, "fedit_min")
    twin = _cell(grid, "fedit_min", "heavy_tail_light")
    fresh = _cell(alone, "fedit_min", "heavy_tail_light")
    assert twin["reused_from"] == "fedit_min__uniform__s0" and "reused_from" not in fresh
    assert twin["fedit_rank"] == fresh["fedit_rank"] == first["fedit_rank"]
    assert twin["cell"] == fresh["cell"] and twin["clients"] == fresh["clients"] != first["clients"]
    for key in ("base", "final"):
        assert twin[key]["families"] == pytest.approx(fresh[key]["families"])
        assert twin[key].get("samples") == fresh[key].get("samples")     # the same greedy answers
        nested = ("families", "samples")
        assert {k: v for k, v in twin[key].items() if k not in nested} == \
            pytest.approx({k: v for k, v in fresh[key].items() if k not in nested})
    assert twin["base"]["samples"] and twin["rounds"][-1]["samples"] == fresh["rounds"][-1]["samples"]
    for a, b in zip(twin["rounds"], fresh["rounds"], strict=True):
        assert (a["heldout_loss"], a["train_loss"], a["ranks"]) == pytest.approx((b["heldout_loss"], b["train_loss"],
                                                                                  b["ranks"]))
        assert [(t["client"], t["type"]) for t in a["traffic"]] == [(t["client"], t["type"]) for t in b["traffic"]]
    # a finished cell at another rank is not a twin: the cell is computed
    stored = grid / "cells" / "fedit_min__uniform__s0.json"
    stored.write_text(json.dumps({**first, "fedit_rank": first["fedit_rank"] + 1}))
    (grid / "cells" / "fedit_min__heavy_tail_light__s0.json").unlink()
    assert main(["run", "--out", str(grid), "--distributions", "uniform,heavy_tail_light", *common]) == 0
    assert "reused_from" not in _cell(grid, "fedit_min", "heavy_tail_light")
