"""The scripts in benchmarks/: every one starts (its imports still resolve after the tree moves),
and the budget benchmark measures real client updates collected from a federation."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_starts(name, monkeypatch, capsys):
    """``python benchmarks/NAME --help`` exits 0 with a usage line: its module-level imports work
    (a helper module without a ``__main__`` block, e.g. flower_local.py, is imported)."""
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks")] + list(sys.path))
    path = ROOT / "benchmarks" / name
    if '__name__ == "__main__"' not in path.read_text():
        assert runpy.run_path(str(path)), name
        return
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    assert exc.value.code in (0, None), f"{name} --help exited {exc.value.code}"
    assert "usage:" in capsys.readouterr().out


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return runpy.run_path(str(ROOT / "benchmarks" / name))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_budget_on_collected_updates(tmp_path, monkeypatch):
    """collect_updates.py writes one round's replies (wire bytes + manifest) of the shipped tiny
    model; bench_budget.py --updates aggregates them with the server's Aggregator and measures
    every route: exact is the optimum, and the sketch at the whole dense budget reaches it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    collect = _load("collect_updates.py")
    out = tmp_path / "updates"
    assert collect["main"](["--suite", "bundled", "--rounds", "1", "--clients", "3",
                            "--clients-per-round", "3", "--local-steps", "2", "--threads", "1",
                            "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == 3 and all((out / f["path"]).stat().st_size > 0 for f in manifest["files"])
    budget = _load("bench_budget.py")
    res = tmp_path / "budget"
    assert budget["main"](["--updates", str(out), "--fractions", "0.5,1", "--threads", "1",
                           "--layers", "0", "--out", str(res)]) == 0
    doc = json.loads(res.with_suffix(".json").read_text())
    assert doc["real"]["clients"] == 3 and doc["real"]["layers"] == [0]
    assert doc["rows"], "no module measured"
    for row in doc["rows"]:
        assert row["module"].startswith("model.layers.0.") or ".layers.0." in row["module"]
        assert row["routes"]["exact"]["err_over_opt"] == pytest.approx(1.0, abs=1e-3)
        full = [p for p in row["routes"]["sketch"]["curve"] if p["fraction_of_dense"] == 1.0]
        assert full and full[0]["err_over_opt"] <= 1.05
    assert "Real client updates" in res.with_suffix(".md").read_text()


@pytest.mark.slow
def test_attack_benchmark_smoke(tmp_path, monkeypatch):
    """A small attack grid (issue 21) run as two shards into one folder: the shards split the
    cells between them (every cell once), the report compares the attacked cells with the clean
    ones, and the per-rank-class table counts the honest clipping cell's client-rounds."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    attack = _load("attack.py")
    out, rep, by_rank = tmp_path / "cells", tmp_path / "attack", tmp_path / "by_rank.md"
    args = ["--clients", "4", "--rounds", "2", "--local-steps", "1", "--seeds", "1", "--kinds", "scaled",
            "--strategies", "flexlora", "--honest", "off,on,clip", "--out", str(out), "--report", str(rep),
            "--by-rank-report", str(by_rank)]
    for shard in ("0/2", "1/2"):
        assert attack["main"]([*args, "--shard", shard]) == 0
    cells = sorted(p.stem for p in out.glob("*.json"))
    assert cells == sorted(attack["cell_name"]("flexlora", 0, k, n, d) for k, n, d in
                           [("none", 0, "off"), ("none", 0, "on"), ("none", 0, "clip"),
                            ("scaled", 1, "off"), ("scaled", 1, "on")])
    doc = json.loads(rep.with_suffix(".json").read_text())
    assert len(doc["cells"]) == 5
    for c in doc["cells"]:
        assert c["heldout_loss"] is not None and len(c["losses"]) == 2 and c["failed_rounds"] == 0
    clip = next(c for c in doc["cells"] if c["defence"] == "clip")
    assert sum(v["clients"] for v in clip["by_rank"].values()) == 4 * 2
    assert "| scaled | 1 | off |" in rep.with_suffix(".md").read_text()
    assert "clip (clipped)" in by_rank.read_text()
