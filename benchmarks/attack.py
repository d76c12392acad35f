"""Poisoning attacks against `flexlora simulate`, for flexlora, flexlora_carry and raflora, each
defence setting off and on (issue 21).

    python benchmarks/attack.py --out results/attack_cells      # the grid, one JSON per cell
    python benchmarks/attack.py --out results/attack_cells --report results/attack   # table only

Cells, for every strategy and seed: 0 attackers with defences off and on (the clean
seed-to-seed spread), honest runs with each defence alone (``trim``, ``clip``, ``cap``,
``direction``: how often each rank class is trimmed, clipped, capped), and for every adversarial
kind (``server.runtimes.faults.ADVERSARIAL``: scaled, sign_flip, noise, inflate, within_spread,
slot_cancel) one attacker and ``ceil(20%)`` of the clients attacking, defences off and on. "on" is
robust aggregation: distance trimming, direction trimming, adaptive clipping per rank class and
a cap on any client's weight share (per slot for raFLoRA), all measured on what each strategy
aggregates. Each attacked cell is compared with the clean cell of the same strategy, seed and
defence setting; the goal is a change below the clean seed-to-seed spread (max - min).

Sharded and resumable: each cell is one JSON file in ``--out`` (written atomically), cells
already there are skipped, ``--shard I/N`` runs the cells whose name hashes (CRC-32) to ``I`` mod ``N``; the report (``--report``
prefix: ``.md`` and ``.json``) is written from whatever cells are there.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.runtimes.config import RunConfig  # noqa: E402
from server.runtimes.faults import ADVERSARIAL  # noqa: E402
from server.runtimes.simulate import run_simulation  # noqa: E402

ON = {"trim_fraction": 0.2, "direction_trim": 0.2, "clip_adaptive": 2.0, "max_weight_share": 0.25}
DEFENCES = {"off": {}, "on": ON,
            # honest runs with one defence each (per-rank-class table)
            "trim": {"trim_fraction": 0.2}, "direction": {"direction_trim": 0.2},
            "clip": {"clip_adaptive": 2.0}, "cap": {"max_weight_share": 0.25}}
STRATEGIES = {"flexlora": {"strategy": "flexlora"}, "flexlora_carry": {"strategy": "flexlora", "carry": True},
              "raflora": {"strategy": "raflora"}}


def cell_name(strategy: str, seed: int, kind: str, attackers: int, defence: str) -> str:
    return f"{strategy}__s{seed}__{kind}__x{attackers}__{defence}"


def plan(strategies, seeds: int, kinds, counts, defences=tuple(DEFENCES)) -> list[tuple]:
    out = []
    for st in strategies:
        for s in range(seeds):
            out += [(st, s, "none", 0, d) for d in DEFENCES if d in defences]
            out += [(st, s, k, n, d) for k in kinds for n in counts for d in ("off", "on")]
    return out


def run_cell(strategy: str, seed: int, kind: str, attackers: int, defence: str, base: dict) -> dict:
    ids = [f"client-{i:03d}" for i in range(base["num_clients"])]
    faults = {cid: kind for cid in ids[:attackers]} if attackers else {}
    cfg = RunConfig(seed=seed, faults=faults, progress=False, **STRATEGIES[strategy], **base, **DEFENCES[defence])
    t0 = time.perf_counter()
    doc = run_simulation(cfg)
    last = doc["rounds"][-1]
    by_rank: dict[str, dict[str, int]] = {}
    for r in doc["rounds"]:
        for cls, c in r.get("robust", {}).get("by_rank", {}).items():
            for what, v in c.items():
                by_rank.setdefault(cls, {}).setdefault(what, 0)
                by_rank[cls][what] += v
    attacker_ids = set(faults)
    return {"strategy": strategy, "seed": seed, "kind": kind, "attackers": attackers, "defence": defence,
            "heldout_loss": last.get("heldout_loss"), "rougeL": last.get("rougeL"),
            "losses": [r.get("heldout_loss") for r in doc["rounds"]],
            "base_loss": doc["base"].get("heldout_loss"), "wall_s": time.perf_counter() - t0,
            "trimmed": sum(len(r.get("robust", {}).get("trimmed", [])) for r in doc["rounds"]),
            "attackers_trimmed": sum(len(attacker_ids & set(r.get("robust", {}).get("trimmed", [])))
                                     for r in doc["rounds"]),
            "attackers_clipped": sum(len(attacker_ids & set(r.get("robust", {}).get("clipped", [])))
                                     for r in doc["rounds"]),
            "by_rank": by_rank, "failed_rounds": sum(1 for r in doc["rounds"] if "failed" in r)}


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def report(cells: list[dict], base: dict, cmd: str) -> tuple[str, dict]:
    lines = [f"# Attack benchmark (issue 21)\n\n`{cmd}`\n\nFederation: {base}; defences on = {ON} "
             f"(distance and direction trimming, adaptive clipping per rank class, weight-share cap; "
             f"per slot for raFLoRA, on the change for carry). {len(cells)} cells, "
             f"{sum(c['wall_s'] for c in cells) / 60:.0f} min of runs.\n",
             (f"With {base['num_clients']} clients, ceil(20%) = 1: the 20%-attackers case is the single-attacker "
              "case.\n" if math.ceil(0.2 * base["num_clients"]) == 1 else ""),
             "A cell is *within spread* when |its held-out loss - the clean loss of the same strategy, seed and "
             "defence setting| is below that setting's clean seed-to-seed spread (max - min over seeds).\n"]
    idx = {(c["strategy"], c["seed"], c["kind"], c["attackers"], c["defence"]): c for c in cells}
    summary: dict = {}
    for st in STRATEGIES:
        mine = [c for c in cells if c["strategy"] == st]
        if not mine:
            continue
        lines.append(f"## {st}\n")
        spread = {}
        for d in ("off", "on"):
            clean = [c["heldout_loss"] for c in mine if c["kind"] == "none" and c["defence"] == d]
            spread[d] = max(clean) - min(clean) if len(clean) > 1 else float("nan")
            lines.append(f"- clean, defences {d}: held-out loss {' / '.join(_f(x) for x in clean)} over seeds "
                         f"(mean {_f(statistics.mean(clean)) if clean else 'n/a'}, spread {_f(spread[d])})")
        lines += ["", "| attack | attackers | defences | mean held-out loss | mean delta vs clean | max abs delta | "
                  "seeds within spread | attacker trimmed / clipped (client-rounds) |", "|---|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for c in mine:
            if c["kind"] == "none" or c["defence"] not in ("off", "on"):
                continue
            ref = idx.get((st, c["seed"], "none", 0, c["defence"]))
            if ref is None:
                continue
            groups.setdefault((c["kind"], c["attackers"], c["defence"]), []).append((c, c["heldout_loss"] - ref["heldout_loss"]))
        for (kind, n, d), rows in sorted(groups.items(), key=lambda kv: (ADVERSARIAL.index(kv[0][0])
                                                                           if kv[0][0] in ADVERSARIAL else 99,
                                                                           kv[0][1], kv[0][2])):
            deltas = [x for _c, x in rows]
            within = sum(1 for x in deltas if abs(x) < spread[d])
            summary.setdefault(st, {})[f"{kind}/x{n}/{d}"] = {
                "mean_loss": statistics.mean(c["heldout_loss"] for c, _ in rows), "mean_delta": statistics.mean(deltas),
                "max_abs_delta": max(abs(x) for x in deltas), "within_spread": within, "seeds": len(rows),
                "spread": spread[d]}
            lines.append(f"| {kind} | {n} | {d} | {_f(statistics.mean(c['heldout_loss'] for c, _ in rows))} | "
                         f"{statistics.mean(deltas):+.4f} | {max(abs(x) for x in deltas):.4f} | {within}/{len(rows)} | "
                         f"{sum(c['attackers_trimmed'] for c, _ in rows)} / {sum(c['attackers_clipped'] for c, _ in rows)} |")
        lines.append("")
    # honest runs, each defence alone: per rank class
    attack_lines, lines = lines, []
    lines += ["## Honest runs: trimmed / clipped / capped client-rounds per rank class\n",
              "Share of the class among client-rounds vs its share of the defence's actions (goal: at most "
              "twice its share of the clients). Summed over seeds and rounds.\n",
              "| strategy | defence | rank class | client-rounds (share) | acted on | share of actions | ratio |",
              "|---|---|---|---|---|---|---|"]
    action = {"trim": "trimmed", "direction": "trimmed", "clip": "clipped", "cap": "capped", "on": None}
    by_class: dict = {}
    for st in STRATEGIES:
        for d, what in action.items():
            if what is None:
                continue
            rows = [c for c in cells if c["strategy"] == st and c["kind"] == "none" and c["defence"] == d]
            if not rows:
                continue
            tot: dict[str, dict[str, int]] = {}
            for c in rows:
                for cls, v in c["by_rank"].items():
                    for k, x in v.items():
                        tot.setdefault(cls, {}).setdefault(k, 0)
                        tot[cls][k] += x
            n_all = sum(v["clients"] for v in tot.values())
            act_all = sum(v[what] for v in tot.values())
            for cls in sorted(tot, key=lambda k: (len(k), k)):
                v = tot[cls]
                cs, a_s = v["clients"] / n_all, (v[what] / act_all if act_all else 0.0)
                ratio = a_s / cs if cs else float("nan")
                by_class.setdefault(st, {}).setdefault(d, {})[cls] = {"client_rounds": v["clients"], what: v[what],
                                                                      "ratio": ratio}
                label = cls.replace("|", "\\|")
                lines.append(f"| {st} | {d} ({what}) | {label} | {v['clients']} ({cs:.2f}) | {v[what]} | {a_s:.2f} | "
                             f"{ratio:.2f}{' **above 2**' if ratio > 2 else ''} |")
    return ("\n".join(attack_lines) + "\n", "\n".join(lines) + "\n",
            {"summary": summary, "by_rank_class": by_class})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(ADVERSARIAL))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--out", default=str(ROOT / "results" / "attack_cells"), help="folder: one JSON per cell")
    ap.add_argument("--report", default=str(ROOT / "results" / "attack"), help="prefix of the .md/.json report")
    ap.add_argument("--by-rank-report", default=str(ROOT / "results" / "defences_by_rank.md"),
                    help="the per-rank-class table of the honest runs")
    ap.add_argument("--honest", default=",".join(DEFENCES),
                    help=f"defence settings of the honest cells (of {', '.join(DEFENCES)}); with --kinds '' "
                         "e.g. trim,clip,direction for the per-rank-class table alone")
    ap.add_argument("--shard", default="0/1", help="I/N: run the cells whose name hashes to I mod N (stable, so "
                                                   "N processes split any subset of the grid evenly)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in ADVERSARIAL]
    if unknown:
        raise SystemExit(f"--kinds: {unknown} not in {ADVERSARIAL}")
    strategies = [s for s in args.strategies.split(",") if s]
    if any(s not in STRATEGIES for s in strategies):
        raise SystemExit(f"--strategies: one of {sorted(STRATEGIES)}")
    i_shard, n_shard = (int(x) for x in args.shard.split("/"))
    base = dict(num_clients=args.clients, rounds=args.rounds, local_steps=args.local_steps, num_heldout=2,
                eval_max_new_tokens=4, threads=1)
    counts = sorted({1, max(1, math.ceil(0.2 * args.clients))})
    honest = [d for d in args.honest.split(",") if d]
    if any(d not in DEFENCES for d in honest):
        raise SystemExit(f"--honest: of {sorted(DEFENCES)}")
    cells = plan(strategies, args.seeds, kinds, counts, honest)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for j, c in enumerate(cells):
        path = out / (cell_name(*c) + ".json")
        if args.report_only or zlib.crc32(path.stem.encode()) % n_shard != i_shard or path.exists():
            continue
        res = run_cell(*c, base)
        res["base"] = base
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, path)
        print(f"[{j + 1}/{len(cells)}] {path.stem}: loss {_f(res['heldout_loss'])} ({res['wall_s']:.0f} s, "
              f"{time.perf_counter() - t0:.0f} s total)", flush=True)
    done = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    cmd = "python benchmarks/attack.py " + " ".join(a for a in (sys.argv[1:] if argv is None else argv)
                                                    if not a.startswith("--report-only"))
    md, by_rank_md, doc = report(done, base, cmd.strip())
    Path(args.report + ".md").write_text(md + "\n" + by_rank_md)
    Path(args.by_rank_report).write_text(
        f"# Defences per rank class, honest runs (issue 21)\n\n`{cmd.strip()}` (the honest cells of the attack "
        f"benchmark); federation {base}; each defence alone: trim = trim_fraction 0.2, direction = "
        f"direction_trim 0.2, clip = clip_adaptive 2.0, cap = max_weight_share 0.25.\n\n" + by_rank_md.split("\n", 2)[2])
    Path(args.report + ".json").write_text(json.dumps({"base": base, "defences": DEFENCES, **doc, "cells": done},
                                                      indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
