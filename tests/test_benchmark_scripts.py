"""The README's "Measured here" commands run end to end on tiny inputs (each script's main)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("torch")


def test_device_step_with_torch_measures_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python benchmarks/device_step.py BUNDLE --torch` (the device memory table): inference, training step and
    the torch backprop step each get a peak, and the uplink rows are the real protobuf's."""
    from benchmarks.device_step import main

    bundle = export_mlp(MLPConfig(layer_sizes=(8, 4, 3)), tmp_path / "mlp")
    assert main([str(bundle), "--torch", "--batch-size", "4", "--repeats", "1", "--generator-n", "0",
                 "--uplink-ks", "4,64", "--json"]) == 0  # fmt: skip
    entry = json.loads(capsys.readouterr().out)["bundles"][0]
    figures = {f["mode"]: f for f in entry["memory"]["figures"]}
    assert set(figures) == {"inference", "train", "torch"}
    assert all(f["peak_mb"] for f in figures.values()), [f["note"] for f in figures.values()]
    assert entry["memory"]["torch_over_train"] > 1
    assert [row["k"] for row in entry["uplink"]] == [4, 64] and entry["uplink"][1]["protobuf_bytes_no_extras"] < 1024
