"""PNG plots of a grid summary (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["plot_rouge", "plot_spectrum"]

_STYLE = {"fedit_min": ("tab:gray", "--"), "fedit_max": ("black", ":"), "hetlora": ("tab:orange", "-"),
          "flora": ("tab:green", "-"), "flexlora": ("tab:blue", "-")}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(plt, n: int, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(3.6 * n, 3.2 * rows), squeeze=False)
    return fig, axes


def _legend(fig, axes) -> None:
    """One legend for the figure with every arm that appears in any panel."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=len(seen), fontsize=8,
                   frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()


def plot_rouge(summary: Mapping, path: str | Path) -> Path:
    """Held-out Rouge-L over rounds (round 0 = base model), one panel per distribution,
    mean over seeds with a +- std band."""
    import numpy as np

    plt = _pyplot()
    dists = summary["distributions"]
    fig, axes = _grid(plt, len(dists))
    for ax, d in zip(axes[0], dists):
        for a in summary["arms"]:
            c = summary["curves"][a].get(d)
            if not c:
                continue
            mean, std = np.asarray(c["mean"]), np.asarray(c["std"])
            x = np.arange(mean.size)
            color, ls = _STYLE.get(a, (None, "-"))
            ax.plot(x, mean, ls, color=color, label=a, lw=1.6)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12, lw=0)
        ax.set_title(d, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out Rouge-L")
    _legend(fig, axes)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectrum(summary: Mapping, path: str | Path) -> Path:
    """Top row: share of ||dW||_F^2 retained at the smallest client rank over rounds, per
    heterogeneous arm (a value near 1 is rank collapse). Bottom row: final-round retained
    share at every client rank, mean over modules and seeds."""
    plt = _pyplot()
    dists = summary["distributions"]
    hetero = [a for a in summary["arms"] if not a.startswith("fedit")]
    fig, axes = _grid(plt, len(dists), rows=2)
    for j, d in enumerate(dists):
        top, bottom = axes[0][j], axes[1][j]
        for a in hetero:
            s = summary["spectrum"][a].get(d)
            if not s:
                continue
            color, ls = _STYLE.get(a, (None, "-"))
            y = s["min_rank_share"]
            top.plot(range(1, len(y) + 1), y, ls, color=color, marker="o", ms=3, label=a)
            ranks = sorted(s["final_retained_by_rank"], key=int)
            bottom.plot([int(r) for r in ranks], [s["final_retained_by_rank"][r] for r in ranks], ls,
                        color=color, marker="o", ms=3, label=a)
        top.axhline(0.9, color="red", lw=0.8, ls=":")
        top.set_title(d, fontsize=10)
        top.set_xlabel("round")
        top.set_ylim(0, 1.02)
        bottom.set_xlabel("client rank")
        bottom.set_ylim(0, 1.02)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].set_ylabel("share at smallest rank")
    axes[1][0].set_ylabel("retained share (final)")
    _legend(fig, axes[:1])
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
