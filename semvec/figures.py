"""Pictures a person would rather look at than read, as PNG bytes: training's learning curves, a
confusion matrix, a per-label bar chart, and (for semvec.plot) the figure and colours of a map.

Figures are drawn on matplotlib's Agg canvas directly: no pyplot, so no global backend switch and
no shared figure registry in a process (a notebook) that calls semvec; nothing here writes a file.
"""

from __future__ import annotations

import io

import numpy as np

from semvec.errors import ConfigError


def require() -> None:
    """A one-line error, before any work, where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("pictures need matplotlib: pip install matplotlib") from None


def figure(width: float, height: float, dpi: int = 100):
    """A new matplotlib Figure on its own Agg canvas."""
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> bytes:
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png")
    return sink.getvalue()


def colours(n: int) -> list[tuple]:
    """n distinct colours, none grey (grey is what a plot leaves uncoloured): a qualitative palette
    up to 20 (tab10 up to 9, tab20 with two of tab20b for its greys), evenly spaced hues beyond."""
    from matplotlib import colormaps

    def rgb(palette: str, index: int) -> tuple:
        return colormaps[palette](index)

    if n <= 9:
        return [rgb("tab10", i) for i in range(10) if i != 7][:n]  # 7: grey
    if n <= 20:
        kept = [rgb("tab20", i) for i in range(20) if i not in (14, 15)]  # 14, 15: greys
        return (kept + [rgb("tab20b", 0), rgb("tab20b", 16)])[:n]
    palette = colormaps["turbo"].resampled(n)
    return [palette(i) for i in range(n)]


def learning_curves(history: dict[str, list[tuple[int, float]]], losses: tuple[str, ...], metric: str,
                    title: str) -> bytes:
    """Two panels over optimizer steps: the training losses logged, and the dev metric at each
    evaluation."""
    fig = figure(10, 4)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for ax, names in ((loss_ax, losses), (metric_ax, (metric,))):
        drawn = False
        for name in names:
            points = history.get(name) or []
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif len(names) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss" if len(names) > 1 else names[0])
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return png(fig)


def _label_font(n: int, inches: float) -> float:
    """Points for n tick labels along `inches`: 8 while they fit, smaller only past the size cap."""
    return float(min(8.0, 0.8 * 72 * inches / max(n, 1)))


def confusion_matrix(confusion: dict, title: str) -> bytes:
    """Rows (gold) scaled to sum to 1, so a rare label's mistakes show as plainly as a common one's;
    a square-root colour scale, so a mistake of a few percent is not white beside the diagonal.
    Each row's count beside its name."""
    from matplotlib.colors import PowerNorm

    labels, counts = confusion["labels"], np.asarray(confusion["matrix"], dtype=float)
    share = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    n = len(labels)
    side = min(max(4.0, 0.16 * n + 2.5), 30.0)
    font = _label_font(n, side - 2.5)
    fig = figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), [f"{lab} ({int(c)})" for lab, c in zip(labels, counts.sum(axis=1), strict=True)],
                  fontsize=font)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold (examples)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the gold row")
    return png(fig)


def ranked_labels(per_label: dict[str, dict]) -> list[str]:
    """Labels from the worst F1 to the best (ties by name); labels without dev examples left out."""
    held = [(v["f1"], lab) for lab, v in per_label.items() if v["support"] > 0]
    return [lab for _, lab in sorted(held)]


def per_label(per_label: dict[str, dict], title: str) -> bytes:
    """F1 of each label with dev examples, the worst at the top, its support beside its name."""
    ranked = ranked_labels(per_label)
    absent = len(per_label) - len(ranked)
    n = max(len(ranked), 1)
    height = min(max(3.0, 0.16 * n + 1.5), 30.0)
    fig = figure(8, height)
    ax = fig.subplots()
    ax.barh(range(len(ranked)), [per_label[lab]["f1"] for lab in ranked], color="tab:blue")
    ax.set_yticks(range(len(ranked)), [f"{lab} ({per_label[lab]['support']})" for lab in ranked],
                  fontsize=_label_font(n, height - 1.5))
    ax.invert_yaxis()  # the first (worst) label on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (dev examples in brackets)"
                  + (f"; {absent} label(s) without dev examples not shown" if absent else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return png(fig)
