"""Timeline plot of a PFF run: which node trained which layer when (PFF paper, figures 4 and 5).

One row per node; a bar per task from its start to its end, coloured by layer and labelled
``L{layer}.{chapter}``; the lighter first part of a bar is computing the layer's input from the
layers below, the solid rest is training. The gaps are the node's idle time. A red cross marks
a node restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fwdfleet.pff.run import TimelineRow


def plot_timeline(rows: Sequence[TimelineRow], path: str | Path, *, num_nodes: int | None = None,
                  title: str = "", restarts: Sequence[dict[str, Any]] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    nodes = num_nodes if num_nodes is not None else 1 + max((r.node for r in rows), default=0)
    layers = 1 + max((r.layer for r in rows), default=0)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.7 * nodes))
    span = max((r.end for r in rows), default=1.0)
    for r in rows:
        width = r.end - r.start
        color = colors(r.layer % 10)
        inp = min(r.input_seconds, width)
        ax.barh(r.node, inp, left=r.start, height=0.6, color=color, alpha=0.35, edgecolor="none")
        ax.barh(r.node, width - inp, left=r.start + inp, height=0.6, color=color, edgecolor="black", linewidth=0.4)
        if width > span / 60:
            ax.text(r.start + width / 2, r.node, f"L{r.layer}.{r.chapter}", ha="center", va="center", fontsize=7)
    for ev in restarts:
        ax.scatter([ev["run_time"]], [ev["node"]], marker="x", color="red", s=60, zorder=5)
    ax.set_yticks(range(nodes), [f"node {n}" for n in range(nodes)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first task started")
    handles = [Patch(color=colors(i % 10), label=f"layer {i}") for i in range(layers)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "PFF timeline")
    ax.set_xlim(0, span * 1.01)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
