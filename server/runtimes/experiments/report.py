"""Summarise finished cells: tables (markdown + JSON) and plots.

Everything here reads ``<out>/cells/*.json`` only, so a report can be rebuilt at any time,
also from a partial grid (missing cells show as gaps and are counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from server.runtimes.experiments.config import ARMS, DISTRIBUTIONS
from server.runtimes.experiments.runner import load_cell, write_json_atomic
from server.runtimes.experiments.spectrum import spectrum_summary

__all__ = ["load_cells", "summarize", "summarize_dir", "render_markdown", "write_report"]


def load_cells(out: str | Path) -> list[dict]:
    """Finished cells of ``out`` made with the settings in ``out/experiment.json``."""
    out = Path(out)
    meta = out / "experiment.json"
    want = load_cell(meta).get("identity_hash") if meta.exists() else None
    cells = []
    for path in sorted((out / "cells").glob("*.json")):
        doc = load_cell(path)
        if want is None or doc.get("identity_hash") == want:
            cells.append(doc)
    return cells


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size),
            "values": [float(x) for x in v]}


def _order(present: set, canonical: Sequence[str]) -> list[str]:
    return [x for x in canonical if x in present] + sorted(present - set(canonical))


def summarize(cells: Sequence[Mapping]) -> dict:
    arms = _order({c["cell"]["arm"] for c in cells}, list(ARMS))
    dists = _order({c["cell"]["distribution"] for c in cells}, DISTRIBUTIONS)
    by = {(c["cell"]["arm"], c["cell"]["distribution"]): [] for c in cells}
    for c in cells:
        by[(c["cell"]["arm"], c["cell"]["distribution"])].append(c)
    table, late, loss, hloss, gain, recall, recall_loss = {}, {}, {}, {}, {}, {}, {}
    curves, spectrum, families, traffic, agg = {}, {}, {}, {}, {}
    for a in arms:
        table[a], late[a], loss[a], hloss[a], gain[a], curves[a], spectrum[a] = {}, {}, {}, {}, {}, {}, {}
        recall[a], recall_loss[a] = {}, {}
        fam_vals: dict[str, list[float]] = {}
        tr: dict[str, dict[str, list[float]]] = {}
        agg_vals: list[float] = []
        for d in dists:
            group = sorted(by.get((a, d), []), key=lambda c: c["cell"]["seed"])
            table[a][d] = _stats([c["final"]["rougeL"] for c in group])
            table[a][d]["seeds"] = [c["cell"]["seed"] for c in group]
            loss[a][d] = _stats([c["rounds"][-1].get("train_loss") for c in group])
            hloss[a][d] = _final_stats(group, "heldout_loss")
            recall[a][d] = _final_stats(group, "recall_exact")
            recall_loss[a][d] = _final_stats(group, "recall_loss")
            gain[a][d] = _stats([c["final"]["rougeL"] - c["base"]["rougeL"] for c in group])
            late[a][d] = _stats([_late_mean(c) for c in group])
            late[a][d]["seeds"] = table[a][d]["seeds"]
            if group:
                n_rounds = min(len(c["rounds"]) for c in group)
                series = np.array([[c["base"]["rougeL"]] + [r["rougeL"] for r in c["rounds"][:n_rounds]]
                                   for c in group])
                curves[a][d] = {"mean": series.mean(0).tolist(), "std": series.std(0).tolist()}
                shares = np.array([[spectrum_summary(r["spectrum"])["min_rank_share"] or 0.0
                                    for r in c["rounds"][:n_rounds]] for c in group])
                final_ret: dict[str, list[float]] = {}
                for c in group:
                    for m in c["rounds"][-1]["spectrum"].values():
                        for r, v in m["retained"].items():
                            final_ret.setdefault(r, []).append(v)
                spectrum[a][d] = {
                    "min_rank_share": shares.mean(0).tolist(),
                    "final_min_rank_share": _stats([spectrum_summary(c["rounds"][-1]["spectrum"])["min_rank_share"]
                                                    for c in group]),
                    "final_effective_rank": _stats([spectrum_summary(c["rounds"][-1]["spectrum"])["effective_rank"]
                                                    for c in group]),
                    "final_retained_by_rank": {r: float(np.mean(v)) for r, v in sorted(final_ret.items(), key=lambda kv: int(kv[0]))},
                    "collapse_warnings": [c["collapse_warning"] for c in group if c["collapse_warning"]],
                }
            for c in group:
                for f, v in c["final"]["families"].items():
                    fam_vals.setdefault(f, []).append(v)
                for r in c["rounds"]:
                    agg_vals.append(r["aggregation_s"])
                    for t in r["traffic"]:
                        slot = tr.setdefault(f"{t['type']}@{t['rank']}", {"sent": [], "received": [], "rank": t["rank"],
                                                                         "type": t["type"]})
                        slot["sent"].append(t["sent"])
                        if r["round"] > 1:          # round 1 has no global adapter to send
                            slot["received"].append(t["received"])
        families[a] = {f: _stats(v) for f, v in sorted(fam_vals.items())}
        traffic[a] = {t: {"rank": v["rank"], "type": v["type"], "sent": float(np.mean(v["sent"])),
                          "received": float(np.mean(v["received"])) if v["received"] else 0.0}
                      for t, v in sorted(tr.items())}
        agg[a] = {**_stats(agg_vals), "max": float(max(agg_vals)) if agg_vals else None}
        agg[a].pop("values", None)
    metrics = {"rougeL": table, "heldout_loss": hloss, "recall_exact": recall, "recall_loss": recall_loss}
    return {"arms": arms, "distributions": dists, "cells": len(cells), "table": table, "gain": gain, "late": late,
            "train_loss": loss, "heldout_loss": hloss, "recall_exact": recall, "recall_loss": recall_loss,
            "curves": curves, "spectrum": spectrum, "families": families, "traffic": traffic,
            "aggregation_s": agg, "claims": _claims(table, dists), "claims_late": _claims(late, dists),
            "fedit_twins": sorted((c["cell"]["key"], c["reused_from"]) for c in cells if c.get("reused_from")),
            "paired": {m: _paired_intervals(t, dists) for m, t in metrics.items()
                       if any(t[a][d]["n"] for a in arms for d in dists)}}


# t quantiles t(0.975, df) for df = 1..30 (any statistics table); beyond 30 the normal 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# (x, y): the report's paired differences x - y, the issue's questions first
COMPARISONS = (("flexlora", "hetlora"), ("flexlora", "fedit_min"), ("flexlora", "flora"), ("flexlora", "fedit_max"),
               ("flexlora_carry", "flexlora"), ("raflora", "flexlora"))


def paired_interval(diffs: Sequence[float]) -> dict:
    """Mean of seed-paired differences with its two-sided 95% t-interval (none for one pair)."""
    d = np.asarray(diffs, np.float64)
    out = {"n": int(d.size), "mean": float(d.mean()), "diffs": [float(x) for x in d]}
    if d.size > 1:
        half = _T975[d.size - 2] if d.size - 1 <= len(_T975) else 1.96
        half *= float(d.std(ddof=1)) / np.sqrt(d.size)
        out.update(lo=float(out["mean"] - half), hi=float(out["mean"] + half))
    return out


def _paired_intervals(table: Mapping, dists: Sequence[str]) -> list[dict]:
    out = []
    for x, y in COMPARISONS:
        if x not in table or y not in table:
            continue
        for d in dists:
            diffs, _ = _paired(table[x].get(d, {}), table[y].get(d, {}))
            if diffs:
                out.append({"x": x, "y": y, "distribution": d, **paired_interval(diffs)})
    return out


def _final_stats(group: Sequence[Mapping], key: str) -> dict:
    """``_stats`` of a final-round score over the group's cells, with the seeds that have it."""
    have = [c for c in group if c["final"].get(key) is not None]
    return {**_stats([c["final"][key] for c in have]), "seeds": [c["cell"]["seed"] for c in have]}


def _late_mean(cell: Mapping) -> float:
    """Mean held-out Rouge-L over the last half of the rounds (less round-to-round noise)."""
    rounds = cell["rounds"]
    tail = rounds[len(rounds) // 2:]
    return float(np.mean([r["rougeL"] for r in tail]))


def _paired(x: Mapping, y: Mapping) -> tuple[list[float], int]:
    """Per-seed differences x - y over the seeds both have, and how many are >= 0."""
    xs = dict(zip(x.get("seeds", []), x.get("values", [])))
    ys = dict(zip(y.get("seeds", []), y.get("values", [])))
    diffs = [xs[s] - ys[s] for s in sorted(set(xs) & set(ys))]
    return diffs, sum(d >= 0 for d in diffs)


def _claims(table: Mapping, dists: Sequence[str]) -> list[dict]:
    """FlexLoRA vs HetLoRA and vs smallest-rank FedIT per distribution, paired by seed."""
    out = []
    if "flexlora" not in table:
        return out
    for other in ("hetlora", "fedit_min"):
        if other not in table:
            continue
        for d in dists:
            diffs, wins = _paired(table["flexlora"].get(d, {}), table[other].get(d, {}))
            if not diffs:
                continue
            mean = float(np.mean(diffs))
            out.append({"claim": f"flexlora >= {other}", "distribution": d, "holds": mean >= 0, "diff": mean,
                        "diff_std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
                        "seed_wins": wins, "seeds": len(diffs)})
    return out


def _pm(s: Mapping, digits: int = 4) -> str:
    if not s or s.get("n", 0) == 0:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" + (f" (n={s['n']})" if s["n"] < 3 else "")


def _rank_label(label: str) -> str:
    """``4|down_proj=16,gate_proj=16,up_proj=16`` -> ``4 (down/gate/up 16)`` (no ``|`` in tables)."""
    default, _, pattern = label.partition("|")
    if not pattern:
        return default
    groups: dict[str, list[str]] = {}
    for item in pattern.split(","):
        name, _, value = item.partition("=")
        groups.setdefault(value, []).append(name.replace("_proj", ""))
    return default + " (" + "; ".join(f"{'/'.join(n)} {v}" for v, n in groups.items()) + ")"


def _kib(x: float) -> str:
    return f"{x / 1024:.1f} KiB"


def render_markdown(summary: Mapping, *, settings: Mapping | None = None, run_info: Mapping | None = None,
                    plots: Sequence[str] = ()) -> str:
    arms, dists = summary["arms"], summary["distributions"]
    L = ["# FlexLoRA vs. baselines across rank distributions", ""]
    if run_info:
        L += [f"Command: `{run_info.get('command', '?')}`", "",
              f"Wall time: {run_info.get('wall_s', 0):.0f} s ({run_info.get('ran', '?')} cells run, "
              f"{run_info.get('reused', '?')} reused); {summary['cells']} cells in this report.", ""]
    if settings:
        L += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    def table(title: str, key: str, cols: Sequence[str], intro: Sequence[str] = (), digits: int = 4) -> list[str]:
        """One ``arm x cols`` table of ``summary[key]`` (mean ± std), with its title and intro lines."""
        out = [f"## {title}", "", *intro, "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        out += [f"| {a} | " + " | ".join(_pm(summary[key][a].get(c, {}), digits) for c in cols) + " |" for a in arms]
        return out + [""]

    L += table("Held-out Rouge-L (final round, mean ± std over seeds)", "table", dists)[:-1]
    L += ["", "Arms: " + "; ".join(f"`{a}` = {ARMS[a].description}" for a in arms if a in ARMS) + ".",
          "", "FedIT ignores the devices' ranks, so with the same seed (same data and clients) its cells are "
          "identical across distributions that share the smallest (fedit_min) or largest (fedit_max) rank."
          + (" Such cells are that run, not computed again: " + "; ".join(f"`{k}` is `{src}`" for k, src in
                                                                          summary["fedit_twins"]) + "."
             if summary.get("fedit_twins") else ""), ""]
    L += table("Gain over the base model (final − base Rouge-L on the same held-out set; mean ± std over seeds)",
               "gain", dists, ["The held-out set changes with the seed (base Rouge-L varies with it); the gain "
                               "removes that.", ""])
    L += table("Held-out Rouge-L, mean over the last half of the rounds (mean ± std over seeds)", "late", dists)
    if any(summary["heldout_loss"][a][d]["n"] for a in arms for d in dists):
        L += table("Held-out loss of the global model (teacher-forced cross-entropy of the responses, final round)",
                   "heldout_loss", dists, digits=3)
    if any(summary.get("recall_exact", {}).get(a, {}).get(d, {}).get("n") for a in arms for d in dists):
        L += table("Recall of the federation's own training facts (exact, teacher-forced; final round)",
                   "recall_exact", dists, ["The share of every fact the clients hold that the global model answers "
                                           "exactly (greedy decoding would write the whole answer): what the "
                                           "central rank curve shows rank buys.", ""], digits=3)
        L += table("Loss on the federation's own training facts (teacher-forced, per answer token; final round)",
                   "recall_loss", dists, digits=3)
    if summary.get("paired"):
        names = {"rougeL": ("held-out Rouge-L", "higher is better"), "heldout_loss": ("held-out loss",
                 "lower is better"), "recall_exact": ("recall of the training facts (exact)", "higher is better"),
                 "recall_loss": ("loss on the training facts", "lower is better")}
        L += ["## Seed-paired differences with 95% intervals", "",
              "x − y per seed (same data, clients and held-out set), the mean and its two-sided 95% t-interval "
              "over the seeds both arms have; an interval that excludes 0 separates the arms.", "",
              "| metric | x − y | distribution | mean | 95% interval | per seed |", "|---|---|---|---|---|---|"]
        for m, rows in summary["paired"].items():
            label, sense = names.get(m, (m, ""))
            for r in rows:
                ci = f"[{r['lo']:+.4f}, {r['hi']:+.4f}]" if "lo" in r else "— (one seed)"
                L.append(f"| {label} ({sense}) | {r['x']} − {r['y']} | {r['distribution']} | {r['mean']:+.4f} | "
                         f"{ci} | {', '.join(f'{v:+.4f}' for v in r['diffs'])} |")
        L.append("")
    L += table("Clients' local training loss in the final round (example-weighted; mean ± std over seeds)",
               "train_loss", dists, ["A less noisy signal than held-out generation: how well each arm's starting "
                                     "point lets clients fit their own data.", ""], digits=3)
    if summary["claims"]:
        L += ["## Does FlexLoRA match or beat HetLoRA and smallest-rank FedIT?", "",
              "Paired by seed (same data, clients and held-out set): mean ± std of the per-seed difference "
              "in held-out Rouge-L, and the seeds where FlexLoRA is at least as good.", "",
              "| claim | distribution | holds (final) | diff (final) | seeds (final) | holds (last half) | "
              "diff (last half) | seeds (last half) |", "|---|---|---|---|---|---|---|---|"]
        for c, cl in zip(summary["claims"], summary["claims_late"]):
            L.append(f"| {c['claim']} | {c['distribution']} | {'yes' if c['holds'] else '**no**'} | "
                     f"{c['diff']:+.4f} ± {c['diff_std']:.4f} | {c['seed_wins']}/{c['seeds']} | "
                     f"{'yes' if cl['holds'] else '**no**'} | {cl['diff']:+.4f} ± {cl['diff_std']:.4f} | "
                     f"{cl['seed_wins']}/{cl['seeds']} |")
        L.append("")
    fams = sorted({f for a in arms for f in summary["families"][a]})
    if fams:
        L += table("Per task family (held-out Rouge-L, final round, mean ± std over all distributions and seeds)",
                   "families", fams, digits=3)
    L += ["## Traffic per client and round (wire bytes: safetensors + JSON header, float32)", "",
          "Sent = the client's encoded update; received = the encoded global factors (rounds >= 2).", "",
          "| arm | client type | trains at rank | sent | received |", "|---|---|---|---|---|"]
    for a in arms:
        for t, v in summary["traffic"][a].items():
            L.append(f"| {a} | {v['type']} | {_rank_label(v['rank'])} | {_kib(v['sent'])} | {_kib(v['received'])} |")
    L += [""] + paper_scale_traffic()
    L += ["", "## Server aggregation time per round (add + finalize, all rounds of all cells)", "",
          "| arm | mean ± std (ms) | max (ms) | rounds |", "|---|---|---|---|"]
    for a in arms:
        s = summary["aggregation_s"][a]
        if s["n"]:
            L.append(f"| {a} | {s['mean'] * 1e3:.2f} ± {s['std'] * 1e3:.2f} | {s['max'] * 1e3:.2f} | {s['n']} |")
    L += ["", "## Spectrum diagnostic (final round)", "",
          "Share of ||dW||_F^2 a client at the smallest rank retains (mean over seeds and over the modules "
          "where clients use more than one rank), the "
          "effective rank of dW, and the retained share at each client rank. FedIT arms are homogeneous.", "",
          "| arm | distribution | smallest-rank share | effective rank | retained by rank | collapse warnings |",
          "|---|---|---|---|---|---|"]
    warnings = []
    for a in arms:
        for d in dists:
            s = summary["spectrum"][a].get(d)
            if not s:
                continue
            ret = ", ".join(f"r{r}: {v:.2f}" for r, v in s["final_retained_by_rank"].items())
            L.append(f"| {a} | {d} | {_pm(s['final_min_rank_share'], 3)} | {_pm(s['final_effective_rank'], 2)} | "
                     f"{ret} | {len(s['collapse_warnings'])} |")
            warnings += [f"{a} / {d}: {w}" for w in s["collapse_warnings"]]
    if warnings:
        L += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(L) + "\n"


def paper_scale_traffic(model: str = "llama-1.3b", clients_per_round: int | None = None) -> list[str]:
    """Markdown lines: float32 factor bytes per client type at the paper's scale (workloads.json),
    and the FLoRA stack every client downloads for each rank distribution's expected mix."""
    from server.workloads.catalog import load_workloads

    wl = load_workloads()
    m = wl["models"][model]
    per = clients_per_round or wl["rounds"]["paper"]["clients_per_round"]
    attn_io = 2 * m["hidden"] + 2 * m["hidden"] + 2 * (m["hidden"] + m["kv_dim"])   # q,o + k,v (in+out)
    ffn_io = 3 * (m["hidden"] + m["ffn"])                                           # gate, up, down
    size = {t: 4 * m["layers"] * (v["attn"] * attn_io + v["ffn"] * ffn_io) for t, v in wl["client_types"].items()}
    lines = [f"At the paper's scale ({model}: {m['layers']} layers, hidden {m['hidden']}, FFN {m['ffn']}; float32 "
             f"factors on q,k,v,o,gate,up,down; {per} clients per round) a client sends, and under FlexLoRA or "
             "HetLoRA receives, its own adapter:", "",
             "| client type | adapter (MiB) |", "|---|---|"]
    lines += [f"| {t} | {b / 2**20:.0f} |" for t, b in size.items()]
    lines += ["", f"FLoRA sends every client the whole stack of the round, {per} x the mean adapter:", "",
              "| distribution | FLoRA download per client and round (GiB) |", "|---|---|"]
    for d, shares in wl["rank_distributions"].items():
        mean = sum(shares[t] * size[t] for t in shares) / sum(shares.values())
        lines.append(f"| {d} | {per * mean / 2**30:.1f} |")
    return lines


def summarize_dir(out: str | Path) -> dict:
    return summarize(load_cells(out))


def write_report(out: str | Path, *, plots: bool = True, run_info: Mapping | None = None) -> list[Path]:
    """Write ``report.md``, ``summary.json`` (and PNGs) into ``out``; returns the paths."""
    out = Path(out)
    cells = load_cells(out)
    if not cells:
        raise ValueError(f"{out}: no finished cells to report on")
    summary = summarize(cells)
    info_path = out / "run_info.json"
    if run_info is not None:
        write_json_atomic(info_path, dict(run_info))
    elif info_path.exists():
        run_info = load_cell(info_path)
    settings = load_cell(out / "experiment.json").get("settings") if (out / "experiment.json").exists() else None
    paths = [out / "summary.json", out / "report.md"]
    images: list[str] = []
    if plots:
        from server.runtimes.experiments.plots import plot_rouge, plot_spectrum
        images = [plot_rouge(summary, out / "rouge_over_rounds.png").name,
                  plot_spectrum(summary, out / "spectrum.png").name]
        paths += [out / p for p in images]
    write_json_atomic(out / "summary.json", summary)
    (out / "report.md").write_text(render_markdown(summary, settings=settings, run_info=run_info, plots=images),
                                   encoding="utf-8")
    return paths
