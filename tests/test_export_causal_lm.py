"""Export of LoRA causal LMs (Llama with a sentencepiece tokenizer, GPT-2 with byte-level BPE)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _export_fixtures import TORCH_BLOCKER, tiny_gpt2_folder, tiny_llama_folder

from fwdfleet.bundle import Bundle
from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.rebuild import torch_twin_from_bundle

# fp32 parity tolerance between onnxruntime and torch (observed differences are ~1e-6)
ATOL, RTOL = 1e-4, 1e-4
FOLDERS: dict[str, Callable[[Path], Path]] = {"llama": tiny_llama_folder, "gpt2": tiny_gpt2_folder}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    folder = FOLDERS[request.param](tmp_path_factory.mktemp(request.param))
    cfg = CausalLmExport(source=folder, lora=LoraSettings(rank=4, alpha=8), max_length=64)
    return export_causal_lm(cfg, tmp_path_factory.mktemp("out") / request.param).bundle


def batch(vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(3, 21), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_parity_with_torch_for_random_trainables(lm_bundle: Bundle, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    values = {t.name:
            (0.1 * rng.standard_normal(t.size).reshape(t.shape)).astype(np.float32)
            for t in lm_bundle.manifest.trainables}
    moved = lm_bundle.save_as(tmp_path / "moved", values)
    vocab = int(moved.manifest.graph().outputs[0].shape[-1])
    feed = batch(vocab, seed=2)
    logits, loss = ort.InferenceSession(str(moved.graph_path())).run(["logits", "loss"], {**feed, **values})
    twin = torch_twin_from_bundle(moved)
    inner: Any = twin.model
    assert {n for n, p in twin.named_parameters() if p.requires_grad} == {f"model.{n}" for n in values}
    with torch.no_grad():
        t_logits, t_loss = inner(**{k: torch.from_numpy(v) for k, v in feed.items()})
    assert loss.shape == (3,) and logits.shape == (3, 21, vocab)
    np.testing.assert_allclose(loss, t_loss.numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=ATOL, rtol=RTOL)
    # the loss is the mean next-token cross-entropy over non-padded targets, computed by hand
    lg = logits[:, :-1].astype(np.float64)
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, feed["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = feed["attention_mask"][:, 1:]
    np.testing.assert_allclose(loss, (nll * w).sum(1) / w.sum(1), rtol=1e-4)


def test_padding_is_masked_out_of_the_loss(lm_bundle: Bundle) -> None:
    values = lm_bundle.load_trainables()
    vocab = int(lm_bundle.manifest.graph().outputs[0].shape[-1])
    feed = batch(vocab, seed=4)
    sess = ort.InferenceSession(str(lm_bundle.graph_path()))
    before = sess.run(["loss"], {**feed, **values})[0]
    feed["input_ids"][1, 9:] = (feed["input_ids"][1, 9:] + 1) % vocab  # change only padded tokens
    after = sess.run(["loss"], {**feed, **values})[0]
    np.testing.assert_allclose(after[1], before[1], rtol=1e-5)
    np.testing.assert_array_equal(after[0], before[0])


def test_trainables_are_graph_inputs_and_tokenizer_is_shipped(lm_bundle: Bundle) -> None:
    m = lm_bundle.manifest
    model = onnx.load(str(lm_bundle.graph_path()))
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    assert m.trainables and all("lora_" in t.name for t in m.trainables)
    for t in m.trainables:
        assert inputs[t.name] == onnx.TensorProto.FLOAT and t.name not in inits
    assert [o.name for o in model.graph.output] == ["logits", "loss"]
    assert m.kind == "causal_lm_lora" and m.tokenizer is not None
    assert "tokenizer/tokenizer.json" in m.tokenizer.files
    assert m.settings["peft"]["lora"]["rank"] == 4 and "pad_token_id" in m.settings


def test_runs_where_torch_cannot_be_imported(lm_bundle: Bundle) -> None:
    script = TORCH_BLOCKER + f"""
import json, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
from fwdfleet.bundle import load_bundle
b = load_bundle({str(lm_bundle.path)!r})
tok = Tokenizer.from_file(str(b.path / "tokenizer" / "tokenizer.json"))
ids = tok.encode("Oil prices rise as markets open in Asia").ids[:12]
feed = dict(input_ids=np.array([ids], dtype=np.int64), attention_mask=np.ones((1, len(ids)), dtype=np.int64))
loss, = ort.InferenceSession(str(b.graph_path())).run(["loss"], {{**feed, **b.load_trainables()}})
print(json.dumps({{"loss": loss.tolist(), "n": len(ids), "torch": "torch" in __import__("sys").modules}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] >= 3 and np.isfinite(res["loss"][0]) and res["torch"] is False
