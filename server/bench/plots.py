"""PNG plots: time against size per backend, and the accuracy/speed frontier (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from server.bench.report import by_case
from server.bench.runner import FORMATION


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _group(rec: dict) -> str:
    s = rec["spec"]
    return f"dense {s['spectrum']}" if s["kind"] == "dense" else f"LoRA sum {s['rank_mix']}"


def plot_time_vs_size(result: dict, path: Path) -> Path:
    plt = _plt()
    ok = [r for r in result["records"] if r["status"] == "ok"]
    groups = sorted({_group(r) for r in ok})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rows = [r for r in ok if _group(r) == g]
        for name in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["shape"][0] * r["shape"][1], r["time_s"]) for r in rows if r["backend"] == name)
            style = "--" if name == FORMATION else ("-" if name.startswith("ours") else ":")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="d_out x d_in (elements)", ylabel="median time (s)", title=g)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(result: dict, path: Path) -> Path:
    """Per case: excess error over the optimum (err/opt - 1, log) against time; lower-left is better."""
    plt = _plt()
    cases = [(c, rows) for c, rows in by_case(result["records"]).items()
             if any(r["status"] == "ok" and r.get("err_ratio") is not None for r in rows)]
    n = max(1, len(cases))
    cols = min(n, 3)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4 * rows_n), squeeze=False)
    for ax, (case, rows) in zip(axes.flat, cases):
        for r in rows:
            if r["status"] != "ok" or r.get("err_ratio") is None:
                continue
            excess = max(r["err_ratio"] - 1.0, 1e-8)
            ax.scatter(r["time_s"], excess, marker="*" if r["family"] == "ours" else "o", s=70 if r["family"] == "ours" else 30)
            ax.annotate(r["backend"], (r["time_s"], excess), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel="median time (s)", ylabel="err/opt - 1 (floor 1e-8)")
        ax.set_title(case, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict, directory: str | Path, prefix: str = "bench_svd") -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return [plot_time_vs_size(result, d / f"{prefix}_time_vs_size.png"),
            plot_frontier(result, d / f"{prefix}_frontier.png")]
