"""The plain MLP bundle: both builders agree, parity with its torch twin, torch-free, registry, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fwdfleet.bundle import KINDS, load_bundle
from fwdfleet.cli.main import main
from fwdfleet.errors import ExportError
from fwdfleet.export.kinds import REGISTRY, ExportKind, get_kind
from fwdfleet.export.onnx_mlp import MLPConfig, MLPKind, export_mlp, mlp_forward

ROOT = Path(__file__).resolve().parents[1]


def _run(bundle_path: Path, values: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(bundle_path / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(sess.run(["logits", "loss"], {"x": x, "labels": y, **values}))


def test_onnx_builder_writes_the_torch_builders_bundle(tmp_path):
    pytest.importorskip("torch", reason="the torch builder needs torch")
    cfg = MLPConfig(layer_sizes=(12, 7, 5, 3), seed=1)
    a = load_bundle(export_mlp(cfg, tmp_path / "onnx"))
    b = load_bundle(export_mlp(dataclasses.replace(cfg, builder="torch"), tmp_path / "torch"))
    assert dataclasses.replace(a.manifest, files={}) == dataclasses.replace(b.manifest, files={})
    init_a, init_b = a.load_trainables(), b.load_trainables()
    assert all(np.array_equal(init_a[k], init_b[k]) for k in init_a)
    rng = np.random.default_rng(0)
    values = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in a.manifest.trainables}
    x = rng.standard_normal((9, 12)).astype(np.float32)
    y = rng.integers(0, 3, 9).astype(np.int64)
    (la, lossa), (lb, lossb) = _run(a.path, values, x, y), _run(b.path, values, x, y)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lossa, lossb, rtol=1e-5, atol=1e-5)
    ref_logits, ref_loss = mlp_forward(values, x, y)
    np.testing.assert_allclose(la, ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lossa, ref_loss, rtol=1e-4, atol=1e-4)
    assert la.shape == (9, 3) and not np.allclose(lossa, lossa[0])


def test_parity_with_torch_twin_for_random_weights(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch twin needs torch")
    from fwdfleet.export.mlp import torch_twin

    b = load_bundle(export_mlp(MLPConfig(layer_sizes=(12, 7, 5, 3), seed=1), tmp_path / "b"))
    rng = np.random.default_rng(0)
    values = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in b.manifest.trainables}
    b = b.save_as(tmp_path / "random", values)
    x = rng.standard_normal((9, 12)).astype(np.float32)
    y = rng.integers(0, 3, 9).astype(np.int64)
    _, loss = _run(b.path, values, x, y)
    ref = torch_twin(b)(x=torch.from_numpy(x), labels=torch.from_numpy(y)).detach().numpy()
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)  # fp32, same ops: near-exact


def test_the_mlp_kind_writes_bundles_where_torch_cannot_be_imported(tmp_path):
    code = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"torch", "transformers", "peft", "onnxscript"}}:
            raise ImportError(name + " is blocked")
        return None
sys.meta_path.insert(0, _Block())
from fwdfleet.cli.main import main
code = main(["export", "mlp", "--layers", "6,4,3", "--out", {str(tmp_path / "m")!r}, "--json"])
assert code == 0 and "torch" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kind"] == "mlp" and max(summary["parity_max_abs_diff"].values()) < 1e-4
    assert load_bundle(tmp_path / "m").manifest.num_trainable == 6 * 4 + 4 + 4 * 3 + 3


def test_a_graph_that_disagrees_with_the_reference_fails_the_export_and_leaves_nothing(tmp_path):
    class OffByOne(MLPKind):  # a builder bug: the graph no longer computes what the kind promises
        def reference(self, config, built, sample):
            logits, loss = super().reference(config, built, sample)
            return logits + 1e-2, loss

    with pytest.raises(ExportError, match=r"disagrees with the reference on logits .*report it as a bug"):
        OffByOne().export(MLPConfig(layer_sizes=(4, 3)), tmp_path / "b")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_registry_holds_every_bundle_kind_with_the_same_parts():
    assert set(REGISTRY) == set(KINDS)
    for name in ("mlp", "ff_mlp"):  # torch-free kinds; the traced ones are covered by their export tests
        kind = get_kind(name)
        assert isinstance(kind, ExportKind) and kind.name == name
        assert dataclasses.is_dataclass(kind.config_type) and kind.config_type.__dataclass_params__.frozen
    with pytest.raises(ExportError, match="known kinds: causal_lm_lora, ff_cnn, ff_mlp, mlp, seq_cls_lora"):
        get_kind("resnet")
    with pytest.raises(ExportError, match="takes a MLPConfig"):
        get_kind("mlp").export(object(), "unused")


def test_cli_and_errors(tmp_path, capsys):
    assert main(["export", "mlp", "--layers", "8,4,2", "--out", str(tmp_path / "m"), "--json"]) == 0
    assert '"trainable_values": 46' in capsys.readouterr().out
    assert main(["export", "mlp", "--layers", "8", "--out", str(tmp_path / "n")]) == 2
    assert "layer_sizes" in capsys.readouterr().err
    assert main(["export", "mlp", "--layers", "8,x", "--out", str(tmp_path / "n")]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["export", "mlp", "--out", str(tmp_path / "m")]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "mlp", "--out", str(tmp_path / "m"), "--overwrite"]) == 0
    assert "fp32 parity vs the reference at shape (5, 64)" in capsys.readouterr().out
