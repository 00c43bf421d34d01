"""The bundle contract: manifest round trip, checksums, schema versions, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fwdfleet.bundle import (
    SCHEMA_VERSION,
    BundleManifest,
    GraphSpec,
    TensorSpec,
    load_bundle,
    write_bundle,
    zip_bundle,
)
from fwdfleet.cli.main import main
from fwdfleet.errors import BundleError


def _manifest() -> BundleManifest:
    trainables = (TensorSpec("w", (3, 2)), TensorSpec("b", (2,)))
    graph = GraphSpec(
        name="model",
        file="model.onnx",
        inputs=(TensorSpec("x", ("batch", 3)), TensorSpec("labels", ("batch",), "int64"), *trainables),
        outputs=(TensorSpec("logits", ("batch", 2)), TensorSpec("loss", ("batch",))),
        trainables=("w", "b"),
    )
    return BundleManifest(kind="ff_mlp", trainables=trainables, graphs=(graph,), labels=("no", "yes"))


@pytest.fixture
def bundle_dir(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"graph bytes")
    values = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.ones(2, np.float32)}
    write_bundle(d, _manifest(), values)
    return d


def test_round_trip_and_canonical_order(bundle_dir, tmp_path):
    b = load_bundle(bundle_dir)
    assert b.manifest.num_trainable == 8
    assert list(b.load_trainables()) == ["w", "b"]
    assert set(b.manifest.files) == {"model.onnx", "trainables.npz"}
    text = (bundle_dir / "manifest.json").read_text()
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert text == b.manifest.to_json()  # sorted, stable
    new = b.save_as(tmp_path / "c", {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)})
    assert float(np.abs(new.load_trainables()["w"]).sum()) == 0.0
    zipped = zip_bundle(b, tmp_path / "b.zip")
    assert load_bundle(zipped).manifest == b.manifest


def test_wrong_checksum_is_reported(bundle_dir):
    (bundle_dir / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.onnx"):
        load_bundle(bundle_dir)


def test_newer_schema_is_refused(bundle_dir):
    mf = bundle_dir / "manifest.json"
    d = json.loads(mf.read_text())
    d["schema_version"] = SCHEMA_VERSION + 1
    mf.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="upgrade fwdfleet"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("missing", ["manifest.json", "model.onnx", "trainables.npz"])
def test_missing_files(bundle_dir, missing):
    (bundle_dir / missing).unlink()
    with pytest.raises(BundleError, match=r"missing|no manifest"):
        load_bundle(bundle_dir)


def test_trainables_must_match_manifest(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"g")
    with pytest.raises(BundleError, match="manifest says float32"):
        write_bundle(d, _manifest(), {"w": np.zeros((3, 2), np.float64), "b": np.zeros(2, np.float32)})
    with pytest.raises(BundleError, match="missing"):
        write_bundle(d, _manifest(), {"w": np.zeros((3, 2), np.float32)})


def test_manifest_validation_names_the_field():
    with pytest.raises(ValueError, match="kind"):
        BundleManifest(kind="cnn", trainables=(), graphs=_manifest().graphs)
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("x", (1,), "float64")


def test_cli_inspect(bundle_dir, capsys):
    assert main(["bundle", "inspect", str(bundle_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["manifest"]["kind"] == "ff_mlp"
    (bundle_dir / "trainables.npz").write_bytes(b"corrupt")
    assert main(["bundle", "inspect", str(bundle_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fwdfleet bundle: error: checksum mismatch") and "\n" not in err


def test_zip_is_reproducible(bundle_dir, tmp_path):
    import os

    b = load_bundle(bundle_dir)
    first = zip_bundle(b, tmp_path / "one.zip").read_bytes()
    os.utime(bundle_dir / "model.onnx", (1_000_000, 1_000_000))
    assert zip_bundle(b, tmp_path / "two.zip").read_bytes() == first
