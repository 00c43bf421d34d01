"""Export of LoRA/BitFit sequence classifiers: parity with torch, graph inputs, torch-free run, int8."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _export_fixtures import TORCH_BLOCKER, minilm_folder, tiny_bert_folder

from fwdfleet.bundle import Bundle, load_bundle, write_bundle
from fwdfleet.cli.main import main
from fwdfleet.errors import BundleError
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.onnx_graph import GraphOptions
from fwdfleet.export.quantize import quantize_bundle_graph
from fwdfleet.export.rebuild import torch_twin_from_bundle
from fwdfleet.export.seq_cls import SeqClsExport, export_seq_cls

# fp32 parity tolerance between onnxruntime and torch (observed differences are ~1e-6)
ATOL, RTOL = 1e-4, 1e-4
LABELS = ("World", "Sports", "Business")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def lora_bundle(bert_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    cfg = SeqClsExport(source=bert_folder, labels=LABELS, lora=LoraSettings(rank=4, alpha=8), max_length=64)
    return export_seq_cls(cfg, tmp_path_factory.mktemp("out") / "bundle").bundle


def random_trainables(bundle: Bundle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name:
            (0.1 * rng.standard_normal(t.size).reshape(t.shape)).astype(np.float32)
            for t in bundle.manifest.trainables}


def batch(vocab: int, num_labels: int, seed: int, b: int = 4, s: int = 19) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, vocab, size=(b, s), dtype=np.int64)
    mask = np.ones((b, s), dtype=np.int64)
    mask[1, 11:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, num_labels, b, dtype=np.int64)}


def assert_parity(bundle: Bundle, tmp: Path, vocab: int, shape: tuple[int, int] = (4, 19)) -> None:
    values = random_trainables(bundle, seed=7)
    assert all(np.abs(v).max() > 0 for v in values.values())
    moved = bundle.save_as(tmp / "random", values)
    feed = batch(vocab, len(bundle.manifest.labels), seed=3, b=shape[0], s=shape[1])
    sess = ort.InferenceSession(str(moved.graph_path()), providers=["CPUExecutionProvider"])
    logits, loss, features = sess.run(["logits", "loss", "features"], {**feed, **values})
    twin = torch_twin_from_bundle(moved)
    inner: Any = twin.model
    with torch.no_grad():
        t_logits, t_loss, t_features = inner(**{k: torch.from_numpy(v) for k, v in feed.items()})
        t_only = twin(**{k: torch.from_numpy(v) for k, v in feed.items()})
    np.testing.assert_allclose(loss, t_loss.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(features, t_features.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(t_only.numpy(), t_loss.numpy())
    assert loss.shape == (4,) and logits.shape == (4, len(bundle.manifest.labels))


def test_lora_parity_with_torch_for_random_trainables(lora_bundle: Bundle, tmp_path: Path) -> None:
    assert_parity(lora_bundle, tmp_path, vocab=30522)


def test_trainables_are_named_graph_inputs_not_initializers(lora_bundle: Bundle) -> None:
    m = lora_bundle.manifest
    names = [t.name for t in m.trainables]
    assert "head.weight" in names and "head.bias" in names
    assert "backbone.encoder.layer.0.attention.self.query.lora_A.default.weight" in names
    assert sum("lora_" in n for n in names) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    model = onnx.load(str(lora_bundle.graph_path()))
    inputs = {i.name: i for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    for t in m.trainables:
        assert t.name in inputs and t.name not in inits
        assert inputs[t.name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "labels"]
    assert [o.name for o in model.graph.output] == ["logits", "loss", "features"]
    assert len(list(lora_bundle.path.glob("*.data"))) == 0  # under 2 GB: one model.onnx


def test_manifest_records_rebuild_settings_labels_and_tokenizer(lora_bundle: Bundle, bert_folder: Path) -> None:
    m = lora_bundle.manifest
    assert m.kind == "seq_cls_lora" and m.labels == LABELS and m.quantization is None
    s = m.settings
    assert s["source"] == str(bert_folder.resolve()) and s["num_labels"] == 3 and s["pooling"] == "mean"
    assert s["peft"]["lora"] == {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]}
    assert s["head"] == {"type": "linear", "in_features": 32, "out_features": 3}
    assert m.tokenizer is not None and "tokenizer/tokenizer.json" in m.tokenizer.files
    assert m.tokenizer.max_length == 64
    init = lora_bundle.load_trainables()
    assert not np.any(init["backbone.encoder.layer.0.attention.self.query.lora_B.default.weight"])  # peft init


def test_bundle_runs_where_torch_cannot_be_imported(lora_bundle: Bundle) -> None:
    script = TORCH_BLOCKER + f"""
import json, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
from fwdfleet.bundle import load_bundle
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass
b = load_bundle({str(lora_bundle.path)!r})
tok = Tokenizer.from_file(str(b.path / "tokenizer" / "tokenizer.json"))
enc = tok.encode_batch(["Stocks rally as oil falls", "Team wins the final"])
n = max(len(e.ids) for e in enc)
ids = np.array([e.ids + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64)
mask = np.array([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64)
sess = ort.InferenceSession(str(b.graph_path()), providers=["CPUExecutionProvider"])
feed = dict(input_ids=ids, attention_mask=mask, labels=np.array([2, 1], dtype=np.int64), **b.load_trainables())
loss, = sess.run(["loss"], feed)
print(json.dumps({{"loss": loss.tolist(), "torch": "torch" in __import__("sys").modules}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["loss"]) == 2 and all(np.isfinite(res["loss"])) and res["torch"] is False


@pytest.mark.parametrize(("mode", "op", "tol"), [("int8", "MatMulInteger", None), ("int8-weight", "MatMulNBits", 0.05)])
def test_quantized_bundle_keeps_float_trainable_inputs(lora_bundle: Bundle, tmp_path: Path,
                                                       mode: str, op: str, tol: float | None) -> None:
    out = tmp_path / "q"
    shutil.copytree(lora_bundle.path, out)
    (out / "manifest.json").unlink()
    (out / "trainables.npz").unlink()
    quantize_bundle_graph(lora_bundle.graph_path(), out / "model.onnx", mode)
    write_bundle(out, replace(lora_bundle.manifest, quantization="int8"), lora_bundle.load_trainables())
    qb = load_bundle(out)
    model = onnx.load(str(qb.graph_path()))
    assert any(n.op_type == op for n in model.graph.node)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    for t in qb.manifest.trainables:
        assert inputs[t.name] == onnx.TensorProto.FLOAT and t.name not in inits
    values = random_trainables(qb, seed=1)
    feed = {**batch(30522, 3, seed=5), **values}
    q_loss = ort.InferenceSession(str(qb.graph_path())).run(["loss"], feed)[0]
    f_loss = ort.InferenceSession(str(lora_bundle.graph_path())).run(["loss"], feed)[0]
    assert q_loss.shape == (4,) and np.all(np.isfinite(q_loss))
    if tol is not None:  # weight-only 8-bit stays close to fp32
        np.testing.assert_allclose(q_loss, f_loss, atol=tol)


def test_quantized_export_states_its_measured_deviation(bert_folder: Path, tmp_path: Path) -> None:
    graph = GraphOptions(exporter="legacy", batch_size=4, sequence_length=19)
    cfg = SeqClsExport(source=bert_folder, labels=LABELS, max_length=32, graph=graph, quantize="int8-weight")
    result = export_seq_cls(cfg, tmp_path / "q")
    summary = result.summary()
    assert summary["quantization"] == "int8"
    assert set(summary["quantized_max_abs_diff"]) == {"logits", "loss", "features"}
    assert max(summary["parity_max_abs_diff"].values()) < ATOL  # fp32 graph checked strictly before quantizing
    deviation = result.bundle.manifest.settings["quantized_max_abs_diff"]
    assert deviation == summary["quantized_max_abs_diff"] and 0 < deviation["loss"] < 0.05
    model = onnx.load(str(result.bundle.graph_path()))
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)


def test_bitfit_trains_biases_and_head_with_parity(bert_folder: Path, tmp_path: Path) -> None:
    # also covers the legacy exporter with fixed shapes (fast; shapes cannot be mis-specialised)
    graph = GraphOptions(exporter="legacy", batch_size=4, sequence_length=19, opset=17)
    cfg = SeqClsExport(source=bert_folder, labels=("a", "b"), method="bitfit", max_length=32, pooling="cls",
                       graph=graph)
    bundle = export_seq_cls(cfg, tmp_path / "bitfit").bundle
    assert bundle.manifest.graph().inputs[0].shape == (4, 19) and bundle.manifest.opset == 17
    names = [t.name for t in bundle.manifest.trainables]
    assert names and all(n.endswith(".bias") or n.startswith("head.") for n in names)
    assert not any("lora" in n or "pooler" in n for n in names)
    assert_parity(bundle, tmp_path, vocab=30522)


def test_real_minilm_export_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "minilm"
    code = main(["export", "seq-cls", str(minilm_folder()), "--labels", "World,Sports,Business,Sci/Tech",
                 "--max-length", "64", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["export_seconds"] < 60
    assert max(summary["parity_max_abs_diff"].values()) < ATOL
    bundle = load_bundle(out)
    assert bundle.manifest.num_trainable == 6 * 2 * 2 * 8 * 384 + 4 * 384 + 4
    assert_parity(bundle, tmp_path, vocab=30522)


def test_graph_over_the_protobuf_limit_is_written_with_one_external_data_file(
    bert_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The >2 GB path on a tiny model: lower the limit so that its weights must go to external data.
    import fwdfleet.export.kinds as kinds

    monkeypatch.setattr(kinds, "TWO_GB", 1)
    monkeypatch.setattr(kinds, "EXTERNAL_DATA_MARGIN", 0)
    graph = GraphOptions(exporter="legacy", batch_size=4, sequence_length=19)
    cfg = SeqClsExport(source=bert_folder, labels=LABELS, max_length=32, graph=graph)
    bundle = export_seq_cls(cfg, tmp_path / "big").bundle
    assert sorted(p.name for p in bundle.path.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert "model.onnx.data" in bundle.manifest.files  # checksummed like every other file
    assert_parity(bundle, tmp_path, vocab=30522)  # onnxruntime finds the weights beside the graph
    (bundle.path / "model.onnx.data").write_bytes(b"corrupt")
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.onnx\.data"):
        load_bundle(bundle.path)
