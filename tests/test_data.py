"""Local data loaders: IDX, CSV (AG News and numeric), npz; fitting to a bundle's inputs; errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from _prereqs import ag_news
from _tiny_bundles import make_classifier_bundle, make_text_bundle

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.data import ArrayDataset, load_dataset, load_idx, read_data, synthetic_batch
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import DataError


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def mnist_like(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, size=20).astype(np.uint8)
    folder = tmp_path / "mnist"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(folder / "t10k-images-idx3-ubyte", images[:5])
    _write_idx(folder / "t10k-labels-idx1-ubyte", labels[:5])
    return folder, images, labels


def test_idx_folder_and_files(mnist_like, tmp_path: Path) -> None:
    folder, images, labels = mnist_like
    raw = read_data(folder)
    assert raw.features is not None and raw.features.shape == (20, 16)
    np.testing.assert_allclose(raw.features, images.reshape(20, 16) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(raw.labels, labels)
    test = read_data(folder, split="t10k")
    assert test.features is not None and test.features.shape == (5, 16)
    single = read_data(folder / "t10k-images-idx3-ubyte")
    assert single.labels is not None and len(single.labels) == 5
    ints = np.arange(6, dtype=np.int32).reshape(2, 3)
    _write_idx(tmp_path / "ints.idx", ints, code=0x0C)
    np.testing.assert_array_equal(load_idx(tmp_path / "ints.idx"), ints)


def test_malformed_idx_names_the_file(mnist_like, tmp_path: Path) -> None:
    folder, _, _ = mnist_like
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 10, 4, 4) + b"\x01" * 7)
    with pytest.raises(DataError, match="bad-images-idx3-ubyte holds 23 bytes"):
        load_idx(bad)
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="is not an IDX file"):
        load_idx(tmp_path / "junk")
    with pytest.raises(DataError, match="no IDX images file for split 'valid'"):
        read_data(folder, split="valid")
    with pytest.raises(DataError, match="data path not found"):
        read_data(tmp_path / "nope.csv")


def test_idx_fitted_to_a_bundle(mnist_like, tmp_path: Path) -> None:
    folder, _, _ = mnist_like
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=16, num_classes=3)
    ds = load_dataset(folder, bundle)
    batch = ds.batch(seed=1, size=8)
    assert set(batch) == {"x", "labels"} and batch["x"].shape == (8, 16) and batch["x"].dtype == np.float32
    np.testing.assert_array_equal(ds.batch(seed=1, size=8)["x"], batch["x"])  # seeded
    assert BundleSession(bundle).loss(bundle.load_trainables(), batch).shape == (8,)
    wrong = make_classifier_bundle(tmp_path / "w", in_dim=10, num_classes=3)
    with pytest.raises(DataError, match="16 features per example but the bundle's `x` takes 10"):
        load_dataset(folder, wrong)
    two = make_classifier_bundle(tmp_path / "two", in_dim=16, num_classes=2)
    with pytest.raises(DataError, match=r"labels must be 0\.\.1"):
        load_dataset(folder, two)


def test_numeric_csv_with_a_label_column(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("f1,label,f2\n0.5,1,2\n1.5,0,3\n2.5,1,4\n")
    raw = read_data(p)
    assert raw.features is not None
    np.testing.assert_array_equal(raw.features, [[0.5, 2], [1.5, 3], [2.5, 4]])
    np.testing.assert_array_equal(raw.labels, [1, 0, 1])
    p.write_text("f1,label,f2\n0.5,1,x\n")
    with pytest.raises(DataError, match="needs numbers in every column"):
        read_data(p)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no 'label' column"):
        read_data(p)


def test_npz_both_layouts(tmp_path: Path) -> None:
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=3, num_classes=2)
    np.savez(tmp_path / "a.npz", x=np.ones((4, 3), np.float32), labels=np.array([0, 1, 0, 1]))
    assert len(load_dataset(tmp_path / "a.npz", bundle)) == 4
    np.savez(tmp_path / "b.npz", x=np.ones((4, 3), np.float32), labels=np.array([0, 1, 0, 1]), extra=np.zeros(2))
    assert load_dataset(tmp_path / "b.npz", bundle).batch(0, 2)["x"].shape == (2, 3)
    with open(tmp_path / "c.npz", "wb") as f:
        np.savez(f, x=np.array([{"a": 1}], dtype=object))  # a pickled object: refused
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        read_data(tmp_path / "c.npz")


def test_array_dataset_split_and_batches() -> None:
    ds = ArrayDataset({"x": np.arange(20, dtype=np.float32)[:, None], "labels": np.arange(20)})
    train, ev = ds.split(0.25, seed=0)
    assert len(train) == 15 and len(ev) == 5
    assert sorted(np.concatenate([train.arrays["labels"], ev.arrays["labels"]]).tolist()) == list(range(20))
    assert [len(b["labels"]) for b in ev.batches(2)] == [2, 2, 1]
    assert len(ds.batch(3, 50)["labels"]) == 50  # larger than the data: drawn with replacement
    with pytest.raises(DataError, match="disagree"):
        ArrayDataset({"x": np.zeros(3), "labels": np.zeros(2)})


def test_ag_news_csv_tokenized_with_the_bundle_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    words = ag_news().read_text().split()[:2000]
    bundle = make_text_bundle(tmp_path / "t", words, num_classes=4, max_length=24)
    ds = load_dataset(ag_news(), bundle)
    assert len(ds) == 7600
    assert ds.labels is not None and np.bincount(ds.labels).tolist() == [1900] * 4  # AG News 1..4 -> 0..3
    batch = ds.batch(seed=0, size=8)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] <= 24 and batch["input_ids"].dtype == np.int64
    loss = BundleSession(bundle).loss(bundle.load_trainables(), batch)
    assert loss.shape == (8,) and np.isfinite(loss).all()
    numeric = make_classifier_bundle(tmp_path / "n", in_dim=4, num_classes=4)
    with pytest.raises(DataError, match="holds no numeric features"):
        load_dataset(ag_news(), numeric)


def test_synthetic_batch_has_the_graph_inputs(tmp_path: Path) -> None:
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=5, num_classes=3)
    batch = synthetic_batch(bundle, 4)
    BundleSession(bundle).check_batch(batch)
    assert batch["labels"].max() < 3


def test_text_labels_map_through_the_bundle_label_names(tmp_path: Path) -> None:
    from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

    csv_path = tmp_path / "animals.csv"
    csv_path.write_text("label,f1,f2\ndog,0.1,0.2\ncat,0.3,0.4\nemu,0.5,0.6\ndog,0.7,0.8\n")
    raw = read_data(csv_path)
    assert raw.label_names == ("cat", "dog", "emu") and raw.labels.tolist() == [1, 0, 2, 1]
    bundle = load_bundle(export_mlp(MLPConfig(layer_sizes=(2, 3), labels=("emu", "dog", "cat")), tmp_path / "b"))
    ds = load_dataset(csv_path, bundle)
    assert ds.take(np.arange(4))["labels"].tolist() == [1, 2, 0, 1]  # by name, in the bundle's order
    (tmp_path / "more.csv").write_text("label,f1,f2\ndog,0.1,0.2\nyak,0.3,0.4\n")
    with pytest.raises(DataError, match=r"labels \['yak'\] that the bundle's label map"):
        load_dataset(tmp_path / "more.csv", bundle)


def test_tab_separated_label_text_lines(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    tsv = tmp_path / "sms.tsv"
    tsv.write_text("ham\tsee you at lunch\nspam\tWIN a free prize now\nham\tcall me later\n")
    raw = read_data(tsv)
    assert raw.texts == ("see you at lunch", "WIN a free prize now", "call me later")
    assert raw.label_names == ("ham", "spam") and raw.labels.tolist() == [0, 1, 0]
    words = ["see", "you", "at", "lunch", "win", "a", "free", "prize", "now", "call", "me", "later"]
    bundle = make_text_bundle(tmp_path / "t", words, num_classes=2, max_length=8, labels=("ham", "spam"))
    assert load_dataset(tsv, bundle).take(np.arange(3))["labels"].tolist() == [0, 1, 0]
    (tmp_path / "bad.txt").write_text("ham\tfine\nspam no tab here\n")
    with pytest.raises(DataError, match="label<TAB>text; line 2 has no tab"):
        read_data(tmp_path / "bad.txt")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(DataError, match=r"\.tsv/\.txt of label<TAB>text"):
        read_data(tmp_path / "data.parquet")
