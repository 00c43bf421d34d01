"""NPU-ready bundles and plugin execution providers, on real onnxruntime sessions.

Static QDQ bundles are checked on the CPU provider; the plugin providers (QNN's HTP backend,
simulated on x86-64, and OpenVINO on the CPU) run where their wheels exist. They are part of the
``dev`` extra there, so their absence fails the run instead of skipping (``npu_plugin``).
"""

from __future__ import annotations

import json
import platform
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _prereqs import dev_dependency
from _tiny_bundles import make_classifier_bundle

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.errors import ConfigError, DataError, ExportError
from fwdfleet.export.quantize import StaticQuantConfig, calibration_batches, quantize_static_bundle

WHEELS = (sys.platform == "linux" and platform.machine() == "x86_64") or sys.platform == "win32"


def npu_plugin(module: str) -> None:
    """The plugin package ``module``: required where the ``npu`` extra installs it, else skip."""
    if not WHEELS:
        pytest.skip(f"{module} has no wheel for {sys.platform}/{platform.machine()}")
    dev_dependency(module)


class _Digits:
    """A device's data: 240 fixed examples of 64 features and 10 classes (seeded)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(3)
        self.x = rng.standard_normal((240, 64)).astype(np.float32)
        self.y = rng.integers(0, 10, 240).astype(np.int64)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, seed: int, size: int) -> dict[str, np.ndarray]:
        i = np.random.default_rng(seed).choice(len(self.x), size, replace=False)
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("npu")
    fp32 = make_classifier_bundle(root / "fp32", 64, 10, hidden=32)
    out: dict[str, object] = {"fp32": fp32, "data": _Digits()}
    for bits in (16, 8):
        config = StaticQuantConfig(activation_bits=bits, batch_size=16, calibration_batches=4)
        out[f"a{bits}"] = quantize_static_bundle(fp32, root / f"a{bits}", config,
                                                 calibration_batches(out["data"], config))
    return out


def _losses(bundle, providers, batch, trainables):
    session = BundleSession(bundle, SessionOptions(providers=providers, record_assignment=True))
    return session, session.loss(trainables, batch)


def test_static_bundle_has_fixed_shapes_qdq_nodes_and_float_trainable_inputs(bundles):
    q = bundles["a16"]
    m = q.manifest
    assert m.quantization == "qdq-a16w8"
    g = m.graph("model")
    assert [t.shape for t in g.data_inputs] == [(16, 64), (16,)]
    assert g.outputs[1].shape == (16,)
    record = m.settings["static_quantization"]
    assert record["activation_bits"] == 16 and record["calibration_examples"] == 64
    model = onnx.load(str(q.graph_path("model")))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == record["graphs"]["model"]["quantize_linear_nodes"] > 0
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    for t in m.trainables:  # trainables stay float graph inputs, of their manifest shape
        assert inputs[t.name].elem_type == onnx.TensorProto.FLOAT
        assert tuple(d.dim_value for d in inputs[t.name].shape.dim) == t.shape
    assert all(d.HasField("dim_value") for i in model.graph.input for d in i.type.tensor_type.shape.dim)


def test_static_bundle_losses_track_fp32_closer_at_16_bits(bundles):
    batch = bundles["data"].batch(99, 16)
    w = bundles["fp32"].load_trainables()
    _, ref = _losses(bundles["fp32"], ("cpu",), batch, w)
    _, l16 = _losses(bundles["a16"], ("cpu",), batch, w)
    _, l8 = _losses(bundles["a8"], ("cpu",), batch, w)
    e16, e8 = np.abs(l16 - ref).max(), np.abs(l8 - ref).max()
    assert e16 < 2e-3 * np.abs(ref).max()
    assert e16 < e8 < 0.1 * np.abs(ref).max()


def test_static_bundle_rejects_a_batch_of_another_size(bundles):
    session = BundleSession(bundles["a16"], SessionOptions())
    batch = bundles["data"].batch(0, 8)
    with pytest.raises(DataError, match="axis 0 must be 16"):
        session.loss(bundles["fp32"].load_trainables(), batch)


def test_calibration_of_the_wrong_shape_says_what_fits(bundles, tmp_path):
    config = StaticQuantConfig(batch_size=16)
    bad = [{"x": np.zeros((16, 63), np.float32), "labels": np.zeros(16, np.int64)}]
    with pytest.raises(ExportError, match=r"'x' has shape \[16, 63\] but the static graph 'model' takes \[16, 64\]"):
        quantize_static_bundle(bundles["fp32"], tmp_path / "bad", config, bad)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    with pytest.raises(ExportError, match="fewer than one static batch"):
        calibration_batches(bundles["data"], StaticQuantConfig(batch_size=500))


def test_a_quantized_bundle_is_not_quantized_again(bundles, tmp_path):
    config = StaticQuantConfig()
    with pytest.raises(ExportError, match="already quantized"):
        quantize_static_bundle(bundles["a8"], tmp_path / "again", config, calibration_batches(bundles["data"], config))


def test_cli_quantize_static_from_the_devices_data(bundles, tmp_path, capsys):
    from fwdfleet.cli.main import main

    d = bundles["data"]
    np.savez(tmp_path / "device.npz", x=d.x, labels=d.y)
    out = tmp_path / "static"
    rc = main(["bundle", "quantize-static", str(bundles["fp32"].path), str(out), "--data", str(tmp_path / "device.npz"),
               "--activation-bits", "8", "--batch-size", "8", "--calibration-batches", "2", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert record["quantization"] == "qdq-a8w8" and record["calibration_examples"] == 16
    assert load_bundle(out).manifest.graph("model").data_inputs[0].shape == (8, 64)


# ------------------------------------------------------------------------- plugin providers


def test_unknown_provider_and_missing_plugin_say_what_to_do(monkeypatch):
    from fwdfleet.device_runtime import session as s

    with pytest.raises(ConfigError, match="not available"):
        s.check_providers([s.provider_name("npu9000")])
    missing = s.PluginProvider("qnn-htp", "QNNExecutionProvider", "fwdfleet_no_such_plugin", "onnxruntime-qnn")
    monkeypatch.setitem(s.PLUGIN_PROVIDERS, "qnn-htp", missing)
    with pytest.raises(ConfigError, match=r"'qnn-htp' is not installed: pip install onnxruntime-qnn"):
        s.check_providers(["qnn-htp"])


def test_plugin_combines_only_with_cpu():
    with pytest.raises(ValueError, match="combines only with cpu"):
        SessionOptions(providers=("qnn-htp", "xnnpack"))
    assert SessionOptions(providers=("QNN-HTP", "cpu")).providers == ("qnn-htp", "CPUExecutionProvider")
    assert SessionOptions(providers=("qnn",)).providers == SessionOptions(providers=("QNNExecutionProvider",)).providers


def test_qnn_htp_runs_the_static_bundle_and_matches_its_cpu_twin(bundles):
    npu_plugin("onnxruntime_qnn")
    batch = bundles["data"].batch(7, 16)
    w = bundles["fp32"].load_trainables()
    _, ref = _losses(bundles["a8"], ("cpu",), batch, w)
    htp, got = _losses(bundles["a8"], ("qnn-htp",), batch, w)
    assert htp.providers[0] == "QNNExecutionProvider"
    placed = Counter(ep for ep, _, _ in htp.node_assignment())
    assert placed["QNNExecutionProvider"] >= 0.8 * sum(placed.values())
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_qnn_htp_refuses_a_dynamic_shape_bundle_unless_cpu_fallback_is_asked_for(bundles):
    npu_plugin("onnxruntime_qnn")
    with pytest.raises(ConfigError, match=r"fixed shapes.*quantize-static.*--providers qnn-htp,cpu"):
        BundleSession(bundles["fp32"], SessionOptions(providers=("qnn-htp",)))
    htp, _ = _losses(bundles["fp32"], ("qnn-htp", "cpu"), bundles["data"].batch(7, 16),
                     bundles["fp32"].load_trainables())
    assert {ep for ep, _, _ in htp.node_assignment()} == {"CPUExecutionProvider"}


def test_openvino_runs_every_node_of_the_fp32_bundle(bundles):
    npu_plugin("onnxruntime_ep_openvino")
    batch = bundles["data"].batch(7, 16)
    w = bundles["fp32"].load_trainables()
    _, ref = _losses(bundles["fp32"], ("cpu",), batch, w)
    ov, got = _losses(bundles["fp32"], ("openvino",), batch, w)
    assert {ep for ep, _, _ in ov.node_assignment()} == {"OpenVINOExecutionProvider"}
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_a_device_openvino_does_not_offer_is_named():
    npu_plugin("onnxruntime_ep_openvino")
    import onnxruntime as ort

    from fwdfleet.device_runtime.session import PLUGIN_PROVIDERS, plugin_devices

    if any(dict(d.ep_metadata).get("ov_device") == "NPU" for d in ort.get_ep_devices()):
        pytest.skip("this machine has an Intel NPU")
    with pytest.raises(ConfigError, match="offers no NPU on this machine"):
        plugin_devices(PLUGIN_PROVIDERS["openvino-npu"])



def test_a_bound_run_sees_trainables_updated_in_place_on_openvino(bundles):
    """The estimator's perturbed forwards write w + eps z into the bound buffers; OpenVINO must see them."""
    npu_plugin("onnxruntime_ep_openvino")
    batch = bundles["data"].batch(7, 16)
    w = {k: v.copy() for k, v in bundles["fp32"].load_trainables().items()}
    session = BundleSession(bundles["fp32"], SessionOptions(providers=("openvino",)))
    bound = session.bind(w, batch)
    before = bound.run()["loss"]
    for v in w.values():
        v += 0.1
    after = bound.run()["loss"]
    np.testing.assert_allclose(after, session.loss(w, batch), rtol=1e-5)
    assert np.abs(after - before).max() > 1e-3


# ------------------------------------------------------------------------- bench, NPU edition


def test_fidelity_and_the_recommended_eps():
    from fwdfleet.device_runtime.bench import fidelity, recommend_eps

    ref = [1.0, -2.0, 0.5, 3.0]
    exact = fidelity(ref, ref, 1e-2)
    assert exact.correlation == pytest.approx(1.0) and exact.relative_error == 0 and exact.sign_agreement == 1
    lost = fidelity([0.0, 0.0, 0.0, 0.0], ref, 1e-3)
    assert lost.correlation == 0 and lost.relative_error == pytest.approx(1.0) and lost.zero_fraction == 1
    flipped = fidelity([-1.0, 2.0, -0.5, -3.0], ref, 1e-1)
    assert flipped.correlation < 0 and flipped.sign_agreement == 0
    assert recommend_eps([lost, exact, flipped]) == 1e-2
    assert recommend_eps([lost, flipped]) is None


def test_placement_counts_cpu_fallback_by_operator():
    from fwdfleet.device_runtime.bench import Placement

    p = Placement.of("QNNExecutionProvider", [("QNNExecutionProvider", "MatMul", "a"),
                                              ("CPUExecutionProvider", "QuantizeLinear", "b"),
                                              ("CPUExecutionProvider", "QuantizeLinear", "c"),
                                              ("QNNExecutionProvider", "Tanh", "d")])
    assert p.nodes == 4 and p.on_provider == 0.5 and p.cpu_fallback == {"QuantizeLinear": 2}
    assert Placement.of("CPUExecutionProvider", [("CPUExecutionProvider", "MatMul", "a")]).cpu_fallback == {}


@pytest.mark.slow
def test_bench_reports_placement_and_training_fidelity_in_one_shape_per_provider(bundles, tmp_path):
    from fwdfleet.device_runtime.bench import benchmark, format_table, to_json

    providers = ["cpu"]
    if WHEELS:
        npu_plugin("onnxruntime_qnn")
        providers.append("qnn-htp")
    d = bundles["data"]
    np.savez(tmp_path / "device.npz", x=d.x, labels=d.y)
    results = benchmark([bundles["a16"].path, bundles["a8"].path], providers, warmup=1, count=3, train_count=1,
                        fidelity_eps=(1e-3, 1e-1), fidelity_k=8, data=tmp_path / "device.npz")
    assert not [r.error for r in results if r.error]
    rows = to_json(results)
    assert len({tuple(sorted(r)) for r in rows}) == 1  # the same JSON shape for every provider
    by = {(r.provider, Path(r.bundle).name): r for r in results}
    a16, a8 = by[("CPUExecutionProvider", "a16")], by[("CPUExecutionProvider", "a8")]
    assert a16.placement.on_provider == 1.0 and a16.reference.startswith("fp32 ")
    # 16-bit activations keep eps = 1e-3 usable; 8-bit ones lose it in the rounding
    assert a16.fidelity[0].correlation > 0.99 and a16.recommended_eps == 1e-3
    assert a8.fidelity[0].correlation < 0.9 and a8.fidelity[1].correlation > 0.99 and a8.recommended_eps == 1e-1
    if "qnn-htp" in providers:
        htp = by[("qnn-htp", "a16")]
        assert htp.simulated and htp.placement.on_provider >= 0.8
        assert set(htp.placement.cpu_fallback) <= {"QuantizeLinear", "DequantizeLinear"}
        assert htp.fidelity[0].correlation > 0.99
        assert "(sim)" in format_table(results)


def test_forward_forward_layers_are_calibrated_on_the_previous_layers_output(bundles, tmp_path):
    from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp

    ff = load_bundle(export_ff_mlp(FFMLPConfig(layers=(64, 32, 32), seed=1), tmp_path / "ff"))
    config = StaticQuantConfig(batch_size=8, calibration_batches=2)
    q = quantize_static_bundle(ff, tmp_path / "ff_q", config, calibration_batches(bundles["data"], config))
    assert [g.name for g in q.manifest.graphs] == [g.name for g in ff.manifest.graphs]
    assert q.manifest.graph("layer_1").data_inputs[0].shape == (8, 32)
    w = ff.load_trainables()
    x = bundles["data"].batch(5, 8)["x"]
    layer = [n for n in w if n.startswith("layers.1.")]
    h0 = BundleSession(ff, graph="layer_0").run(w, {"x": x}, ("h",))["h"]
    want = BundleSession(ff, graph="layer_1").run(w, {"x": h0}, ("goodness",))["goodness"]
    got = BundleSession(q, graph="layer_1").run(w, {"x": h0}, ("goodness",))["goodness"]
    err = np.abs(got - want)  # 16-bit activations: tight, but for a sample beyond the calibrated range
    assert layer and np.median(err) < 1e-3 * np.abs(want).max() and err.max() < 0.1 * np.abs(want).max()
