"""Output: the terminal / markdown table with a verdict per case, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict

from server.bench.runner import FORMATION

COLUMNS = ("backend", "time s", "IQR", "GFLOP/s", "err/opt", "σ rel err", "peak MiB", "notes")
CSV_FIELDS = ("case", "backend", "family", "device", "status", "d_out", "d_in", "rank", "time_s", "kernel_s",
              "iqr_rel", "repeats", "gflops", "flops", "err_ratio", "err_rel", "sigma_rel", "accurate",
              "peak_bytes", "peak_method", "route", "formation", "reason")


def by_case(records: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in records:
        groups.setdefault(r["case"], []).append(r)
    return groups


def fmt(x, spec: str, missing: str = "-") -> str:
    """``format(x, spec)``, or ``missing`` for None."""
    return missing if x is None else format(x, spec)


def markdown_table(columns, rows, align: str = "") -> list[str]:
    """Lines of a markdown table; ``align`` has one letter a column, ``l`` (default) or ``r``."""
    align = align.ljust(len(columns), "l")
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(str(c) for c in row) + " |" for row in (columns, rule, *rows)]


def _row(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["backend"], "-", "-", "-", "-", "-", "-", f"{r['status']}: {r.get('reason', '')}"]
    notes = []
    if r.get("route"):
        notes.append(f"route={r['route']}")
    if r.get("formation"):
        notes.append(r["formation"])
    if r.get("note"):
        notes.append(r["note"])
    if r["backend"] != FORMATION and not r.get("accurate", False):
        notes.append("not within tolerance")
    ratio = r.get("err_ratio")
    err = f"{ratio:.6f}" if ratio is not None else (f"rel {r['err_rel']:.1e}" if r.get("err_rel") is not None else "-")
    mem = r.get("peak_bytes")
    return [r["backend"], f"{r['time_s']:.4f}", f"{100 * r['iqr_rel']:.0f}%", fmt(r.get("gflops"), ".1f"),
            err, fmt(r.get("sigma_rel"), ".1e"), fmt(None if mem is None else mem / 2**20, ".0f"), "; ".join(notes)]


def verdict(rows: list[dict]) -> str:
    """One line saying whether our routes lead on this case, among results within tolerance."""
    ok = [r for r in rows if r["status"] == "ok" and r["backend"] != FORMATION]
    if not ok:
        return "no backend ran"
    fastest = min(ok, key=lambda r: r["time_s"])
    good = [r for r in ok if r.get("accurate")]
    ours = [r for r in good if r["family"] == "ours"]
    others = [r for r in good if r["family"] != "ours"]
    parts = [f"fastest: {fastest['backend']} {fastest['time_s']:.4f} s"]
    if ours and others:
        bo, bt = min(ours, key=lambda r: r["time_s"]), min(others, key=lambda r: r["time_s"])
        ratio = bt["time_s"] / bo["time_s"]
        word = "LEADS" if ratio >= 1 else "TRAILS"
        parts.append(f"within tolerance, ours {word}: {bo['backend']} {bo['time_s']:.4f} s vs "
                     f"{bt['backend']} {bt['time_s']:.4f} s ({ratio:.2f}x)")
    elif others:
        ran = any(r["family"] == "ours" for r in ok)
        parts.append(f"best within tolerance: {min(others, key=lambda r: r['time_s'])['backend']}"
                     + ("; no route of ours within tolerance" if ran else "; ours not run"))
    elif ours:
        parts.append(f"only ours within tolerance: {min(ours, key=lambda r: r['time_s'])['backend']}")
    form = next((r for r in rows if r["backend"] == FORMATION), None)
    if form is not None:
        inc = any(r.get("formation") == "formation included" for r in ok)
        parts.append(f"dense backends {'include' if inc else 'exclude'} forming dW ({form['time_s']:.4f} s)")
    return "; ".join(parts)


def _table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(markdown_table(COLUMNS, [[c.replace("|", "/") for c in row] for row in rows]))
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *rows)]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_results(result: dict, *, markdown: bool = False, accurate_ratio: float = 1.01) -> str:
    out = []
    for case, rows in by_case(result["records"]).items():
        head = f"### {case}" if markdown else f"== {case}"
        out += [head, "", _table([_row(r) for r in rows], markdown), "", verdict(rows), ""]
    if result.get("skipped"):
        out.append("Skipped backends:" if not markdown else "Skipped backends:\n")
        out += [f"- {s['backend']}: {s['reason']}" for s in result["skipped"]]
        out.append("")
    out.append(f"Tolerance: err/opt <= {accurate_ratio} (or ||M - USVt||/||M|| <= 1e-4 when rank(M) <= k). "
               "Times are medians after a warm-up; IQR is the interquartile range over the median.")
    return "\n".join(out)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in result["records"]:
        row = dict(r)
        row["d_out"], row["d_in"] = r["shape"]
        row["repeats"] = r.get("timing", {}).get("repeats")
        w.writerow(row)
    return buf.getvalue()
