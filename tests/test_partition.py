from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.fleet.partition import PartitionConfig, label_histogram, partition, plot_label_distribution

LABELS = np.repeat(np.arange(10), 60)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_disjoint_cover_and_reproducible(scheme):
    cfg = PartitionConfig(scheme=scheme, num_devices=12, seed=3)
    parts = partition(LABELS, cfg)
    assert len(parts) == 12
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(LABELS.size))
    again = partition(LABELS, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, PartitionConfig(scheme=scheme, num_devices=12, seed=4))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_skew_ordering():
    def classes_seen(cfg):
        hist = label_histogram(LABELS, partition(LABELS, cfg), 10)
        return float(np.mean((hist > 0).sum(axis=1)))

    iid = classes_seen(PartitionConfig("iid", 10))
    skewed = classes_seen(PartitionConfig("dirichlet", 10, alpha=0.1))
    patho = classes_seen(PartitionConfig("pathological", 10, classes_per_device=2))
    assert iid == 10.0
    assert skewed < 8
    assert patho <= 3


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="scheme"):
        PartitionConfig(scheme="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        PartitionConfig(alpha=0)
    with pytest.raises(ValueError, match="fewer devices"):
        partition(LABELS[:5], PartitionConfig(num_devices=10))


def test_plot(tmp_path):
    hist = label_histogram(LABELS, partition(LABELS, PartitionConfig("dirichlet", 8)), 10)
    out = plot_label_distribution(hist, str(tmp_path / "labels.png"))
    assert (tmp_path / "labels.png").stat().st_size > 1000 and out.endswith("labels.png")
