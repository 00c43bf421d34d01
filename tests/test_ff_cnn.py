"""SFF CNN bundles (kind ff_cnn): export and parity, the gradient graph's operators, block-local
training on the device (gradient graph and perturbed inference), batch-norm state, bad input,
the CIFAR-10 loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.data import CIFAR10_RECORD, load_cifar10, load_cifar10_batch
from fwdfleet.device_runtime.ff_cnn import (
    CNNRunner,
    SFFTrainConfig,
    block_step,
    evaluate_sff,
    load_state,
    train_sff,
)
from fwdfleet.device_runtime.ff_train import AdamState
from fwdfleet.errors import DataError, ExportError

ROOT = Path(__file__).resolve().parents[1]
# Inference operators of the default ONNX domain only (no aten fallback, no custom function).
INFERENCE_OPS = {"Add", "Cast", "Concat", "Conv", "ConvTranspose", "Div", "Equal", "Exp", "Expand", "Identity",
                 "LessOrEqual", "Mul", "Neg", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
                 "Reshape", "Shape", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where", "Constant",
                 "Gather", "Slice", "Range", "Max", "Pow"}


def _config():  # type: ignore[no-untyped-def]
    from fwdfleet.export.ff_cnn import BlockSpec, FFCNNConfig

    return FFCNNConfig(blocks=(BlockSpec("conv", 1, 4), BlockSpec("residual", 4, 6, pool=False)),
                       image_size=(8, 8), num_classes=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("torch", reason="exporting an ff_cnn bundle needs the export extra")
    from fwdfleet.export.ff_cnn import KIND

    out = tmp_path_factory.mktemp("ffcnn") / "bundle"
    return KIND.export(_config(), out)


def _toy(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by which rows of the 8x8 image are bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((n, 1, 8, 8)) * 0.5).astype(np.float32)
    x[np.arange(n), 0, y * 2, :] += 2.0
    return x, y.astype(np.int64)


def test_every_graph_is_checked_against_torch(exported) -> None:  # type: ignore[no-untyped-def]
    m = exported.bundle.manifest
    assert [g.name for g in m.graphs] == ["model", "block_0", "grad_0", "block_1", "grad_1"]
    parity = exported.parity
    for g in m.graphs:
        for t in g.outputs:
            key = t.name if g.name == "model" else f"{g.name}.{t.name}"
            assert key in parity and parity[key] < 1e-3, (key, parity.get(key))
    # the residual block changes channels: its shortcut conv and BN are trainable, its statistics state
    assert "blocks.1.shortcut.weight" in m.graph("grad_1").trainables
    assert "grad.blocks.1.shortcut.weight" in {t.name for t in m.graph("grad_1").outputs}
    state = load_state(exported.bundle)
    assert set(state) == {t.name for t in m.graph("model").data_inputs} - {"x", "labels"}
    assert not set(state) & {t.name for t in m.trainables}


def test_gradient_graph_holds_inference_operators_only(exported) -> None:  # type: ignore[no-untyped-def]
    import onnx

    for i in range(2):
        model = onnx.load(str(exported.bundle.graph_path(f"grad_{i}")))
        ops = {(n.domain, n.op_type) for n in model.graph.node}
        assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
        assert {op for _, op in ops} <= INFERENCE_OPS, {op for _, op in ops} - INFERENCE_OPS
        assert "ConvTranspose" in {op for _, op in ops}  # the input gradient of a convolution
        assert not model.functions


def test_gradient_graph_equals_torch_backprop_of_the_block(exported) -> None:  # type: ignore[no-untyped-def]
    """An independent route: nn.Conv2d / nn.BatchNorm2d modules in training mode, autograd."""
    import torch

    from fwdfleet.export.ff_cnn import torch_network

    b = exported.bundle
    rng = np.random.default_rng(5)
    values = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in b.load_trainables().items()}
    state = load_state(b)
    x, y = _toy(7, seed=3)
    net = torch_network(_config(), values, state).train()
    h0 = net.blocks[0](torch.from_numpy(x)).detach()
    h1 = net.blocks[1](h0)
    g = (net.heads[1](h1) ** 2).mean(dim=(2, 3))
    torch.nn.functional.cross_entropy(g, torch.from_numpy(y)).backward()
    runner = CNNRunner(b)
    out = runner.run("grad_1", {"x": h0.numpy(), "labels": y, **values, **state})
    for name in runner.block_trainables(1):
        param = net.get_parameter(name)
        np.testing.assert_allclose(out[f"grad.{name}"], param.grad.numpy(), rtol=1e-3, atol=1e-5)
    # the new running statistics are BatchNorm2d's momentum update on this batch
    bn = net.blocks[1].bn2
    np.testing.assert_allclose(out["new.blocks.1.bn2.running_mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["new.blocks.1.bn2.running_var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # graph model (inference-mode BN) == the torch network in eval mode, summed heads
    net = torch_network(_config(), values, state).eval()  # the training pass above moved its statistics
    with torch.no_grad():
        _, scores = net(torch.from_numpy(x))
    logits = runner.run("model", {"x": x, "labels": y, **values, **state})["logits"]
    np.testing.assert_allclose(logits, scores.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["gradient", "perturbed"])
def test_block_local_training_learns_and_updates_state(exported, mode: str) -> None:  # type: ignore[no-untyped-def]
    b = exported.bundle
    x, y = _toy(240)
    runner = CNNRunner(b)
    before = evaluate_sff(runner, b.load_trainables(), load_state(b), x, y)
    config = SFFTrainConfig(epochs=4, batch_size=20, mode=mode, num_perturbations=2, lr=3e-3)
    r = train_sff(b, x, y, config, runner=runner)
    after = evaluate_sff(runner, r.trainables, r.state, x, y)
    assert r.history[-1]["loss_block_1"] < r.history[0]["loss_block_1"]
    assert after["acc_last"] > before["acc_last"] + (0.3 if mode == "gradient" else 0.05)
    assert not np.allclose(r.state["blocks.0.bn1.running_mean"], load_state(b)["blocks.0.bn1.running_mean"])
    per_step = 1 if mode == "gradient" else 1 + 2 * config.num_perturbations
    assert r.metrics["block_graph_runs"] == r.metrics["steps"] * 2 * per_step
    # same config, same data: the same trainables
    again = train_sff(b, x, y, config, runner=runner)
    assert all(np.array_equal(again.trainables[k], v) for k, v in r.trainables.items())


def test_a_block_step_touches_only_its_block(exported) -> None:  # type: ignore[no-untyped-def]
    b = exported.bundle
    runner = CNNRunner(b)
    values = b.load_trainables()
    x, y = _toy(8)
    step, _ = block_step(runner, 0, values, load_state(b), x, y, SFFTrainConfig(), AdamState())
    assert set(step.params) == set(runner.block_trainables(0))
    assert step.h.shape == (8, 4, 4, 4) and np.isfinite(step.loss)


def test_bad_images_and_labels_name_the_field(exported) -> None:  # type: ignore[no-untyped-def]
    runner = CNNRunner(exported.bundle)
    x, y = _toy(10)
    with pytest.raises(DataError, match="channels but the bundle's in_channels is 1"):
        runner.check_data(np.zeros((10, 3, 8, 8), np.float32), y)
    with pytest.raises(DataError, match="image_size is 8x8"):
        runner.check_data(np.zeros((10, 1, 9, 8), np.float32), y)
    with pytest.raises(DataError, match=r"\(n, channels, height, width\)"):
        runner.check_data(np.zeros((10, 64), np.float32), y)
    with pytest.raises(DataError, match="num_classes"):
        runner.check_data(x, np.full(10, 3))
    with pytest.raises(DataError, match="batch_size"):
        train_sff(exported.bundle, x, y, SFFTrainConfig(batch_size=64))


def test_configs_that_do_not_chain_name_the_field() -> None:
    pytest.importorskip("torch")
    from fwdfleet.export.ff_cnn import BlockSpec, FFCNNConfig, parse_blocks

    with pytest.raises(ValueError, match=r"blocks\[1\]\.in_channels is 8 but blocks\[0\]\.out_channels is 4"):
        FFCNNConfig(blocks=(BlockSpec("conv", 1, 4), BlockSpec("conv", 8, 8)))
    with pytest.raises(ValueError, match=r"blocks\[0\]\.in_channels is 3 but FFCNNConfig\.in_channels is 1"):
        FFCNNConfig(blocks=(BlockSpec("conv", 3, 4),))
    with pytest.raises(ValueError, match=r"blocks\[2\]\.pool"):  # 28 -> 14 -> 7, then 7 cannot halve
        FFCNNConfig(blocks=parse_blocks("conv:1:4:pool,conv:4:4:pool,conv:4:4:pool"))
    with pytest.raises(ValueError, match="kind:in_channels:out_channels"):
        parse_blocks("conv:1")
    with pytest.raises(ValueError, match=r"BlockSpec\.kind"):
        parse_blocks("dense:1:4")
    with pytest.raises(ValueError, match="num_classes"):
        FFCNNConfig(num_classes=1)


def test_cli_refuses_a_bad_block_spec_and_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "fwdfleet.cli.main", "export", "ff-cnn", "--blocks",
                        "conv:1:8:pool,residual:16:16", "--out", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode != 0
    assert "blocks[1].in_channels is 16 but blocks[0].out_channels is 8" in r.stderr
    assert not out.exists() and not (tmp_path / "b.partial").exists()


def test_failed_parity_leaves_no_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from fwdfleet.export import ff_cnn

    def wrong(self, config, built, sample):  # type: ignore[no-untyped-def]
        return [np.asarray(r) + 1.0 for r in original(self, config, built, sample)]

    original = ff_cnn.FFCNNKind.reference
    monkeypatch.setattr(ff_cnn.FFCNNKind, "reference", wrong)
    config = ff_cnn.FFCNNConfig(blocks=(ff_cnn.BlockSpec("conv", 1, 2),), image_size=(4, 4), num_classes=2)
    with pytest.raises(ExportError, match="disagrees with the reference"):
        ff_cnn.KIND.export(config, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_device_side_does_not_import_torch(exported) -> None:  # type: ignore[no-untyped-def]
    code = f"""
import json, sys
import numpy as np
from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff_cnn import CNNRunner, SFFTrainConfig, train_sff
b = load_bundle({str(exported.bundle.path)!r})
x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
r = train_sff(b, x, np.arange(8) % 3, SFFTrainConfig(batch_size=4))
print(json.dumps({{"steps": r.metrics["steps"], "torch": "torch" in sys.modules}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(r.stdout.splitlines()[-1]) == {"steps": 2.0, "torch": False}


def _cifar_records(labels: list[int]) -> bytes:
    rng = np.random.default_rng(0)
    rows = [np.concatenate([[lab], rng.integers(0, 256, 3072)]).astype(np.uint8) for lab in labels]
    return b"".join(r.tobytes() for r in rows)


def test_cifar10_binary_batches(tmp_path: Path) -> None:
    labels = [3, 0, 9, 5]
    raw = _cifar_records(labels)
    (tmp_path / "data_batch_1.bin").write_bytes(raw[:2 * CIFAR10_RECORD])
    (tmp_path / "data_batch_2.bin").write_bytes(raw[2 * CIFAR10_RECORD:])
    (tmp_path / "test_batch.bin").write_bytes(raw[:CIFAR10_RECORD])
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and y.tolist() == labels
    rec = np.frombuffer(raw[CIFAR10_RECORD:2 * CIFAR10_RECORD], np.uint8)
    assert x[1, 0, 0, 1] == pytest.approx(rec[2] / 255)  # red plane first, row-major
    assert x[1, 1, 0, 0] == pytest.approx(rec[1 + 1024] / 255)  # then green
    assert x[1, 2, 31, 31] == pytest.approx(rec[-1] / 255)  # blue, last pixel
    xt, yt = load_cifar10(tmp_path, "test")
    assert xt.shape == (1, 3, 32, 32) and yt.tolist() == [3]


def test_cifar10_bad_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "short.bin").write_bytes(_cifar_records([1])[:-1])
    with pytest.raises(DataError, match="not a whole number of CIFAR-10 records of 3073 bytes"):
        load_cifar10_batch(tmp_path / "short.bin")
    (tmp_path / "c100.bin").write_bytes(_cifar_records([1, 42]))
    with pytest.raises(DataError, match="record 1 has label 42"):
        load_cifar10_batch(tmp_path / "c100.bin")
    with pytest.raises(DataError, match="no CIFAR-10 train batch"):
        load_cifar10(tmp_path / "missing", "train")
    with pytest.raises(DataError, match="split must be"):
        load_cifar10(tmp_path, "val")


def test_bundle_round_trip(exported) -> None:  # type: ignore[no-untyped-def]
    again = load_bundle(exported.bundle.path)
    assert again.manifest.kind == "ff_cnn" and "state.npz" in again.manifest.files
