from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _prereqs import ag_news, fashion_mnist

from fwdfleet.errors import DataError
from fwdfleet.fleet.datasets import FASHION_DIR, DatasetConfig, load_split, subset


def test_digits_default_split():
    d = load_split(DatasetConfig())
    assert d.num_classes == 10
    assert d.train.features is not None and d.train.features.shape[1] == 64
    assert d.train.labels is not None and d.test.labels is not None
    assert len(d.train.labels) + len(d.test.labels) == 1797
    assert float(d.train.features.min()) >= 0.0 and float(d.train.features.max()) <= 1.0
    capped = load_split(DatasetConfig(max_train=100, max_test=50))
    assert capped.train.labels is not None and len(capped.train.labels) == 100


def test_shipped_digits_are_scikit_learns():
    # fleet/digits.npz (scripts/make_digits_npz.py) replaces load_digits so the demo needs no scikit-learn
    from sklearn.datasets import load_digits

    from fwdfleet.fleet.datasets import DIGITS_FILE

    x, y = load_digits(return_X_y=True)
    with np.load(DIGITS_FILE, allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and z["labels"].dtype == np.uint8
        np.testing.assert_array_equal(z["images"], x)
        np.testing.assert_array_equal(z["labels"], y)


def test_ag_news_is_zero_based_text():
    d = load_split(DatasetConfig(name="ag-news", path=str(ag_news()), max_train=200))
    assert d.label_names[1] == "Sports"
    assert d.train.texts is not None and len(d.train.texts) == 200
    assert d.train.labels is not None and set(np.unique(d.train.labels)) <= {0, 1, 2, 3}
    s = subset(d.train, np.array([0, 5]))
    assert s.texts == (d.train.texts[0], d.train.texts[5])


def test_fashion_mnist_from_the_system_package():
    """The apt package's IDX files, read by the device runtime's loader: the official 60,000/10,000 split."""
    assert fashion_mnist() == FASHION_DIR  # the dataset's default location is where apt puts it
    d = load_split(DatasetConfig(name="fashion-mnist"))
    assert d.num_classes == 10 and d.label_names[9] == "Boot"
    assert d.train.features is not None and d.test.features is not None
    assert d.train.features.shape == (60000, 784) and d.test.features.shape == (10000, 784)
    assert d.train.features.dtype == np.float32
    assert float(d.train.features.min()) == 0.0 and float(d.train.features.max()) == 1.0  # bytes / 255
    assert d.train.labels is not None and d.test.labels is not None
    assert np.bincount(d.train.labels).tolist() == [6000] * 10 and np.bincount(d.test.labels).tolist() == [1000] * 10


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_split(DatasetConfig(name="fashion-mnist", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="needs `path`"):
        load_split(DatasetConfig(name="mnist"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no 'label' column"):
        load_split(DatasetConfig(name="file", path=str(bad)))


def test_an_idx_folder_with_one_split_is_split_by_seed(tmp_path: Path) -> None:
    import gzip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, size=50).astype(np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (50).to_bytes(4, "big") + (4).to_bytes(4, "big") * 2 + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (50).to_bytes(4, "big") + labels.tobytes())
    a = load_split(DatasetConfig(name="mnist", path=str(tmp_path), test_fraction=0.2, seed=1))
    b = load_split(DatasetConfig(name="mnist", path=str(tmp_path), test_fraction=0.2, seed=2))
    assert a.train.labels is not None and a.test.labels is not None and b.test.features is not None
    assert (a.train.labels.size, a.test.labels.size) == (40, 10)
    assert a.test.features is not None and not np.array_equal(a.test.features, b.test.features)  # the seed decides
