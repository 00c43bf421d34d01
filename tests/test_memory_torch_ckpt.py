"""The torch baselines of `device memory`: backprop with and without gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
from _export_fixtures import tiny_llama_folder

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.memory import measure_memory
from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp
from fwdfleet.export.torch_memory import WORKERS


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory: pytest.TempPathFactory):
    folder = tiny_llama_folder(tmp_path_factory.mktemp("llama"))
    cfg = CausalLmExport(source=folder, lora=LoraSettings(rank=4, alpha=8), max_length=64)
    return export_causal_lm(cfg, tmp_path_factory.mktemp("out") / "llama").bundle


def test_torch_step_with_and_without_checkpointing(llama_bundle) -> None:
    report = measure_memory(llama_bundle.path, batch_size=2, sequence_length=32, modes=("train", "torch", "torch-ckpt"),
                            workers=WORKERS)
    plain, ckpt = report.figure("torch"), report.figure("torch-ckpt")
    assert plain.peak_mb and ckpt.peak_mb, (plain.note, ckpt.note)
    assert "checkpointing" in ckpt.note and "checkpointing" not in plain.note
    assert "torch" in ckpt.stages and ckpt.stages["peak"] == ckpt.peak_mb
    assert report.figure("train").peak_mb  # token ids within the tokenizer's 300, not a default 1,000
    assert report.to_json()["torch_ckpt_over_train"] == pytest.approx(ckpt.peak_mb / report.figure("train").peak_mb)


def test_checkpointing_needs_a_hugging_face_model(tmp_path: Path) -> None:
    bundle = load_bundle(export_mlp(MLPConfig(layer_sizes=(8, 4, 3)), tmp_path / "mlp"))
    figure = measure_memory(bundle.path, batch_size=4, modes=("torch-ckpt",), workers=WORKERS).figure("torch-ckpt")
    assert figure.peak_mb is None and "Hugging Face model" in figure.note
