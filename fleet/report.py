"""Reports of an emulated run: JSON lines, PNG plots (matplotlib) and one HTML page.

Plots: accuracy against rounds, against uplinked bytes and against simulated fleet time; K
and pacing (extra requests, noise) over rounds; participation, dropouts and stragglers;
peak memory per device (inference vs training step, and torch backprop where measured).
"""

from __future__ import annotations

import html
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.fleet.emulate import RoundRecord


def write_jsonl(records: Sequence[RoundRecord], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
    return path


PLOTS_HINT = "plots need matplotlib: pip install matplotlib (or 'fwdfleet[fleet]')"


def can_plot() -> bool:
    """Whether matplotlib is installed (the fleet extra); without it reports have tables only."""
    return importlib.util.find_spec("matplotlib") is not None


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(records: Sequence[RoundRecord], path: Path, *, initial: tuple[float, float | None] | None = None,
                  full_axis: bool = False) -> Path:
    """Test accuracy (and macro-F1 where measured) against rounds, uplinked bytes and simulated time,
    from round 0 when ``initial`` (accuracy, macro-F1 of the initial model) is given; ``full_axis``
    fixes the y axis at 0-100% instead of zooming onto the curve."""
    plt = _plt()
    pts = [r for r in records if r.accuracy is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
    up = np.cumsum([r.bytes_up for r in records])
    up_at = {r.model_version: up[i] for i, r in enumerate(records)}
    start: list[float] = [] if initial is None else [0.0]
    rounds = start + [float(r.model_version) for r in pts]
    kib = start + [up_at[r.model_version] / 1024 for r in pts]
    minutes = start + [r.sim_time_s / 60 for r in pts]
    acc = ([] if initial is None else [100 * initial[0]]) + [100 * (r.accuracy or 0) for r in pts]
    f1_start = [] if initial is None else [np.nan if initial[1] is None else 100 * initial[1]]
    f1 = f1_start + [np.nan if r.macro_f1 is None else 100 * r.macro_f1 for r in pts]
    has_f1 = any(np.isfinite(f1))
    for ax, x, label in ((axes[0], rounds, "round"), (axes[1], kib, "uplinked KiB, whole fleet"),
                         (axes[2], minutes, "simulated fleet time (min)")):
        ax.plot(x, acc, marker=".", label="accuracy")
        if has_f1:
            ax.plot(x, f1, marker=".", label="macro-F1")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if full_axis:
            ax.set_ylim(0, 100)
    axes[0].set_ylabel("test accuracy / macro-F1 (%)" if has_f1 else "test accuracy (%)")
    if has_f1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rounds(records: Sequence[RoundRecord], path: Path) -> Path:
    plt = _plt()
    v = [r.model_version for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    axes[0].step(v, [r.k for r in records], where="mid", label="K (perturbations per device)")
    axes[0].bar(v, [r.extra_requests for r in records], color="tab:orange", alpha=0.6, label="pacing: extra requests")
    noise = [r.noise_ratio if r.noise_ratio is not None else np.nan for r in records]
    ax2 = axes[0].twinx()
    ax2.plot(v, noise, color="tab:green", alpha=0.7, label="noise ratio")
    ax2.set_ylabel("noise ratio")
    axes[0].set_xlabel("round")
    axes[0].legend(loc="upper left", fontsize=7)
    axes[1].plot(v, [r.participants for r in records], label="participants")
    axes[1].plot(v, [r.dropouts for r in records], label="dropouts")
    axes[1].plot(v, [r.stragglers for r in records], label="stragglers")
    axes[1].set_xlabel("round")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory(memory: Mapping[str, float | None], path: Path) -> Path:
    plt = _plt()
    names = [k for k, val in memory.items() if val is not None]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.barh(names, [memory[k] or 0.0 for k in names], color=["tab:blue", "tab:green", "tab:red"][: len(names)])
    ax.set_xlabel("peak RSS per device (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_figure(key: str, value: Any) -> str:
    """A summary figure rounded, with its unit: shares as %, bytes as B/KiB/MiB, seconds, MB."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    k = key.lower()
    if "accuracy" in k or "f1" in k:
        return f"{100 * value:.2f}%"
    if "bytes" in k:
        for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(value) >= size:
                return f"{value / size:,.1f} {unit}"
        return f"{value:,.0f} B"
    if "seconds" in k:
        return f"{value:,.1f} s" if value < 120 else f"{value / 60:,.1f} min"
    if k.endswith("_mb"):
        return f"{value:,.0f} MB"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3g}"


def write_html(out_dir: Path, title: str, summary: Mapping[str, Any], images: Sequence[Path],
               note: str = "") -> Path:
    rows = "".join(
        f"<tr><th>{html.escape(str(k).replace('_', ' '))}</th><td>{html.escape(format_figure(str(k), v))}</td></tr>"
        for k, v in summary.items()
    )
    imgs = "".join(f'<p><img src="{html.escape(p.name)}" style="max-width:100%"></p>' for p in images)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}th{text-align:left;padding-right:1em}"
        "td,th{border-bottom:1px solid #ddd;padding:3px}</style>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>{imgs}"
        + (f"<p>{html.escape(note)}</p>" if note else "") +
        "<p>Rounds as JSON lines: <a href='rounds.jsonl'>rounds.jsonl</a>.</p>"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_report(out_dir: Path, title: str, records: Sequence[RoundRecord], summary: Mapping[str, Any],
                 memory: Mapping[str, float | None] | None = None, extra_images: Sequence[Path] = (), *,
                 initial: tuple[float, float | None] | None = None, full_axis: bool = False) -> Path:
    """Write rounds.jsonl, the plots and report.html into ``out_dir``; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, out_dir / "rounds.jsonl")
    if not can_plot():
        return write_html(out_dir, title, summary, [], note=PLOTS_HINT)
    images = [*extra_images]
    if records:
        images += [plot_accuracy(records, out_dir / "accuracy.png", initial=initial, full_axis=full_axis),
                   plot_rounds(records, out_dir / "rounds.png")]
    if memory:
        images.append(plot_memory(memory, out_dir / "memory.png"))
    return write_html(out_dir, title, summary, images)
