"""The plain MLP bundle: every weight a graph input, parity with its torch twin, CLI."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from fwdfleet.bundle import load_bundle
from fwdfleet.cli.main import main
from fwdfleet.export.mlp import MLPConfig, export_mlp, torch_twin

torch = pytest.importorskip("torch")


def test_parity_with_torch_twin_for_random_weights(tmp_path):
    b = load_bundle(export_mlp(MLPConfig(layer_sizes=(12, 7, 5, 3), seed=1), tmp_path / "b"))
    rng = np.random.default_rng(0)
    values = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in b.manifest.trainables}
    b = b.save_as(tmp_path / "random", values)
    sess = ort.InferenceSession(str(b.graph_path()), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in sess.get_inputs()}
    assert set(values) <= graph_inputs
    x = rng.standard_normal((9, 12)).astype(np.float32)
    y = rng.integers(0, 3, 9).astype(np.int64)
    logits, loss = sess.run(["logits", "loss"], {"x": x, "labels": y, **values})
    ref = torch_twin(b)(x=torch.from_numpy(x), labels=torch.from_numpy(y)).detach().numpy()
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)  # fp32, same ops: near-exact
    assert logits.shape == (9, 3)


def test_cli_and_errors(tmp_path, capsys):
    assert main(["export", "mlp", "--layers", "8,4,2", "--out", str(tmp_path / "m"), "--json"]) == 0
    assert '"trainable_values": 46' in capsys.readouterr().out
    assert main(["export", "mlp", "--layers", "8", "--out", str(tmp_path / "n")]) == 2
    assert "layer_sizes" in capsys.readouterr().err
    assert main(["export", "mlp", "--out", str(tmp_path / "m")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
