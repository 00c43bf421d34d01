"""BundleSession on tiny real bundles: outputs, input validation, providers, corrupt bundles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny_bundles import make_classifier_bundle, numpy_loss

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.session import BundleSession, SessionOptions, available_providers
from fwdfleet.errors import BundleError, ConfigError, DataError


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory):
    return make_classifier_bundle(tmp_path_factory.mktemp("mlp"), in_dim=6, num_classes=3, hidden=5, seed=1)


def _batch(n: int = 7, in_dim: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, in_dim)).astype(np.float32), "labels": (np.arange(n) % 3).astype(np.int64)}


def test_loss_and_logits_match_numpy(mlp) -> None:
    s = BundleSession(mlp, SessionOptions(intra_op_threads=1))
    t, b = mlp.load_trainables(), _batch()
    out = s.run(t, b, ("loss", "logits"))
    assert out["logits"].shape == (7, 3)
    np.testing.assert_allclose(out["loss"], numpy_loss(t, b["x"], b["labels"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.loss(t, b), out["loss"])


def test_bound_run_sees_in_place_updates(mlp) -> None:
    s = BundleSession(mlp)
    t = {k: v.copy() for k, v in mlp.load_trainables().items()}
    b = _batch()
    runner = s.bind(t, b, ("loss",))
    before = runner.run()["loss"].copy()
    t["layers.1.weight"] *= 3.0  # written in place: the binding must see it
    after = runner.run()["loss"]
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, numpy_loss(t, b["x"], b["labels"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(x=b["x"].astype(np.float64)), "dtype float64 but the graph expects float32"),
        (lambda b: b.update(x=b["x"][:, :4].copy()), "axis 1 must be 6"),
        (lambda b: b.update(x=b["x"][None]), "rank 2"),
        (lambda b: b.pop("labels"), "missing ['labels']"),
        (lambda b: b.update(extra=b["labels"]), "unexpected ['extra']"),
        (lambda b: b.update(labels=b["labels"][:3].copy()), "disagree on the batch size"),
        (lambda b: b.update(labels=b["labels"].astype(np.int32)), "dtype int32 but the graph expects int64"),
    ],
)
def test_bad_batch_gets_a_clear_error(mlp, change, message) -> None:
    s = BundleSession(mlp)
    b = _batch()
    change(b)
    with pytest.raises(DataError) as e:
        s.loss(mlp.load_trainables(), b)
    assert message in str(e.value)


def test_bad_trainables_get_a_clear_error(mlp) -> None:
    s = BundleSession(mlp)
    t = mlp.load_trainables()
    with pytest.raises(BundleError, match=r"'layers\.0\.weight' has shape \[6, 5\] but the graph expects \[5, 6\]"):
        s.loss({**t, "layers.0.weight": t["layers.0.weight"].T.copy()}, _batch())
    with pytest.raises(BundleError, match="missing"):
        s.loss({k: v for k, v in t.items() if k != "layers.1.bias"}, _batch())


def test_unavailable_provider_lists_the_available_ones(mlp) -> None:
    with pytest.raises(ConfigError) as e:
        BundleSession(mlp, SessionOptions(providers=("nnapi", "cpu")))
    assert "NnapiExecutionProvider" in str(e.value)
    for p in available_providers():
        assert p in str(e.value)


def test_session_options_validate_fields() -> None:
    assert SessionOptions(providers=("cpu",)).providers == ("CPUExecutionProvider",)
    with pytest.raises(ValueError, match="intra_op_threads"):
        SessionOptions(intra_op_threads=-1)
    with pytest.raises(ValueError, match="graph_optimization"):
        SessionOptions(graph_optimization="max")  # type: ignore[arg-type]
    so = SessionOptions(enable_cpu_mem_arena=False, disable_prepacking=True, intra_op_threads=1).to_ort()
    assert so.enable_cpu_mem_arena is False
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    default = SessionOptions().to_ort()
    assert default.enable_mem_pattern is False and default.enable_cpu_mem_arena is True  # memory-friendly defaults
    assert (
        SessionOptions(allow_spinning=False).to_ort().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    )


def test_corrupt_bundle_is_a_bundle_error(tmp_path: Path) -> None:
    bundle = make_classifier_bundle(tmp_path / "b", in_dim=4, num_classes=2)
    graph = bundle.graph_path()
    graph.write_bytes(graph.read_bytes()[:-20] + b"\x00" * 20)
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bundle.path)
    graph.write_bytes(b"not an onnx graph")
    unverified = load_bundle(bundle.path, verify=False)
    with pytest.raises(BundleError, match="onnxruntime cannot load graph 'model'"):
        BundleSession(unverified)


def test_missing_graph_name_is_a_bundle_error(mlp) -> None:
    with pytest.raises(BundleError, match="has no graph 'layer_0'"):
        BundleSession(mlp, graph="layer_0")


def test_freed_memory_is_released_after_loading() -> None:
    from fwdfleet.device_runtime.session import release_freed_memory

    assert release_freed_memory() is sys.platform.startswith("linux")
