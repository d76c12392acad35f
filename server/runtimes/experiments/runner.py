"""Run a grid of cells in one process, resumably, with progress.

Layout of an output folder::

    <out>/experiment.json       the grid and its settings (written first; a resumed run must match)
    <out>/cells/<key>.json      one finished cell each (atomic write); present = not recomputed
    <out>/report.md, summary.json, *.png   written by ``server.runtimes.experiments.report``

A cell file whose settings differ from this run's is an error, not silently reused: pass
another output folder or ``--fresh`` to recompute.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from server.runtimes.build import SharedBase, load_shared_base
from server.runtimes.experiments.cell import fedit_rank_of, reuse_fedit_cell, run_cell
from server.runtimes.experiments.config import DISTRIBUTIONS, Cell, ExperimentConfig

__all__ = ["cell_path", "load_cell", "run_grid", "write_json_atomic"]

log = logging.getLogger("flexlora.experiment")


def write_json_atomic(path: Path, doc) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")   # unique: shards may write at once
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cell_path(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.key}.json"


def load_cell(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); delete it to recompute the cell") from None


def _check_stored(out: Path, cfg: ExperimentConfig, fresh: bool) -> None:
    meta = out / "experiment.json"
    if meta.exists() and not fresh:
        stored = load_cell(meta)
        if stored.get("identity_hash") != cfg.identity_hash():
            raise ValueError(f"{out} holds cells made with other settings ({stored.get('settings')}); "
                             "use another --out or --fresh to recompute")
    write_json_atomic(meta, {**cfg.to_json(), "identity_hash": cfg.identity_hash()})


def _fedit_twin(cfg: ExperimentConfig, out: Path, cell: Cell, base: SharedBase) -> dict | None:
    """A finished cell of ``out`` that ``cell`` would repeat: the same FedIT arm and seed under
    another distribution whose smallest (or largest) rank is the same (``reuse_fedit_cell``)."""
    rank = fedit_rank_of(cell, cfg.settings, base)
    if rank is None:
        return None
    for d in DISTRIBUTIONS:
        path = cell_path(out, Cell(arm=cell.arm, distribution=d, seed=cell.seed))
        if d != cell.distribution and path.exists():
            doc = load_cell(path)
            if doc.get("identity_hash") == cfg.identity_hash() and doc.get("fedit_rank") == rank:
                return doc
    return None


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def run_grid(cfg: ExperimentConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
             base: SharedBase | None = None, stream=None, shard: tuple[int, int] = (0, 1),
             on_cell: Callable[[Cell, dict], None] | None = None) -> dict:
    """Run every cell of ``cfg`` not already in ``out/cells``; returns counts and timings.

    ``shard=(k, n)`` runs only cells ``k, k+n, k+2n, ...`` so that n processes can share a
    grid; a cell another process finished meanwhile is skipped when its turn comes. A FedIT cell
    whose rank a finished cell of the same arm and seed under another distribution already ran
    is that run (``reuse_fedit_cell``, ``reused_from``), not computed again (``fresh`` computes it)."""
    k, n = shard
    if not (isinstance(n, int) and isinstance(k, int) and n >= 1 and 0 <= k < n):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    _check_stored(out, cfg, fresh)
    stream = stream or sys.stderr
    cells = cfg.cells()[k::n]
    todo = [c for c in cells if fresh or not cell_path(out, c).exists()]
    skipped = len(cells) - len(todo)
    if progress:
        print(f"experiment: {len(cells)} cells, {skipped} already done, {len(todo)} to run -> {out}",
              file=stream, flush=True)
    t0 = time.perf_counter()
    if todo and base is None:
        base = load_shared_base(cfg.settings.model, threads=cfg.threads)
    walls = []
    ran = twins = 0
    for i, cell in enumerate(todo, 1):
        if not fresh and cell_path(out, cell).exists():     # another shard got there first
            continue
        t_cell = time.perf_counter()

        def on_client(rnd: int, done: int, total: int, _cell=cell, _i=i) -> None:
            if progress and stream.isatty():
                print(f"\r[{_i}/{len(todo)}] {_cell.key}: round {rnd}/{cfg.settings.rounds} "
                      f"client {done}/{total}   ", end="", file=stream, flush=True)

        twin = None if fresh else _fedit_twin(cfg, out, cell, base)
        if twin is not None:
            doc = reuse_fedit_cell(cell, cfg.settings, base, twin)
            twins += 1
        else:
            doc = run_cell(cell, cfg.settings, base, on_client=on_client)
        doc["identity_hash"] = cfg.identity_hash()
        write_json_atomic(cell_path(out, cell), doc)
        walls.append(time.perf_counter() - t_cell)
        ran += 1
        if on_cell is not None:
            on_cell(cell, doc)
        if progress:
            eta = sum(walls) / len(walls) * (len(todo) - i)
            warn = "  [rank collapse]" if doc["collapse_warning"] else ""
            twin_note = f" (FedIT at the same rank as {doc['reused_from']}: its run, not recomputed)" \
                if twin is not None else ""
            print(f"\r[{i}/{len(todo)}] {cell.key}: Rouge-L {doc['final']['rougeL']:.4f} "
                  f"(base {doc['base']['rougeL']:.4f}) in {walls[-1]:.1f} s, eta {_fmt_eta(eta)}{warn}{twin_note}",
                  file=stream, flush=True)
        log.info("cell %s done: rougeL %.4f", cell.key, doc["final"]["rougeL"])
    total = time.perf_counter() - t0
    if progress:
        print(f"experiment: ran {ran} cells in {total:.1f} s ({len(cells) - ran} reused)", file=stream, flush=True)
    return {"cells": len(cells), "ran": ran, "reused": len(cells) - ran, "fedit_twins": twins, "wall_s": total,
            "cell_wall_s": walls}
