"""Memory measurement in fresh processes, the EP benchmark, and the `fwdfleet device` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny_bundles import make_classifier_bundle

from fwdfleet.cli.main import main
from fwdfleet.device_runtime.bench import benchmark, format_table
from fwdfleet.device_runtime.memory import RuntimeOptions, measure_memory
from fwdfleet.errors import ConfigError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return make_classifier_bundle(tmp_path_factory.mktemp("mb"), in_dim=32, num_classes=4, hidden=16)


def test_peak_rss_reads_vmhwm() -> None:
    """A touched 40 MiB block raises the high-water mark by 40 MiB, in KiB.

    In a fresh interpreter: this test process's mark may lie far above its current use, so a
    new block could leave it where it is.
    """
    code = (
        "import numpy as np\n"
        "from fwdfleet.device_runtime.memory import peak_rss_kb\n"
        "before = peak_rss_kb()\n"
        "block = np.ones(40 * 1024 * 1024 // 8)\n"  # 40 MiB, touched by np.ones
        "print(before, peak_rss_kb())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after = (int(v) for v in out.stdout.split())
    assert 38 * 1024 <= after - before <= 44 * 1024, (before, after)


def test_memory_figures_come_from_fresh_processes(bundle) -> None:
    report = measure_memory(bundle.path, batch_size=8, num_perturbations=4, modes=("inference", "train"))
    inf, train = report.figure("inference"), report.figure("train")
    assert inf.peak_mb and train.peak_mb and inf.baseline_mb
    assert inf.peak_mb < 1000 and inf.peak_mb >= inf.baseline_mb  # a fresh interpreter, not this test process
    assert train.note == "8 forwards + update"
    assert report.train_over_inference is not None and report.train_over_inference <= 1.1
    assert json.loads(json.dumps(report.to_json()))["train_over_inference"] == report.train_over_inference
    stages = list(train.stages)
    assert stages == ["interpreter", "numpy", "onnxruntime", "runtime modules", "session created", "peak"]
    values = list(train.stages.values())
    assert values == sorted(values) and train.stages["peak"] == train.peak_mb  # a high-water mark only grows
    assert train.baseline_mb == train.stages["runtime modules"]


def test_memory_options_reach_the_worker(bundle) -> None:
    opts = RuntimeOptions(enable_cpu_mem_arena=False, enable_mem_pattern=True, disable_prepacking=True,
                          graph_optimization="basic", allow_spinning=True, chunk=7, threads=1)  # fmt: skip
    report = measure_memory(bundle.path, batch_size=4, modes=("train",), options=opts)
    assert report.figure("train").peak_mb and report.to_json()["options"]["chunk"] == 7
    with pytest.raises(ValueError, match=r"RuntimeOptions\.chunk"):
        RuntimeOptions(chunk=0)


def test_memory_worker_errors_become_notes(tmp_path: Path) -> None:
    report = measure_memory(tmp_path / "missing", modes=("inference",))
    assert report.figure("inference").peak_mb is None
    assert "BundleError" in report.figure("inference").note


def test_bench_reports_percentiles_and_peak(bundle) -> None:
    (result,) = benchmark([bundle.path], ["cpu"], warmup=1, count=10, train_count=3, batch_size=4)
    assert not result.error and result.quantization == "fp32" and result.num_trainable == 32 * 16 + 16 + 16 * 4 + 4
    assert result.inference and result.train_step and result.peak_mb
    assert result.inference.count == 10 and result.train_step.count == 3
    assert result.inference.p50_ms <= result.inference.p90_ms <= result.inference.p99_ms
    assert result.train_step.p50_ms > result.inference.p50_ms  # a step is 2K forwards
    assert "CPUExecutionProvider" in format_table([result])
    with pytest.raises(ConfigError, match="not available"):
        benchmark([bundle.path], ["nnapi"])


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fwdfleet device: error:"), err
    return err[0]


def test_cli_device_commands(bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=(x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0))
    out = tmp_path / "trained"
    argv = ["device", "train", str(bundle.path), "--data", str(tmp_path / "d.npz"), "--steps", "30", "--k", "4",
            "--lr", "0.01", "--batch-size", "16", "--out", str(out), "--no-progress", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 30 and summary["saved_to"] == str(out)
    assert [e["step"] for e in summary["evaluations"]] == [0, 30]  # learning itself: test_local_train.py
    assert (out / "manifest.json").is_file()

    assert main(["device", "memory", str(bundle.path), "--modes", "inference,train", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)
    assert [f["mode"] for f in mem["figures"]] == ["inference", "train"]
    assert mem["options"]["enable_mem_pattern"] is False

    assert main(["device", "memory", str(bundle.path), "--modes", "train", "--no-arena", "--mem-pattern"]) == 0
    out = capsys.readouterr().out
    assert "arena off, memory pattern on" in out and "stages (peak MB): interpreter" in out

    assert main(["device", "bench", str(bundle.path), "--count", "3", "--train-count", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["provider"] == "CPUExecutionProvider"

    assert main(["device", "providers", "--json"]) == 0
    assert "CPUExecutionProvider" in json.loads(capsys.readouterr().out)["providers"]


def test_cli_bad_input_exits_nonzero_with_one_line(bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = str(bundle.path)
    assert "data path not found" in _one_line_error(capsys, ["device", "train", b, "--data", str(tmp_path / "no.csv")])
    assert "LocalTrainConfig.steps" in _one_line_error(
        capsys, ["device", "train", b, "--data", str(tmp_path), "--steps", "0"]
    )
    assert "not available" in _one_line_error(capsys, ["device", "bench", b, "--providers", "cuda"])
    assert "--modes" in _one_line_error(capsys, ["device", "memory", b, "--modes", "gpu"])
    assert "RuntimeOptions.chunk" in _one_line_error(capsys, ["device", "memory", b, "--chunk", "0"])
    assert "bundle not found" in _one_line_error(capsys, ["device", "memory", str(tmp_path / "nothing")])
    corrupt = tmp_path / "corrupt"
    make_classifier_bundle(corrupt, in_dim=4, num_classes=2)
    (corrupt / "trainables.npz").write_bytes(b"garbage")
    assert "checksum mismatch" in _one_line_error(capsys, ["device", "bench", str(corrupt)])
