"""Bottleneck-adapter sequence classifiers: parity, graph inputs, init, torch-free, training, rebuild, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _export_fixtures import TORCH_BLOCKER, minilm_folder, tiny_bert_folder

from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.cli import export_cmd
from fwdfleet.cli.main import main
from fwdfleet.device_runtime.data import ArrayDataset
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.train import LocalTrainConfig, train_local
from fwdfleet.errors import ExportError
from fwdfleet.export.adapters import ACTIVATIONS, AdapterSettings, BottleneckAdapter, inject_adapters
from fwdfleet.export.hf import ENCODER_METHODS, PEFT_METHODS
from fwdfleet.export.onnx_graph import GraphOptions
from fwdfleet.export.quantize import quantize_bundle_graph
from fwdfleet.export.rebuild import torch_twin_from_bundle
from fwdfleet.export.seq_cls import SeqClsExport, export_seq_cls

# fp32 parity tolerance between onnxruntime and torch (observed differences are ~1e-7)
ATOL, RTOL = 1e-4, 1e-4
LABELS = ("World", "Sports", "Business")
SIZE = 8
PREFIX = "backbone.encoder.layer"


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def adapter_bundle(bert_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    # the one dynamo export (dynamic batch and sequence); the others use the fast legacy exporter
    cfg = SeqClsExport(source=bert_folder, labels=LABELS, method="adapter", adapter=AdapterSettings(size=SIZE),
                       max_length=64)
    return export_seq_cls(cfg, tmp_path_factory.mktemp("out") / "bundle").bundle


def random_trainables(bundle: Bundle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (0.1 * rng.standard_normal(t.size).reshape(t.shape)).astype(np.float32)
            for t in bundle.manifest.trainables}


def batch(num_labels: int, seed: int, b: int, s: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, 30522, size=(b, s), dtype=np.int64)
    mask = np.ones((b, s), dtype=np.int64)
    mask[1, s // 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, num_labels, b, dtype=np.int64)}


def assert_parity(bundle: Bundle, tmp: Path, shape: tuple[int, int]) -> None:
    values = random_trainables(bundle, seed=7)
    moved = bundle.save_as(tmp / f"random{shape}", values)
    feed = batch(len(bundle.manifest.labels), seed=3, b=shape[0], s=shape[1])
    sess = ort.InferenceSession(str(moved.graph_path()), providers=["CPUExecutionProvider"])
    logits, loss, features = sess.run(["logits", "loss", "features"], {**feed, **values})
    twin = torch_twin_from_bundle(moved)  # rebuilt from manifest.settings, bundle values loaded
    inner: Any = twin.model
    with torch.no_grad():
        t_logits, t_loss, t_features = inner(**{k: torch.from_numpy(v) for k, v in feed.items()})
    np.testing.assert_allclose(loss, t_loss.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(features, t_features.numpy(), atol=ATOL, rtol=RTOL)
    # the random adapters really change the output: the same head on the initial (frozen) encoder differs
    init = bundle.load_trainables()
    frozen = {k: (v if k.startswith("head.") else init[k]) for k, v in values.items()}
    (plain,) = sess.run(["logits"], {**feed, **frozen})
    assert np.abs(plain - logits).max() > 1e-3


@pytest.mark.parametrize("shape", [(4, 19), (3, 7)])
def test_parity_with_torch_for_random_adapters(adapter_bundle: Bundle, tmp_path: Path,
                                               shape: tuple[int, int]) -> None:
    assert_parity(adapter_bundle, tmp_path, shape)


def test_adapters_and_head_are_named_float_graph_inputs(adapter_bundle: Bundle) -> None:
    m = adapter_bundle.manifest
    shapes = {t.name: t.shape for t in m.trainables}
    expected = {"head.weight": (3, 32), "head.bias": (3,)}
    for i in range(2):
        site = f"{PREFIX}.{i}.output.dense"
        expected |= {f"{site}.adapter_down.weight": (SIZE, 32), f"{site}.adapter_down.bias": (SIZE,),
                     f"{site}.adapter_up.weight": (32, SIZE), f"{site}.adapter_up.bias": (32,)}
    assert shapes == expected
    assert m.num_trainable == 2 * (2 * SIZE * 32 + SIZE + 32) + 3 * 32 + 3
    assert m.settings["peft"] == {"method": "adapter", "adapter": {"size": SIZE, "layers": None,
                                                                    "activation": "relu"}}
    model = onnx.load(str(adapter_bundle.graph_path()))
    inputs = {i.name: i for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    for name in shapes:
        assert name in inputs and name not in inits
        assert inputs[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not any("adapter" in n for n in inits)  # frozen weights only
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "labels"]
    assert [o.name for o in model.graph.output] == ["logits", "loss", "features"]


def test_initial_model_is_the_frozen_encoder(adapter_bundle: Bundle, bert_folder: Path) -> None:
    init = adapter_bundle.load_trainables()
    for name, value in init.items():
        if ".adapter_up." in name or ".adapter_down.bias" in name:
            assert not np.any(value), name
        if ".adapter_down.weight" in name:
            assert np.abs(value).max() > 0, name  # seeded, so the first perturbations of up move the loss
    from transformers import BertModel

    plain = BertModel.from_pretrained(bert_folder, attn_implementation="eager").eval()
    feed = batch(3, seed=11, b=3, s=10)
    with torch.no_grad():
        hidden = plain(input_ids=torch.from_numpy(feed["input_ids"]),
                       attention_mask=torch.from_numpy(feed["attention_mask"])).last_hidden_state.numpy()
    mask = feed["attention_mask"][..., None].astype(np.float32)
    features = (hidden * mask).sum(1) / mask.sum(1)
    expected = features @ init["head.weight"].T + init["head.bias"]
    sess = ort.InferenceSession(str(adapter_bundle.graph_path()), providers=["CPUExecutionProvider"])
    logits, loss = sess.run(["logits", "loss"], {**feed, **init})
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=RTOL)
    assert np.all(np.isfinite(loss)) and loss.shape == (3,)


def test_bundle_runs_and_estimates_where_torch_cannot_be_imported(adapter_bundle: Bundle) -> None:
    script = TORCH_BLOCKER + f"""
import json, sys, numpy as np
from tokenizers import Tokenizer
from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.task import RoundTask
from fwdfleet.bundle import load_bundle
b = load_bundle({str(adapter_bundle.path)!r})
tok = Tokenizer.from_file(str(b.path / "tokenizer" / "tokenizer.json"))
enc = tok.encode_batch(["Stocks rally as oil falls", "Team wins the final", "New chip is faster"])
n = max(len(e.ids) for e in enc)
feed = dict(input_ids=np.array([e.ids + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64),
            attention_mask=np.array([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in enc], dtype=np.int64),
            labels=np.array([2, 1, 0], dtype=np.int64))
session = BundleSession(b)
task = RoundTask(round_id=0, model_version=0, round_seed=42, device_index=0, num_perturbations=4)
result = estimate(session, b.load_trainables(), feed, task)
print(json.dumps({{"d": list(result.derivatives), "loss": result.loss_mean, "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] is False and np.isfinite(res["loss"])
    assert len(res["d"]) == 4 and all(np.isfinite(res["d"])) and any(abs(d) > 1e-6 for d in res["d"])


def test_perturbed_training_lowers_the_loss_on_a_separable_toy(adapter_bundle: Bundle, tmp_path: Path) -> None:
    # three classes told apart by a repeated marker token among random ones; measured: eval loss
    # 1.10 -> 0.53 and accuracy 0.28 -> 1.0 in 60 steps (~1 s)
    rng = np.random.default_rng(0)
    n, s = 64, 8
    labels = (np.arange(n) % 3).astype(np.int64)
    ids = rng.integers(1000, 1100, (n, s)).astype(np.int64)
    ids[:, 1:4] = np.array([2000, 3000, 4000])[labels][:, None]
    data = ArrayDataset({"input_ids": ids, "attention_mask": np.ones((n, s), np.int64), "labels": labels})
    session = BundleSession(adapter_bundle, SessionOptions(intra_op_threads=1))
    config = LocalTrainConfig(steps=60, num_perturbations=8, lr=0.05, eps=1e-2, batch_size=16, eval_every=0,
                              eval_examples=n)
    report = train_local(session, data, config, out=tmp_path / "trained", progress=False)
    first, last = report.evaluations[0], report.evaluations[-1]
    assert last.loss < 0.7 * first.loss and last.accuracy > first.accuracy
    assert report.skipped_perturbations == 0
    ups = [v for k, v in report.trainables.items() if ".adapter_up." in k]
    assert ups and all(np.abs(v).max() > 1e-3 for v in ups)  # the adapters trained, not just the head
    trained = load_bundle(report.saved_to)
    twin = torch_twin_from_bundle(trained)  # the trained adapter bundle rebuilds in torch
    loss = twin(**{k: torch.from_numpy(v[:8]) for k, v in data.arrays.items()})
    loss.mean().backward()  # the backprop baseline (device_runtime.memory, benchmarks.baselines)
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert {n.removeprefix("model.") for n in grads} == {t.name for t in trained.manifest.trainables}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    down = [g for n, g in grads.items() if ".adapter_down.weight" in n]
    assert all(g is not None and g.abs().max() > 0 for g in down)


def test_adapter_bitfit_on_chosen_layers_rebuilds_with_parity(bert_folder: Path, tmp_path: Path) -> None:
    graph = GraphOptions(exporter="legacy", batch_size=4, sequence_length=19)
    cfg = SeqClsExport(source=bert_folder, labels=("a", "b"), method="adapter+bitfit", max_length=32, seed=3,
                       adapter=AdapterSettings(size=4, layers=(1,), activation="gelu"), graph=graph)
    bundle = export_seq_cls(cfg, tmp_path / "ab").bundle
    names = [t.name for t in bundle.manifest.trainables]
    assert not any(n.startswith(f"{PREFIX}.0.output.dense.adapter") for n in names)
    assert f"{PREFIX}.1.output.dense.adapter_up.weight" in names
    assert f"{PREFIX}.1.output.dense.base.bias" in names and f"{PREFIX}.0.output.dense.bias" in names  # BitFit
    assert all(n.endswith(".bias") or ".adapter_" in n or n.startswith("head.") for n in names)
    assert not any("pooler" in n for n in names)
    record = bundle.manifest.settings["peft"]
    assert AdapterSettings.from_record(record["adapter"]) == cfg.adapter
    assert_parity(bundle, tmp_path, (4, 19))


def test_ia3_scales_keys_values_and_feed_forward_with_parity(bert_folder: Path, tmp_path: Path) -> None:
    graph = GraphOptions(exporter="legacy", batch_size=4, sequence_length=19)
    cfg = SeqClsExport(source=bert_folder, labels=("a", "b"), method="ia3", max_length=32, graph=graph)
    bundle = export_seq_cls(cfg, tmp_path / "ia3").bundle
    shapes = {t.name: t.shape for t in bundle.manifest.trainables}
    expected = {"head.weight": (2, 32), "head.bias": (2,)}
    for i in range(2):
        expected |= {f"{PREFIX}.{i}.attention.self.key.ia3_l.default": (32, 1),
                     f"{PREFIX}.{i}.attention.self.value.ia3_l.default": (32, 1),
                     f"{PREFIX}.{i}.output.dense.ia3_l.default": (1, 64)}  # rescales the FFN activation
    assert shapes == expected
    init = bundle.load_trainables()
    assert all(np.all(v == 1.0) for k, v in init.items() if ".ia3_l." in k)  # the frozen model at init
    assert set(bundle.manifest.settings["peft"]["ia3"]) == {"target_modules", "feedforward_modules"}
    assert_parity(bundle, tmp_path, (4, 19))  # rebuilt from the recorded regexes


def test_adapter_bundle_quantizes_with_float_trainables(adapter_bundle: Bundle, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    quantize_bundle_graph(adapter_bundle.graph_path(), out, "int8-weight")
    model = onnx.load(str(out))
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert all(inputs[t.name] == onnx.TensorProto.FLOAT for t in adapter_bundle.manifest.trainables)
    feed = {**batch(3, seed=5, b=4, s=12), **random_trainables(adapter_bundle, seed=1)}
    q_loss = ort.InferenceSession(str(out)).run(["loss"], feed)[0]
    f_loss = ort.InferenceSession(str(adapter_bundle.graph_path())).run(["loss"], feed)[0]
    np.testing.assert_allclose(q_loss, f_loss, atol=0.05)


def test_cli_exports_an_adapter_bundle(bert_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(["export", "seq-cls", str(bert_folder), "--num-labels", "2", "--method", "adapter",
                 "--adapter-size", "4", "--adapter-layers", "0", "--max-length", "32", "--exporter", "legacy",
                 "--batch-size", "2", "--sequence-length", "8", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert max(summary["parity_max_abs_diff"].values()) < ATOL
    assert summary["trainable_values"] == (2 * 4 * 32 + 4 + 32) + 2 * 32 + 2
    m = load_bundle(out).manifest
    assert m.settings["peft"] == {"method": "adapter", "adapter": {"size": 4, "layers": [0], "activation": "relu"}}
    assert export_cmd.ENCODER_METHODS == ENCODER_METHODS and export_cmd.LM_METHODS == PEFT_METHODS
    assert export_cmd.ADAPTER_ACTIVATIONS == ACTIVATIONS


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "lora", "--adapter-size", "4"], "--adapter-size only apply to --method adapter"),
    (["--method", "adapter", "--adapter-size", "0"], "AdapterSettings.size must be >= 1"),
    (["--method", "adapter", "--adapter-layers", "0,x"], "--adapter-layers must be comma-separated integers"),
    (["--method", "adapter", "--adapter-layers", "5"], r"AdapterSettings.layers [5] out of range"),
])
def test_cli_rejects_bad_adapter_options(bert_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         extra: list[str], message: str) -> None:
    code = main(["export", "seq-cls", str(bert_folder), "--num-labels", "2", "--exporter", "legacy",
                 "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_adapters_on_unsupported_architectures_say_what_is_supported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model

    folder = tmp_path / "distilbert"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder / name)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(config).save_pretrained(folder)
    code = main(["export", "seq-cls", str(folder), "--num-labels", "2", "--method", "adapter", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "not supported for 'distilbert'" in err and "bert, electra, roberta, xlm-roberta" in err
    assert "use --method lora or bitfit" in err
    # DistilBERT's other PEFT methods still export; IA3 scales its k_lin, v_lin and ffn.lin2
    graph = GraphOptions(exporter="legacy", batch_size=2, sequence_length=8)
    ia3 = export_seq_cls(SeqClsExport(source=folder, labels=("a", "b"), method="ia3", max_length=32, graph=graph),
                         tmp_path / "ia3").bundle
    assert sorted(t.name.split(".")[-3] for t in ia3.manifest.trainables if ".ia3_l." in t.name) == [
        "k_lin", "lin2", "v_lin"]
    with pytest.raises(ExportError, match=r"not supported for model type 'gpt2'.*bert, electra"):
        inject_adapters(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2)), AdapterSettings(), seed=0)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"size": 0}, "AdapterSettings.size"), ({"layers": ()}, "AdapterSettings.layers"),
    ({"layers": (0, 0)}, "AdapterSettings.layers"), ({"layers": (-1,)}, "AdapterSettings.layers"),
    ({"activation": "swish"}, "AdapterSettings.activation"),
])
def test_adapter_settings_are_validated(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ExportError, match=field):
        AdapterSettings(**kwargs)


def test_adapter_module_adds_a_zero_residual_at_init() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    adapter = BottleneckAdapter(base, 3, "tanh")
    x = torch.randn(2, 6)
    torch.testing.assert_close(adapter(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        adapter.adapter_up.weight.fill_(0.5)
    h = base(x)
    torch.testing.assert_close(adapter(x), h + 0.5 * torch.tanh(adapter.adapter_down(h)).sum(-1, keepdim=True))
