"""End-to-end: the CLI runs a tiny benchmark and writes table, JSON, CSV and plots."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time

import pytest

from server.bench import cli


def _args(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


TINY = ["--shapes", "96x64", "--spectra", "slow", "--rank-mixes", "heavy_tail_strong", "--clients", "4",
        "--rank-scale", "0.05", "--rank", "6", "--repeats", "3", "--budget", "0.05", "--threads", "1",
        "--backends", "ours:*,numpy:gesdd,sklearn:*,torch-cpu:svd_lowrank,scipy:svds", "--quiet"]


def test_tiny_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.run(_args(TINY + ["--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                               "--markdown", str(out / "r.md"), "--plot", str(out)]))
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("machine :") and "numpy:gesdd" in text and "err/opt" in text
    data = json.loads((out / "r.json").read_text())
    ok = [r for r in data["records"] if r["status"] == "ok" and r["family"] != "formation"]
    cases = {r["case"] for r in ok}
    assert len(cases) == 2 and "96x64 slow k=6" in cases and any("heavy_tail_strong K=4" in c for c in cases)
    for r in ok:
        assert r["timing"]["repeats"] >= 3 and r["time_s"] > 0
        assert r["err_ratio"] is None or r["err_ratio"] >= 1 - 1e-5
    gesdd = [r for r in ok if r["backend"] == "numpy:gesdd"]
    assert all(abs(r["err_ratio"] - 1) < 1e-5 and r["gflops"] > 0 for r in gesdd)
    rows = list(csv.DictReader((out / "r.csv").open()))
    assert len(rows) == len(data["records"])
    assert (out / "r.md").read_text().count("### ") == 2
    assert (out / "bench_svd_frontier.png").stat().st_size > 1000
    assert (out / "bench_svd_time_vs_size.png").stat().st_size > 1000


def test_subprocess_memory_mode_reports_a_peak(tmp_path):
    rc = cli.run(_args(["--shapes", "256x128", "--spectra", "", "--rank-mixes", "uniform", "--clients", "3",
                        "--rank-scale", "0.2", "--rank", "8", "--repeats", "1", "--min-repeats", "1",
                        "--backends", "numpy:gesdd,ours:exact", "--memory", "subprocess", "--threads", "1",
                        "--quiet", "--json", str(tmp_path / "r.json")]))
    assert rc == 0
    recs = [r for r in json.loads((tmp_path / "r.json").read_text())["records"] if r.get("peak_method")]
    assert recs and all(r["peak_method"].startswith("subprocess") for r in recs)
    gesdd = next(r for r in recs if r["backend"] == "numpy:gesdd")
    assert gesdd["peak_bytes"] is not None and gesdd["peak_bytes"] > 0


def test_bad_arguments_give_one_line_errors(capsys):
    assert cli.run(_args(["--shapes", "12by3"])) == 2
    assert "shapes" in capsys.readouterr().err
    assert cli.run(_args(["--rank-mixes", "imaginary"])) == 2
    assert "rank mix" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_preset_as_ci_smoke_test():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "server.bench", "svd", "--preset", "quick", "--quiet"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ours" in proc.stdout and "fastest:" in proc.stdout
    # sanity bound only (shared, noisy machine), not a performance claim
    assert time.perf_counter() - t0 < 300
