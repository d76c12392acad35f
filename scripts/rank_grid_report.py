"""Report of the rank-suite grid (issue 12): held-out loss of the global model on unseen clients
(primary), the official per-client view of it, Rouge-L and exact match; seed-paired differences
against FlexLoRA with 95% t-intervals; the spectrum (energy share at the smallest client rank)
per round; wall time.

    python scripts/rank_grid_report.py results/experiments/rank

Writes ``report.md``, ``summary.json`` and ``heldout_loss.png`` / ``spectrum.png`` there.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# two-sided 95% Student-t quantiles by degrees of freedom (df >= 31: normal)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    keys = [k for k in sorted(_T95) if k <= df]
    return _T95[keys[-1]] if df <= 30 else 1.96


def ci(values):
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return m, float("nan")
    return m, t95(n - 1) * statistics.stdev(values) / math.sqrt(n)


def main(argv=None) -> int:
    from server.runtimes.experiments.config import ARMS, DISTRIBUTIONS

    out = Path((argv or sys.argv[1:] or ["results/experiments/rank"])[0])
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    by = {}
    for c in cells:
        by[(c["cell"]["arm"], c["cell"]["distribution"], c["cell"]["seed"])] = c
    arms = [a for a in ARMS if any(k[0] == a for k in by)]
    dists = [d for d in DISTRIBUTIONS if any(k[1] == d for k in by)]
    seeds = sorted({k[2] for k in by})
    metrics = (("heldout_loss", "held-out loss (global)"), ("client_view_loss", "held-out loss (client view)"),
               ("rougeL", "Rouge-L"), ("exact_match", "exact match"))
    L = [f"# Rank-suite grid ({len(cells)} cells: {len(arms)} arms x {len(dists)} distributions x seeds {seeds})", ""]
    any_cell = cells[0] if cells else None
    if any_cell:
        L += [f"Split: `{any_cell['cell'].get('split')}`. Settings: `{json.dumps(json.loads((out / 'experiment.json').read_text())['settings'], sort_keys=True)}`" if (out / "experiment.json").exists() else "", ""]
    summary = {"cells": len(cells), "arms": arms, "distributions": dists, "seeds": seeds, "tables": {}, "paired": {}}
    for key, title in metrics:
        L += [f"## {title} (final round, mean +- sd over seeds; n seeds)", "",
              "| arm | " + " | ".join(dists) + " |", "|---|" + "---|" * len(dists)]
        tab = summary["tables"].setdefault(key, {})
        for a in arms:
            row = []
            for d in dists:
                vals = [by[(a, d, s)]["final"][key] for s in seeds if (a, d, s) in by]
                tab.setdefault(a, {})[d] = vals
                if vals:
                    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
                    row.append(f"{statistics.fmean(vals):.4f} +- {sd:.4f} (n={len(vals)})")
                else:
                    row.append("-")
            L.append(f"| {a} | " + " | ".join(row) + " |")
        L.append("")
    if any(k[0] == "flexlora" for k in by):
        for key, title in metrics[:2]:
            L += [f"## Paired difference against FlexLoRA: {title} (arm - flexlora; negative = lower loss "
                  "than FlexLoRA; seed-paired, 95% t-interval)", "",
                  "| arm | " + " | ".join(dists) + " |", "|---|" + "---|" * len(dists)]
            for a in arms:
                if a == "flexlora":
                    continue
                row = []
                for d in dists:
                    diffs = [by[(a, d, s)]["final"][key] - by[("flexlora", d, s)]["final"][key]
                             for s in seeds if (a, d, s) in by and ("flexlora", d, s) in by]
                    summary["paired"].setdefault(key, {}).setdefault(a, {})[d] = diffs
                    if diffs:
                        m, h = ci(diffs)
                        row.append(f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] (n={len(diffs)})")
                    else:
                        row.append("-")
                L.append(f"| {a} | " + " | ".join(row) + " |")
            L.append("")
    L += ["## Spectrum: share of ||dW||^2 in the smallest client rank of the round (mean over seeds), "
          "rounds 1, 5, 10, 15, 20", "", "| arm | distribution | " + " | ".join(f"r{r}" for r in (1, 5, 10, 15, 20)) + " |",
          "|---|---|" + "---|" * 5]
    for a in ("flexlora", "flexlora_carry", "raflora", "hetlora"):
        for d in dists:
            row = []
            for rnd in (1, 5, 10, 15, 20):
                vals = [by[(a, d, s)]["rounds"][rnd - 1]["spectrum_summary"]["min_rank_share"]
                        for s in seeds if (a, d, s) in by and len(by[(a, d, s)]["rounds"]) >= rnd]
                vals = [v for v in vals if v is not None]
                row.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
            if any(r != "-" for r in row):
                L.append(f"| {a} | {d} | " + " | ".join(row) + " |")
    L += ["", "## Wall time per cell (s, median over cells)", "", "| arm | median s | cells |", "|---|---|---|"]
    for a in arms:
        w = [c["wall_s"] for k, c in by.items() if k[0] == a]
        L.append(f"| {a} | {statistics.median(w):.1f} | {len(w)} |")
    base = [c["base"]["heldout_loss"] for c in cells]
    L += ["", f"Base model held-out loss (no adaptation): mean {statistics.fmean(base):.4f} over cells."]
    (out / "report.md").write_text("\n".join(L) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(2, len(dists), figsize=(4 * len(dists), 7), squeeze=False)
        for j, d in enumerate(dists):
            for a in arms:
                runs = [by[(a, d, s)]["rounds"] for s in seeds if (a, d, s) in by]
                if not runs:
                    continue
                n = min(len(r) for r in runs)
                axes[0][j].plot(range(1, n + 1), [statistics.fmean(r[i]["heldout_loss"] for r in runs) for i in range(n)], label=a)
                sh = [[r[i]["spectrum_summary"]["min_rank_share"] for r in runs] for i in range(n)]
                axes[1][j].plot(range(1, n + 1), [statistics.fmean(v for v in x if v is not None) if any(v is not None for v in x) else float("nan") for x in sh], label=a)
            axes[0][j].set_title(d)
            axes[0][j].set_ylabel("held-out loss")
            axes[1][j].set_ylabel("energy share at smallest rank")
            axes[1][j].set_xlabel("round")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "heldout_loss_and_spectrum.png", dpi=80)
    except ImportError:
        pass
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
