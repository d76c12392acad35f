"""Poisoning attacks against `flexlora simulate`, each defence off and on.

    python benchmarks/attack.py                      # the default grid (~10-20 min on one core)
    python benchmarks/attack.py --quick              # 2 seeds, 2 kinds (smoke test)

Cells: 0 attackers (seeds 0..S-1, for the seed-to-seed spread), then 1 attacker and 20% of the
clients attacking with each adversarial fault kind (``server.runtimes.faults.ADVERSARIAL``:
scaled, sign_flip, noise, inflate), with defences off and on. "on" is robust aggregation:
Gram-distance trimming (``--trim-fraction``), adaptive clipping at a multiple of the round's
median norm (``--clip-adaptive``) and a cap on any client's weight share (``--max-weight-share``).
Every cell reports the final round's held-out loss and Rouge-L; the attacked cells run with
seed 0 and are compared with the seed-0 clean run of the same defence setting.

Writes ``results/attack.json`` and ``results/attack.md`` (the table).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.runtimes.config import RunConfig  # noqa: E402
from server.runtimes.faults import ADVERSARIAL  # noqa: E402
from server.runtimes.simulate import run_simulation  # noqa: E402

DEFENCES = {"off": {}, "on": {"trim_fraction": 0.2, "clip_adaptive": 2.0, "max_weight_share": 0.25}}


def run_cell(*, seed: int, kind: str | None, attackers: int, defence: str, base: dict) -> dict:
    ids = [f"client-{i:03d}" for i in range(base["num_clients"])]
    faults = {cid: kind for cid in ids[:attackers]} if kind else {}
    cfg = RunConfig(seed=seed, faults=faults, progress=False, **base, **DEFENCES[defence])
    t0 = time.perf_counter()
    doc = run_simulation(cfg)
    last = doc["rounds"][-1]
    return {"seed": seed, "kind": kind or "none", "attackers": attackers, "defence": defence,
            "heldout_loss": last.get("heldout_loss"), "rougeL": last["rougeL"],
            "base_loss": doc["base"].get("heldout_loss"), "wall_s": time.perf_counter() - t0,
            "trimmed": sum(len(r.get("robust", {}).get("trimmed", [])) for r in doc["rounds"]),
            "failed_rounds": sum(1 for r in doc["rounds"] if "failed" in r)}


def table(cells: list[dict], seeds: int) -> str:
    lines = []
    spread = {}
    for d in DEFENCES:
        clean = [c for c in cells if c["kind"] == "none" and c["defence"] == d]
        losses = [c["heldout_loss"] for c in clean]
        spread[d] = (max(losses) - min(losses)) if len(losses) > 1 else float("nan")
        sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        lines.append(f"- defences {d}: clean held-out loss over {len(losses)} seeds "
                     f"{statistics.mean(losses):.4f} (spread max-min {spread[d]:.4f}, sd {sd:.4f}); "
                     f"Rouge-L {statistics.mean(c['rougeL'] for c in clean):.4f}")
    lines += ["", "| attack | attackers | defences | held-out loss | delta vs clean (seed 0) | within spread | "
              "Rouge-L | trimmed | failed rounds |", "|---|---|---|---|---|---|---|---|---|"]
    ref = {c["defence"]: c for c in cells if c["kind"] == "none" and c["seed"] == 0}
    for c in cells:
        delta = c["heldout_loss"] - ref[c["defence"]]["heldout_loss"]
        within = "" if c["kind"] == "none" else ("yes" if abs(delta) < spread[c["defence"]] else "no")
        lines.append(f"| {c['kind']} | {c['attackers']} | {c['defence']} | {c['heldout_loss']:.4f} | "
                     f"{delta:+.4f} | {within} | {c['rougeL']:.4f} | {c['trimmed']} | {c['failed_rounds']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(ADVERSARIAL))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    kinds = args.kinds.split(",")
    seeds = args.seeds
    if args.quick:
        kinds, seeds = kinds[:2], 2
    base = dict(num_clients=args.clients, rounds=args.rounds, local_steps=args.local_steps, num_heldout=2,
                eval_max_new_tokens=8, threads=1)
    counts = sorted({1, max(1, math.ceil(0.2 * args.clients))})
    plan = [(s, None, 0, d) for d in DEFENCES for s in range(seeds)]
    plan += [(0, k, n, d) for k in kinds for n in counts for d in DEFENCES]
    cells = []
    t0 = time.perf_counter()
    for i, (seed, kind, n, d) in enumerate(plan, 1):
        cell = run_cell(seed=seed, kind=kind, attackers=n, defence=d, base=base)
        cells.append(cell)
        print(f"[{i}/{len(plan)}] {cell['kind']:>9} x{n} defences {d}: loss {cell['heldout_loss']:.4f} "
              f"rougeL {cell['rougeL']:.4f} ({cell['wall_s']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/attack.py " + " ".join(sys.argv[1:])
    md = (f"# Attack benchmark\n\n`{cmd.strip()}`: {args.clients} clients, {args.rounds} rounds, "
          f"{args.local_steps} local steps, defences on = {DEFENCES['on']}; {time.perf_counter() - t0:.0f} s.\n\n"
          + table(cells, seeds) + "\n")
    (out / "attack.md").write_text(md)
    (out / "attack.json").write_text(json.dumps({"base": base, "defences": DEFENCES, "cells": cells}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
