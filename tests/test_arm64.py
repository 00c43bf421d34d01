"""The device side on ARM64, emulated on this x86 machine (qemu user mode, aarch64 Debian userland).

The userland is built by ``android_harness/arm64/build_userland.sh`` (cached outside the repo);
``android_harness/arm64/run.sh`` runs its python3 under ``qemu-aarch64-static`` with an ARM
``/proc/cpuinfo``. These tests skip unless that userland exists, or ``FWDFLEET_ARM64=1`` asks
to build it here. In CI (``.ci/run`` sets ``FWDFLEET_CI=1`` and ``FWDFLEET_ARM64=1``) a missing
qemu or a userland that does not build fails the run instead.

What runs on the emulated ARM CPU: the imports of the device stack without torch, the
perturbation generator (compared bit for bit with this x86 host), an onnxruntime training step
on a tiny bundle, and a real federated round over gRPC against an x86 aggregator on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _prereqs import missing

from fwdfleet.perturbation import perturbation

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "android_harness" / "arm64"
STAMP = ".fwdfleet-userland"

# Prepended to every emulated script: refuse torch & co. as a phone that installed only the base
# dependencies would (the userland does not have them either; this makes the intent explicit).
BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "peft", "onnxscript", "onnx"}:
                raise ImportError(f"{name} is blocked: the device side must not need it")
            return None
    sys.meta_path.insert(0, _Block())
    """
)

# (round_seed, device, k, n): edge values of every counter word, and lengths that end mid-word
# and mid-block of the Philox stream.
CASES = [
    (0, 0, 0, 1),
    (1, 2, 3, 33),
    (12345, 0, 7, 1000),
    (2**32 + 5, 7, 0, 4099),
    (2**63 + 11, 2**32 - 1, 2**32 - 1, 257),
    (2**64 - 1, 123456, 65536, 2048),
]


def userland_root() -> Path:
    if os.environ.get("FWDFLEET_ARM64_ROOT"):
        return Path(os.environ["FWDFLEET_ARM64_ROOT"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fwdfleet" / "arm64"


@pytest.fixture(scope="module")
def arm64() -> Path:
    """The userland's path; builds it when FWDFLEET_ARM64=1, else skips (fails in CI) if it is absent."""
    if shutil.which("qemu-aarch64-static") is None:
        missing("qemu-aarch64-static", "apt-get install -y qemu-user-static debootstrap")
    root = userland_root()
    if os.environ.get("FWDFLEET_ARM64") == "1":
        # the host python that builds it needs pip: this interpreter (the venv's) has it
        r = subprocess.run(["bash", str(HARNESS / "build_userland.sh")], capture_output=True, text=True,
                           timeout=900, env={**os.environ, "PYTHON": sys.executable})
        assert r.returncode == 0, f"build_userland.sh failed:\n{r.stderr[-3000:]}"
    elif not (root / STAMP).is_file():
        missing(f"the aarch64 userland ({root})", "build it with `bash android_harness/arm64/build_userland.sh` "
                "or set FWDFLEET_ARM64=1 to build it here")
    return root


def run_arm(code: str, *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the emulated aarch64 python3; fails the test with its stderr if it fails."""
    r = subprocess.run(
        ["bash", str(HARNESS / "run.sh"), "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
    assert r.returncode == 0, f"emulated python failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    return r


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of float32 values between ``a`` and ``b`` (0 when bit-identical)."""

    def ordered(x: np.ndarray) -> np.ndarray:
        i = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(2**31) - i, i)

    return np.abs(ordered(a) - ordered(b))


def test_device_stack_imports_on_arm64_without_torch(arm64, tmp_path):
    r = run_arm(
        """
        import importlib, json, pkgutil, platform, sys
        import numpy, onnxruntime, grpc, google.protobuf
        import fwdfleet, fwdfleet.device_runtime
        mods = sorted(m.name for m in pkgutil.iter_modules(fwdfleet.device_runtime.__path__))
        for m in mods:
            importlib.import_module("fwdfleet.device_runtime." + m)
        upper = {"cli", "device_runtime", "aggregator", "export", "fleet", "pff"}
        foundation = sorted(m.name for m in pkgutil.iter_modules(fwdfleet.__path__) if m.name not in upper)
        for m in foundation:
            importlib.import_module("fwdfleet." + m)
        import fwdfleet.perturbation.sums
        print(json.dumps({
            "machine": platform.machine(), "modules": mods, "foundation": foundation, "torch": "torch" in sys.modules,
            "providers": onnxruntime.get_available_providers(), "ort": onnxruntime.__version__,
            "numpy": numpy.__version__, "grpc": grpc.__version__,
        }))
        """,
        cwd=tmp_path,
    )
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["machine"] == "aarch64"
    assert info["torch"] is False
    assert "CPUExecutionProvider" in info["providers"]
    assert {"session", "estimator"} <= set(info["modules"])
    assert {"perturbation", "task", "bundle"} <= set(info["foundation"])


def test_perturbations_match_x86_bit_for_bit(arm64, tmp_path, record_property):
    out = tmp_path / "arm.npz"
    run_arm(
        f"""
        import numpy as np
        from fwdfleet.perturbation import perturbation
        arrays = {{}}
        for i, (seed, device, k, n) in enumerate({CASES!r}):
            for dist in ("rademacher", "gaussian"):
                arrays[f"{{dist}}_{{i}}"] = perturbation(seed, device, k, n, dist)
        np.savez({str(out)!r}, **arrays)
        """,
        cwd=tmp_path,
    )
    worst_ulp, worst_rel = 0, 0.0
    with np.load(out, allow_pickle=False) as arm:
        assert len(arm.files) == 2 * len(CASES)
        for i, (seed, device, k, n) in enumerate(CASES):
            rad = perturbation(seed, device, k, n, "rademacher")
            assert arm[f"rademacher_{i}"].dtype == np.float32
            assert arm[f"rademacher_{i}"].tobytes() == rad.tobytes(), f"Rademacher differs for {CASES[i]}"
            gauss, arm_gauss = perturbation(seed, device, k, n, "gaussian"), arm[f"gaussian_{i}"]
            assert arm_gauss.shape == gauss.shape and np.isfinite(arm_gauss).all()
            worst_ulp = max(worst_ulp, int(ulp_distance(arm_gauss, gauss).max()))
            rel = np.abs(arm_gauss.astype(np.float64) - gauss) / np.maximum(np.abs(gauss), 1e-30)
            worst_rel = max(worst_rel, float(rel.max()))
    record_property("gaussian_max_ulp", worst_ulp)
    record_property("gaussian_max_rel", worst_rel)
    print(f"Gaussian ARM64 vs x86: max {worst_ulp} ulp, max relative difference {worst_rel:.3g}")
    # The perturbation module's spec: a port of the Gaussian option matches within 1e-6 relative.
    assert worst_rel <= 1e-6


def _step_script(bundle_dir: Path, batch_file: Path, out: Path) -> str:
    return f"""
        import json, numpy as np
        from fwdfleet.bundle import load_bundle
        from fwdfleet.device_runtime.session import BundleSession
        from fwdfleet.device_runtime.estimator import estimate
        from fwdfleet.task import RoundTask
        bundle = load_bundle({str(bundle_dir)!r})
        session = BundleSession(bundle)
        with np.load({str(batch_file)!r}, allow_pickle=False) as f:
            batch = {{k: f[k] for k in f.files}}
        w = bundle.load_trainables()
        task = RoundTask(round_id=3, model_version=0, round_seed=99, device_index=5, num_perturbations=4)
        res = estimate(session, w, batch, task)
        loss = session.loss(w, batch)
        json.dump({{"indices": list(res.indices), "derivatives": list(res.derivatives),
                   "loss": [float(v) for v in loss], "providers": session.providers}}, open({str(out)!r}, "w"))
        """


def test_onnxruntime_training_step_on_arm64(arm64, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_bundles import make_classifier_bundle

    from fwdfleet.device_runtime.estimator import estimate
    from fwdfleet.device_runtime.session import BundleSession
    from fwdfleet.task import RoundTask

    bundle = make_classifier_bundle(tmp_path / "bundle", in_dim=12, num_classes=4, hidden=8, seed=1)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((16, 12)).astype(np.float32), "labels": rng.integers(0, 4, 16)}
    np.savez(tmp_path / "batch.npz", **batch)
    out = tmp_path / "arm.json"
    run_arm(_step_script(bundle.path, tmp_path / "batch.npz", out), cwd=tmp_path)
    arm = json.loads(out.read_text())

    session = BundleSession(bundle)
    w = bundle.load_trainables()
    task = RoundTask(round_id=3, model_version=0, round_seed=99, device_index=5, num_perturbations=4)
    x86 = estimate(session, w, batch, task)
    assert arm["providers"] == ["CPUExecutionProvider"]
    assert arm["indices"] == list(x86.indices)
    np.testing.assert_allclose(arm["loss"], session.loss(w, batch), rtol=1e-5, atol=1e-6)
    # Different MatMul kernels (NEON vs AVX) change the float32 losses in the last bits; the
    # central differences over eps=1e-2 inherit that at about 1e-5.
    np.testing.assert_allclose(arm["derivatives"], x86.derivatives, rtol=1e-3, atol=1e-4)
    assert any(abs(d) > 1e-3 for d in arm["derivatives"])


_DEVICE_SCRIPT = """
    import json, platform, time
    import grpc, numpy as np
    import fwdfleet.device_runtime.modes.scalar as scalar_mode
    from fwdfleet.device_runtime.client import DeviceClient, DeviceClientConfig
    from fwdfleet.device_runtime.data import ArrayDataset
    from fwdfleet.device_runtime.estimator import estimate as real_estimate
    from fwdfleet.perturbation import flatten, perturbation
    from fwdfleet.protocol import bearer_metadata, rpc, serde

    seen = []

    def recording_estimate(session, trainables, batch, task, guide=None, **kw):
        # The real estimator; this only keeps what the device computed, for the comparison.
        result = real_estimate(session, trainables, batch, task, guide, **kw)
        seen.append((task, flatten(trainables, session.trainable_specs), result))
        return result

    scalar_mode.estimate = recording_estimate  # the scalar mode's device half computes the upload
    config = DeviceClientConfig(address={address!r}, device_id="phone-a", token={token!r},
                                root_cert={ca!r}, long_poll_s=2.0, rpc_timeout_s=60.0, max_retries=20)
    rng = np.random.default_rng(7)
    data = ArrayDataset({{"x": rng.standard_normal((64, {in_dim})).astype(np.float32),
                         "labels": rng.integers(0, {classes}, 64).astype(np.int64)}})
    stats = DeviceClient(config, {workdir!r}, data, seed=0).run(rounds=1)
    task, w_old, result = seen[-1]

    # The aggregator's update, fetched through the protocol once it has been applied.
    channel = grpc.secure_channel(config.address, grpc.ssl_channel_credentials(open({ca!r}, "rb").read()))
    download = rpc.stream_call(channel, "DownloadTrainables")
    deadline = time.monotonic() + 60
    while True:
        chunks = [serde.chunk_from_bytes(c) for c in download(serde.download_request("phone-a"), timeout=60,
                                                                  metadata=bearer_metadata(config.token))]
        if chunks[-1].model_version > task.model_version or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    import io
    with np.load(io.BytesIO(b"".join(c.data for c in chunks)), allow_pickle=False) as f:
        names = [n for n in f.files]
        w_new = np.concatenate([np.asarray(f[n], dtype=np.float32).reshape(-1) for n in names])
    z = np.stack([perturbation(task.round_seed, task.device_index, k, w_old.size, task.distribution)
                  for k in result.indices])
    np.savez({out_npz!r}, w_old=w_old, w_new=w_new, z=z)
    json.dump({{"machine": platform.machine(), "rounds": stats.rounds, "names": names,
               "new_version": chunks[-1].model_version, "round_seed": task.round_seed,
               "device_index": task.device_index, "indices": list(result.indices),
               "derivatives": list(result.derivatives), "num_perturbations": task.num_perturbations}},
              open({out_json!r}, "w"))
"""


def _decode_signs(delta: np.ndarray, d: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """The +-1 pattern s (K, n) with delta_j = scale * sum_k s_kj d_k, and the worst decoding margin.

    Every one of the 2**K sign patterns is tried per element; the margin is the best residual over
    the gap to the second best (well below 1 means the decoding is unambiguous).
    """
    k = d.size
    patterns = np.array([[1.0 if (p >> i) & 1 == 0 else -1.0 for i in range(k)] for p in range(2**k)])
    values = scale * patterns @ d  # (2**K,)
    err = np.abs(delta[None, :] - values[:, None])  # (2**K, n)
    order = np.sort(err, axis=0)
    margin = float((order[0] / np.maximum(order[1], 1e-300)).max())
    return patterns[err.argmin(axis=0)].T.astype(np.float32), margin


def test_emulated_arm_device_trains_against_x86_aggregator(arm64, tmp_path):
    """A real round over gRPC (TLS + token): ARM device, x86 aggregator, perturbations identical.

    The aggregator regenerates z_k from the seed on x86 and applies SGD with
    g = (1/K) sum_k d_k z_k. The emulated device downloads the new tensors through the protocol;
    each element of w_old - w_new equals (lr/K) sum_k d_k z_kj, from which the aggregator's sign
    pattern is decoded and compared bit for bit with the z_k the ARM device evaluated.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from _grpc_fixtures import DEVICE_TOKEN, Env, aggregator_config, start
    from _tiny_bundles import make_classifier_bundle

    from fwdfleet.aggregator.auth import append_token
    from fwdfleet.aggregator.tls import write_dev_certificates
    from fwdfleet.perturbation import flatten

    in_dim, classes, k, lr = 8, 3, 4, 0.5
    bundle = make_classifier_bundle(tmp_path / "bundle", in_dim=in_dim, num_classes=classes, hidden=12, seed=3)
    certs = write_dev_certificates(tmp_path / "certs")
    tokens = tmp_path / "tokens.txt"
    append_token(tokens, DEVICE_TOKEN, "phone-a", "phone-a")
    env = Env(tmp_path, bundle, certs, tokens)
    config = aggregator_config(
        rounds={"min_devices": 1, "min_results": 1, "deadline_s": 120},
        perturbation={"k": k},
        optimizer={"name": "sgd", "lr": lr},
    )
    server = start(env, config)
    try:
        out_npz, out_json = tmp_path / "arm_round.npz", tmp_path / "arm_round.json"
        script = _DEVICE_SCRIPT.format(
            address=f"127.0.0.1:{server.port}", token=DEVICE_TOKEN, ca=str(certs["ca"]), in_dim=in_dim,
            classes=classes, workdir=str(tmp_path / "device"), out_npz=str(out_npz), out_json=str(out_json),
        )
        run_arm(script, cwd=tmp_path, timeout=400)
        coordinator = server.servicer.coordinator
        version, current = coordinator.current_trainables()
    finally:
        server.stop(0.5)

    meta = json.loads(out_json.read_text())
    with np.load(out_npz, allow_pickle=False) as f:
        w_old, w_new, z_arm = f["w_old"], f["w_new"], f["z"]
    assert meta["machine"] == "aarch64" and meta["rounds"] == 1
    assert meta["new_version"] == version == 1
    assert len(meta["indices"]) == meta["num_perturbations"] == k
    # What the device downloaded is exactly the aggregator's state.
    assert w_new.tobytes() == flatten(current, bundle.manifest.trainables).tobytes()
    assert w_old.tobytes() == flatten(bundle.load_trainables(), bundle.manifest.trainables).tobytes()

    d = np.asarray(meta["derivatives"], dtype=np.float64)
    delta = w_old.astype(np.float64) - w_new.astype(np.float64)
    z_agg, margin = _decode_signs(delta, d, lr / k)
    assert margin < 0.05, f"update does not decode unambiguously (margin {margin:.3g}); derivatives {d}"
    assert z_agg.shape == z_arm.shape
    mismatches = int((z_agg != z_arm).sum())
    assert mismatches == 0, f"{mismatches} of {z_arm.size} perturbation entries differ between ARM and x86"
    assert z_agg.tobytes() == z_arm.tobytes()
