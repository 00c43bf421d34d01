"""Bad input to `fwdfleet export` gives a one-line cause and exit status 2, never a bare traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _export_fixtures import TORCH_BLOCKER, tiny_bert_folder

from fwdfleet.cli.main import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def seq_cls(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "seq-cls", str(folder), "--num-labels", "2", "--out", str(out), *extra]


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, msg = run_cli(seq_cls(tmp_path / "nope", tmp_path / "o"), capsys)
    assert code == 2 and "model folder not found" in msg and msg.startswith("fwdfleet export: error:")


def test_non_hf_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code, msg = run_cli(seq_cls(tmp_path, tmp_path / "o"), capsys)
    assert code == 2 and "not a Hugging Face model folder (no config.json)" in msg


def test_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, msg = run_cli(seq_cls(tmp_path, tmp_path / "o"), capsys)
    assert code == 2 and "unsupported architecture 'llama'" in msg and "bert" in msg
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, msg = run_cli(["export", "causal-lm", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unsupported architecture 't5'" in msg and "gpt2, llama" in msg


def test_target_modules_matching_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny_bert_folder(tmp_path / "bert")
    code, msg = run_cli(seq_cls(folder, tmp_path / "o", "--target-modules", "query,q_proj"), capsys)
    assert code == 2 and "'q_proj' matches no Linear layer" in msg and "query" in msg
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_corrupted_bundle_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny_bert_folder(tmp_path / "bert")
    out = tmp_path / "bundle"
    fast = ["--exporter", "legacy", "--batch-size", "2", "--sequence-length", "8", "--opset", "17"]
    assert main(seq_cls(folder, out, *fast, "--max-length", "16")) == 0
    code, msg = run_cli(seq_cls(folder, out, *fast), capsys)  # refuses to overwrite silently
    assert code == 2 and "--overwrite" in msg
    assert main(["bundle", "inspect", str(out)]) == 0
    with np.load(out / "trainables.npz") as z:
        values = {k: z[k] for k in z.files}
    values["head.bias"] = values["head.bias"] + 1.0
    np.savez(out / "trainables.npz", **values)
    code, msg = run_cli(["bundle", "inspect", str(out)], capsys)
    assert code == 2 and "checksum mismatch for trainables.npz" in msg


def test_missing_export_extra_gives_install_hint(tmp_path: Path) -> None:
    script = TORCH_BLOCKER + f"""
from fwdfleet.cli.main import main
raise SystemExit(main(["export", "seq-cls", {str(tmp_path)!r}, "--num-labels", "2", "--out", {str(tmp_path / "o")!r}]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "pip install torch==2.13.0 && pip install 'fwdfleet[export]'" in lines[0]
    helped = subprocess.run([sys.executable, "-c", TORCH_BLOCKER + "from fwdfleet.cli.main import main\n"
                             "raise SystemExit(main(['export', '--help']))"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and "seq-cls" in helped.stdout and "causal-lm" in helped.stdout
