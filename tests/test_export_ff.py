"""Export of Forward-Forward MLP bundles: a valid bundle, onnxruntime == torch twin, the CLI, bad input."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
import pytest

from fwdfleet.bundle import load_bundle
from fwdfleet.cli.export_ff_cmd import register_ff
from fwdfleet.errors import ExportError
from fwdfleet.export.ff_mlp import HEADS, FFMLPConfig, export_ff_mlp, trainable_specs

# fp32 graphs vs the torch twin on the same random weights: both do the same float32 ops in a
# possibly different order, so they agree to a few ulps; 1e-5 absolute + 1e-4 relative is tight.
ATOL, RTOL = 1e-5, 1e-4
SMALL = dict(layers=(24, 16, 12, 8), num_classes=6, head_units_per_class=3)


def _random_trainables(config: FFMLPConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.normal(0, 0.5, size=t.shape).astype(np.float32) for t in trainable_specs(config)}


def _session(bundle, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle.graph_path(graph)), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("score_layers", ["all_but_first", "all"])
def test_onnxruntime_matches_torch_twin(tmp_path, heads, score_layers):
    torch = pytest.importorskip("torch", reason="the torch twin needs the export extra")
    from fwdfleet.export.ff_mlp import torch_twin

    config = FFMLPConfig(**SMALL, heads=heads, score_layers=score_layers)
    bundle = load_bundle(export_ff_mlp(config, tmp_path / "b"))
    bundle = bundle.save_as(tmp_path / "random", _random_trainables(config, seed=1))  # random, not init, weights
    values = bundle.load_trainables()
    twin = torch_twin(bundle)
    assert dict(twin.named_parameters()).keys() == values.keys()
    rng = np.random.default_rng(2)
    x = rng.random((5, 24), dtype=np.float32)
    y = rng.integers(0, 6, size=5)
    logits, loss = _session(bundle, "model").run(["logits", "loss"], {"x": x, "labels": y, **values})
    with torch.no_grad():
        t_logits = twin.scores(torch.from_numpy(x)).numpy()
        t_loss = twin(x=torch.from_numpy(x), labels=torch.from_numpy(y)).numpy()
    assert logits.shape == (5, 6) and loss.shape == (5,)
    np.testing.assert_allclose(logits, t_logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(loss, t_loss, atol=ATOL, rtol=RTOL)

    h = torch.from_numpy(rng.random((5, 24), dtype=np.float32))
    for i in range(config.num_layers):
        graph = bundle.manifest.graph(f"layer_{i}")
        feeds = {"x": h.numpy(), **{n: values[n] for n in graph.trainables}}
        outs = _session(bundle, graph.name).run([o.name for o in graph.outputs], feeds)
        with torch.no_grad():
            h, goodness, head = twin.layer(i, h)
        np.testing.assert_allclose(outs[0], h.numpy(), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(outs[1], goodness.numpy(), atol=ATOL, rtol=RTOL)
        if heads == "none":
            assert len(outs) == 2 and head is None
        else:
            np.testing.assert_allclose(outs[2], head.numpy(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("batch", [None, 4])
def test_bundle_is_valid_and_every_weight_is_a_graph_input(tmp_path, batch):
    config = FFMLPConfig(**SMALL, heads="softmax", batch=batch, opset=17)
    bundle = load_bundle(export_ff_mlp(config, tmp_path / "b"), verify=True)
    m = bundle.manifest
    assert m.kind == "ff_mlp" and m.opset == 17 and m.quantization is None
    names = [t.name for t in m.trainables]
    assert names[:4] == ["layers.0.weight", "layers.0.bias", "heads.0.weight", "heads.0.bias"]
    assert [g.name for g in m.graphs] == ["model", "layer_0", "layer_1", "layer_2"]
    model = m.graph("model")
    assert [t.name for t in model.data_inputs] == ["x", "labels"]
    assert set(model.trainables) == set(names)
    session_inputs = {i.name: i for i in _session(bundle, "model").get_inputs()}
    assert set(names) <= set(session_inputs)
    assert session_inputs["x"].shape == [batch if batch else "batch", 24]
    assert [o.name for o in _session(bundle, "model").get_outputs()] == ["logits", "loss"]
    for i in range(3):
        g = m.graph(f"layer_{i}")
        assert g.trainables == (f"layers.{i}.weight", f"layers.{i}.bias", f"heads.{i}.weight", f"heads.{i}.bias")
        assert {x.name for x in _session(bundle, g.name).get_inputs()} == {"x", *g.trainables}
        assert [o.name for o in g.outputs] == ["h", "goodness", "head_logits"]
    values = bundle.load_trainables()
    assert values["layers.1.weight"].shape == (12, 16) and values["heads.2.weight"].shape == (6, 8)
    assert m.settings["layers"] == [24, 16, 12, 8] and m.settings["heads"] == "softmax"


def test_layer_graphs_compose_to_the_model_graph(tmp_path):
    """Running the per-layer graphs on the label-embedded input reproduces graph 'model''s logits."""
    config = FFMLPConfig(**SMALL)
    bundle = load_bundle(export_ff_mlp(config, tmp_path / "b"))
    values = bundle.load_trainables()
    x = np.random.default_rng(3).random((4, 24), dtype=np.float32)
    rows = np.repeat(x, 6, axis=0)
    rows[:, :6] = np.tile(np.eye(6, dtype=np.float32), (4, 1))
    total = np.zeros(24, dtype=np.float32)
    h = rows
    for i in range(3):
        g = bundle.manifest.graph(f"layer_{i}")
        h, goodness = _session(bundle, g.name).run(["h", "goodness"], {"x": h, **{n: values[n] for n in g.trainables}})
        if i > 0:  # all_but_first
            total += goodness
    logits = _session(bundle, "model").run(["logits"], {"x": x, "labels": np.zeros(4, np.int64), **values})[0]
    np.testing.assert_allclose(logits, total.reshape(4, 6), atol=ATOL, rtol=RTOL)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fwdfleet export")
    register_ff(parser.add_subparsers(dest="what", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_writes_a_bundle_and_prints_json(tmp_path, capsys):
    out = tmp_path / "cli"
    code = _cli(["ff-mlp", "--layers", "20,16,16", "--num-classes", "4", "--heads", "class-goodness",
                 "--batch", "8", "--opset", "18", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["graphs"] == ["model", "layer_0", "layer_1"] and result["parity_shape"] == [8, 20]
    assert result["trainable_values"] == 20 * 16 + 16 + 16 * 16 + 16 + 2 * (16 * 16 + 16)
    assert set(result["parity_max_abs_diff"]) == {"logits", "loss", "layer_0.h", "layer_0.goodness",
                                                  "layer_0.head_logits", "layer_1.h", "layer_1.goodness",
                                                  "layer_1.head_logits"}
    assert max(result["parity_max_abs_diff"].values()) < 1e-4
    manifest = load_bundle(out).manifest
    assert manifest.settings["heads"] == "class-goodness" and manifest.graph("model").inputs[0].shape == (8, 20)
    with pytest.raises(ExportError, match="--overwrite"):
        _cli(["ff-mlp", "--layers", "20,16", "--num-classes", "4", "--out", str(out)])
    assert _cli(["ff-mlp", "--layers", "20,16", "--num-classes", "4", "--out", str(out), "--overwrite"]) == 0
    assert [g.name for g in load_bundle(out).manifest.graphs] == ["model", "layer_0"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantize", "int8"], "no frozen weights"),
        (["--layers", "784,abc"], "comma-separated integers"),
        (["--layers", "8,16", "--num-classes", "10"], "must exceed num_classes"),
        (["--batch", "lots"], "positive integer or 'dynamic'"),
        (["--opset", "9"], "opset must be in"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, argv, message):
    with pytest.raises(ExportError, match=message):
        _cli(["ff-mlp", "--num-classes", "4", "--layers", "20,8", *argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_config_rejects_quantization_and_export_refuses_non_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no frozen weights"):
        FFMLPConfig(**SMALL, quantization="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_ff_mlp(FFMLPConfig(**SMALL), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_missing_onnx_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    with pytest.raises(ExportError, match=r"pip install 'onnx>=1.16'"):
        export_ff_mlp(FFMLPConfig(**SMALL), tmp_path / "b")
