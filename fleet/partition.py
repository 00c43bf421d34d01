"""Split a labelled dataset across devices: IID, Dirichlet(alpha), pathological (c classes each).

Every partition is a pure function of the labels, the device count and one seed, so a run
is reproducible. The result is a list of index arrays, one per device, disjoint, covering
every sample exactly once (pathological may leave out classes nobody drew; it says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Scheme = Literal["iid", "dirichlet", "pathological"]
SCHEMES: tuple[Scheme, ...] = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class PartitionConfig:
    scheme: Scheme = "iid"
    num_devices: int = 20
    alpha: float = 0.5  # Dirichlet concentration: smaller is more skewed
    classes_per_device: int = 2  # pathological
    min_samples: int = 1  # every device gets at least this many samples
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"PartitionConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.num_devices < 1:
            raise ValueError(f"PartitionConfig.num_devices must be >= 1, got {self.num_devices}")
        if not self.alpha > 0:
            raise ValueError(f"PartitionConfig.alpha must be > 0, got {self.alpha}")
        if self.classes_per_device < 1:
            raise ValueError(f"PartitionConfig.classes_per_device must be >= 1, got {self.classes_per_device}")
        if self.min_samples < 0:
            raise ValueError(f"PartitionConfig.min_samples must be >= 0, got {self.min_samples}")


def partition(labels: np.ndarray, config: PartitionConfig) -> list[np.ndarray]:
    """Index arrays, one per device, for ``labels`` (1-D integer array)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if config.num_devices * config.min_samples > labels.size:
        raise ValueError(
            f"{labels.size} samples cannot give {config.num_devices} devices {config.min_samples} each; "
            "use fewer devices"
        )
    rng = np.random.default_rng(config.seed)
    if config.scheme == "iid":
        parts = np.array_split(rng.permutation(labels.size), config.num_devices)
    elif config.scheme == "dirichlet":
        parts = _dirichlet(labels, config, rng)
    else:
        parts = _pathological(labels, config, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, config: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    # Re-draw until every device has min_samples (the usual approach, e.g. in FedLab / Flower datasets).
    for _ in range(1000):
        buckets: list[list[int]] = [[] for _ in range(config.num_devices)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(config.num_devices, config.alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
            for dev, chunk in enumerate(np.split(idx, cuts)):
                buckets[dev].extend(chunk.tolist())
        if min(len(b) for b in buckets) >= config.min_samples:
            return [np.array(b, dtype=np.int64) for b in buckets]
    raise ValueError(
        f"Dirichlet(alpha={config.alpha}) could not give every one of {config.num_devices} devices "
        f"{config.min_samples} samples in 1000 draws; raise alpha or lower min_samples"
    )


def _pathological(labels: np.ndarray, config: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    # McMahan et al.'s shards: sort by label, cut into num_devices * c shards, deal c shards each.
    order = np.argsort(labels + rng.random(labels.size) * 0.5, kind="stable")  # by label, shuffled within
    shards = np.array_split(order, config.num_devices * config.classes_per_device)
    deal = rng.permutation(len(shards))
    return [
        np.concatenate([shards[s] for s in deal[d * config.classes_per_device : (d + 1) * config.classes_per_device]])
        for d in range(config.num_devices)
    ]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """Counts of each class on each device: shape (num_devices, num_classes)."""
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    return np.stack([np.bincount(labels[p], minlength=k) for p in parts])


def plot_label_distribution(hist: np.ndarray, path: str, title: str = "") -> str:
    """A stacked bar chart of the label distribution per device (needs the fleet extra's matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * hist.shape[0]), 3.5))
    bottom = np.zeros(hist.shape[0])
    cmap = plt.get_cmap("tab10" if hist.shape[1] <= 10 else "tab20")
    for c in range(hist.shape[1]):
        ax.bar(np.arange(hist.shape[0]), hist[:, c], bottom=bottom, color=cmap(c % cmap.N), label=str(c), width=0.9)
        bottom += hist[:, c]
    ax.set_xlabel("device")
    ax.set_ylabel("samples")
    ax.set_title(title or "label distribution per device")
    ax.legend(title="class", ncol=2, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
