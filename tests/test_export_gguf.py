"""`fwdfleet export causal-lm` from a GGUF file (the llama.cpp format) and its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _gguf_fixture import tiny_llama_gguf

from fwdfleet.cli.main import main
from fwdfleet.errors import ExportError
from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
from fwdfleet.export.hf import LoraSettings
from fwdfleet.export.rebuild import torch_twin_from_bundle


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_gguf_exports_a_verified_lora_bundle_with_its_tokenizer(gguf_file: Path, tmp_path: Path) -> None:
    import torch
    from tokenizers import Tokenizer

    cfg = CausalLmExport(source=gguf_file, lora=LoraSettings(rank=4, alpha=8), max_length=32)
    result = export_causal_lm(cfg, tmp_path / "b")
    bundle = result.bundle
    m = bundle.manifest
    assert m.settings["source"] == str(gguf_file.resolve()) and m.settings["model_type"] == "llama"
    assert {t.name.split(".")[-3] for t in m.trainables} == {"lora_A", "lora_B"}
    assert result.parity and max(result.parity.values()) < 1e-4  # the export-time check against torch
    tok = Tokenizer.from_file(str(bundle.path / "tokenizer" / "tokenizer.json"))  # the device's tokenizer
    ids = tok.encode("Stocks rally as oil prices fall").ids
    assert ids and max(ids) < 300

    # the GGUF weights are the frozen weights: the torch twin rebuilt from the file gives the bundle's loss
    twin = torch_twin_from_bundle(bundle)
    batch = {"input_ids": np.array([ids[:8], ids[:8]], dtype=np.int64), "attention_mask": np.ones((2, 8), np.int64)}
    from fwdfleet.device_runtime.session import BundleSession

    ort_loss = BundleSession(bundle).run(bundle.load_trainables(), batch, ("loss",))["loss"]
    with torch.no_grad():
        torch_loss = twin(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
    np.testing.assert_allclose(ort_loss, torch_loss, atol=1e-4, rtol=1e-4)


def test_bad_gguf_files_are_named_with_the_fix(gguf_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    mamba = tiny_llama_gguf(tmp_path / "mamba.gguf", architecture="mamba")
    cases = [(truncated, "truncated or corrupt"), (not_gguf, "not a readable GGUF"),
             (mamba, "architecture 'mamba' is not supported"), (tmp_path / "missing.gguf", "not found")]
    for path, message in cases:
        out = tmp_path / f"out-{path.stem}"
        with pytest.raises(ExportError, match=message):
            export_causal_lm(CausalLmExport(source=path), out)
        assert not out.exists(), "nothing half-written where a bundle was expected"


def test_cli_exports_from_a_gguf_file(gguf_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a real process, as a user runs it: third-party log handlers write to its stderr
    cmd = [sys.executable, "-m", "fwdfleet.cli.main", "export", "causal-lm", str(gguf_file), "--out",
           str(tmp_path / "cli"), "--max-length", "32", "--rank", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "de-quantizing" not in proc.stderr and "torchvision" not in proc.stderr, proc.stderr  # no noise
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["kind"] == "causal_lm_lora" and manifest["settings"]["source"].endswith("tiny-llama.gguf")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:1000])
    assert main(["export", "causal-lm", str(truncated), "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt" in err[0]
