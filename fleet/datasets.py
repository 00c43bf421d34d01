"""Named datasets for fleet emulation, each with a train and a test split.

| name | source |
| --- | --- |
| ``digits`` | scikit-learn's 1,797 8x8 digits, shipped as ``fleet/digits.npz`` (needs no scikit-learn) |
| ``fashion-mnist`` | IDX files; default ``/usr/share/datasets/fashion-mnist`` (apt ``dataset-fashion-mnist``) |
| ``mnist`` | IDX files in ``path`` (``train-*``, ``t10k-*``; ``train-*`` only: a seeded ``test_fraction`` held out) |
| ``ag-news`` | a CSV in AG News's layout (``label,title,description``, labels 1..4) |
| ``file`` | any file :func:`device_runtime.data.read_data` reads (CSV, .npz, IDX), split by ``test_fraction`` |

The files are read by the device runtime's own loaders, so a fleet sees data exactly as a
device would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fwdfleet.device_runtime.data import RawData, read_data
from fwdfleet.errors import DataError

NAMES = ("digits", "fashion-mnist", "mnist", "ag-news", "file")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# scikit-learn's digits (BSD-3-Clause, the UCI optical digits test set), 45 kB compressed;
# regenerated from scikit-learn by scripts/make_digits_npz.py
DIGITS_FILE = Path(__file__).with_name("digits.npz")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "digits"
    path: str = ""  # file or folder; empty = the dataset's default location
    test_fraction: float = 0.2  # for sources without an official test split (held out with `seed`)
    max_train: int = 0  # 0 = all; otherwise a seeded subsample (for quick runs)
    max_test: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"DatasetConfig.name must be one of {NAMES}, got {self.name!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"DatasetConfig.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_train < 0 or self.max_test < 0:
            raise ValueError("DatasetConfig.max_train and max_test must be >= 0")


@dataclass(frozen=True)
class SplitData:
    train: RawData
    test: RawData
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def subset(raw: RawData, idx: np.ndarray) -> RawData:
    """The examples ``idx`` of ``raw`` (features, texts or named arrays, and labels)."""
    idx = np.asarray(idx, dtype=np.int64)
    return replace(
        raw,
        labels=None if raw.labels is None else raw.labels[idx],
        features=None if raw.features is None else raw.features[idx],
        texts=None if raw.texts is None else tuple(raw.texts[i] for i in idx),
        arrays=None if raw.arrays is None else {k: v[idx] for k, v in raw.arrays.items()},
    )


def _size(raw: RawData) -> int:
    if raw.labels is not None:
        return int(raw.labels.size)
    raise DataError(f"{raw.source} has no labels; fleet emulation needs labelled data")


def _split(raw: RawData, fraction: float, seed: int) -> tuple[RawData, RawData]:
    order = np.random.default_rng(seed).permutation(_size(raw))
    n_test = max(1, round(fraction * order.size))
    return subset(raw, order[n_test:]), subset(raw, order[:n_test])


def _cap(raw: RawData, limit: int, seed: int) -> RawData:
    if limit and _size(raw) > limit:
        return subset(raw, np.sort(np.random.default_rng(seed + 1).permutation(_size(raw))[:limit]))
    return raw


def _zero_based(raw: RawData) -> RawData:
    if raw.one_based_labels and raw.labels is not None:
        return replace(raw, labels=raw.labels - 1, one_based_labels=False)
    return raw


def load_split(config: DatasetConfig) -> SplitData:
    """Load ``config``'s dataset as train/test :class:`RawData` with 0-based labels."""
    names: tuple[str, ...]
    if config.name == "digits":
        with np.load(DIGITS_FILE, allow_pickle=False) as z:
            x, y = z["images"], z["labels"]
        raw = RawData(labels=y.astype(np.int64), features=(x / 16.0).astype(np.float32), source="sklearn digits")
        train, test = _split(raw, config.test_fraction, config.seed)
        names = tuple(str(i) for i in range(10))
    elif config.name in ("fashion-mnist", "mnist"):
        folder = Path(config.path) if config.path else FASHION_DIR
        if config.name == "mnist" and not config.path:
            raise DataError("the mnist dataset needs `path`: a folder with train-*-idx*-ubyte[.gz] and t10k-* files")
        if not folder.is_dir():
            hint = "apt-get install dataset-fashion-mnist, or " if config.name == "fashion-mnist" else ""
            raise DataError(f"{folder} not found: {hint}give the folder holding the IDX files as `path`")
        train = read_data(folder, split="train")
        if any(folder.glob("t10k-*")):
            test = read_data(folder, split="t10k")
        else:  # one split only: hold out a seeded test_fraction of it
            train, test = _split(train, config.test_fraction, config.seed)
        names = FASHION_LABELS if config.name == "fashion-mnist" else tuple(str(i) for i in range(10))
    elif config.name == "ag-news":
        path = Path(config.path) if config.path else Path("../shared/data/ag_news_test.csv")
        raw = _zero_based(read_data(path))
        if raw.texts is None:
            raise DataError(f"{path} has no title/description text columns; expected AG News's label,title,description")
        train, test = _split(raw, config.test_fraction, config.seed)
        names = AG_NEWS_LABELS
    else:
        if not config.path:
            raise DataError("the `file` dataset needs `path` (a .csv, .npz or IDX folder)")
        raw = _zero_based(read_data(config.path))
        train, test = _split(raw, config.test_fraction, config.seed)
        names = raw.label_names or tuple(str(i) for i in range(int(_labels(raw).max()) + 1))
    return SplitData(
        train=_cap(train, config.max_train, config.seed),
        test=_cap(test, config.max_test, config.seed),
        label_names=names,
    )


def _labels(raw: RawData) -> np.ndarray:
    if raw.labels is None:
        raise DataError(f"{raw.source} has no labels; fleet emulation needs labelled data")
    return raw.labels
