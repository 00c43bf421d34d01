"""A quantized copy of an fp32 bundle without a second export (export.quantize.quantize_bundle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _gguf_fixture import tiny_llama_gguf

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import ExportError
from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.quantize import quantize_bundle


def test_quantized_copy_keeps_trainables_graphs_and_tokenizer(tmp_path: Path) -> None:
    mode = "int4-weight"
    source = tiny_llama_gguf(tmp_path / "tiny.gguf")
    cfg = CausalLmExport(source=source, lora=LoraSettings(rank=2, alpha=4), max_length=16)
    fp32 = export_causal_lm(cfg, tmp_path / "fp32").bundle
    q = load_bundle(quantize_bundle(fp32, tmp_path / "q", mode), verify=True)
    assert q.manifest.quantization and q.manifest.quantization != fp32.manifest.quantization
    assert [g.name for g in q.manifest.graphs] == [g.name for g in fp32.manifest.graphs]
    assert q.manifest.tokenizer == fp32.manifest.tokenizer and (q.path / "tokenizer" / "tokenizer.json").is_file()
    w = fp32.load_trainables()
    assert all(np.array_equal(w[k], v) for k, v in q.load_trainables().items())
    ids = np.random.default_rng(0).integers(3, 290, size=(2, 12))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    a = BundleSession(fp32).run(w, batch)["loss"]
    b = BundleSession(q).run(w, batch)["loss"]
    assert not np.array_equal(a, b) and np.allclose(a, b, rtol=0.05)  # quantized, and close
    with pytest.raises(ExportError, match="already quantized"):
        quantize_bundle(q, tmp_path / "again", mode)
    assert not (tmp_path / "again").exists()
