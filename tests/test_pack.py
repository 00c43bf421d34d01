"""`fwdfleet pack` and device kits: contents, secrets, corruption, and a real round from a kit."""

from __future__ import annotations

import json
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _grpc_fixtures import DEVICE_TOKEN, aggregator_config, make_env, start

from fwdfleet.aggregator.auth import TokenAllowList
from fwdfleet.bundle import load_bundle
from fwdfleet.cli.main import main
from fwdfleet.device_runtime.kit import (
    KIT_FILE,
    KitError,
    build_wheel,
    load_kit,
    run_kit,
    source_tree,
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fwdfleet wheel, built once (``pip wheel --no-deps`` of this checkout)."""
    source = source_tree()
    assert source is not None, "tests run from a source checkout"
    return build_wheel(source, tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def env(tmp_path: Path):
    return make_env(tmp_path)


def _data(path: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.standard_normal((n, 4)).astype(np.float32), labels=rng.integers(0, 3, n).astype(np.int64))
    return path


def _pack(env, out: Path, wheel: Path, *extra: str) -> int:
    return main(["pack", str(env.bundle.path), "--out", str(out), "--address", "127.0.0.1:50051",
                 "--device-id", "phone-a", "--ca", str(env.certs["ca"]), "--wheel", str(wheel), *extra])  # fmt: skip


def test_wheel_holds_the_device_side_and_declares_its_dependencies(wheel):
    assert wheel.name.startswith("fwdfleet-") and wheel.suffix == ".whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"fwdfleet/device_runtime/kit.py", "fwdfleet/device_runtime/client.py", "fwdfleet/bundle.py"} <= names
    # every package installs under the fwdfleet import namespace: no top-level export/fleet/pff
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fwdfleet"}, top_level
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for dep in ("numpy", "onnxruntime", "grpcio", "protobuf"):
        assert any(line.split()[1].startswith(dep) and "extra ==" not in line for line in requires), dep


def test_pack_writes_a_verified_kit_with_private_credentials(env, tmp_path, wheel, capsys):
    data = _data(tmp_path / "local.npz")
    assert _pack(env, tmp_path / "kit", wheel, "--token", DEVICE_TOKEN, "--data", str(data), "--ram-mb", "4096") == 0
    kit = load_kit(tmp_path / "kit")
    m = kit.manifest
    assert m.device["address"] == "127.0.0.1:50051" and m.device["device_id"] == "phone-a"
    assert m.device["ram_mb"] == 4096
    assert "token" not in m.device and DEVICE_TOKEN not in (tmp_path / "kit" / KIT_FILE).read_text()
    assert stat.S_IMODE((kit.path / m.token_file).stat().st_mode) == 0o600
    assert stat.S_IMODE(kit.path.stat().st_mode) == 0o700
    assert (kit.path / m.root_cert).read_bytes() == env.certs["ca"].read_bytes()
    assert kit.wheel_path is not None and kit.wheel_path.read_bytes() == wheel.read_bytes()
    assert kit.data_path is not None and kit.data_path.read_bytes() == data.read_bytes()
    assert {"scripts/termux_setup.sh", "scripts/pi_setup.sh"} <= set(m.files)
    config = kit.client_config()
    assert config.token == DEVICE_TOKEN and Path(config.root_cert).is_file()
    packed = load_bundle(kit.bundle_path)
    for name, value in env.bundle.load_trainables().items():
        np.testing.assert_array_equal(packed.load_trainables()[name], value)
    assert "wrote kit" in capsys.readouterr().out


def test_new_token_is_bound_to_the_device_and_lands_in_the_allow_list(env, tmp_path, wheel):
    allow = tmp_path / "allow.txt"
    assert _pack(env, tmp_path / "kit", wheel, "--new-token", str(allow)) == 0
    token = load_kit(tmp_path / "kit").client_config().token
    assert token and token != DEVICE_TOKEN
    principal = TokenAllowList.load(allow).identify(token)
    assert principal is not None and principal.may_act_for("phone-a") and not principal.may_act_for("phone-b")


def test_corrupt_or_newer_kits_are_refused(env, tmp_path, wheel):
    assert _pack(env, tmp_path / "kit", wheel, "--token", DEVICE_TOKEN) == 0
    kit = tmp_path / "kit"
    raw = bytearray((kit / "bundle.zip").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (kit / "bundle.zip").write_bytes(bytes(raw))
    with pytest.raises(KitError, match=r"bundle\.zip .*checksum"):
        load_kit(kit)
    manifest = json.loads((kit / KIT_FILE).read_text())
    manifest["kit_version"] = 99
    (kit / KIT_FILE).write_text(json.dumps(manifest))
    with pytest.raises(KitError, match="kit version 99"):
        load_kit(kit, verify=False)
    with pytest.raises(KitError, match=r"no kit\.json"):
        load_kit(tmp_path)


def test_pack_refuses_bad_requests_with_one_line(env, tmp_path, wheel, capsys):
    assert _pack(env, tmp_path / "kit", wheel) == 2  # TLS without a token
    assert "needs a device token" in capsys.readouterr().err
    assert _pack(env, tmp_path / "kit", wheel, "--token", "t") == 0
    assert _pack(env, tmp_path / "kit", wheel, "--token", "t") == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert _pack(env, tmp_path / "kit", wheel, "--token", "t", "--force") == 0
    code = main(["pack", str(env.bundle.path), "--out", str(tmp_path / "k2"), "--address", "no-port",
                 "--device-id", "x", "--insecure", "--wheel", str(wheel)])  # fmt: skip
    assert code == 2 and "host:port" in capsys.readouterr().err


def test_a_device_runs_a_real_round_from_its_kit(env, tmp_path, wheel):
    """The kit alone gets a device through TLS + token into a round; the packed bundle is reused."""
    config = aggregator_config(rounds={"min_devices": 1, "min_results": 1, "deadline_s": 60})
    server = start(env, config)
    try:
        out = tmp_path / "kit"
        code = main(["pack", str(env.bundle.path), "--out", str(out), "--address", f"127.0.0.1:{server.port}",
                     "--device-id", "phone-a", "--ca", str(env.certs["ca"]), "--token", DEVICE_TOKEN,
                     "--wheel", str(wheel), "--data", str(_data(tmp_path / "local.npz"))])  # fmt: skip
        assert code == 0
        stats = run_kit(load_kit(out), rounds=1, workdir=tmp_path / "work")
        version, _ = server.servicer.coordinator.current_trainables()
    finally:
        server.stop(0.5)
    assert stats.rounds == 1 and stats.dropped == 0
    assert stats.bundle_downloads == 0  # the kit's bundle was the aggregator's: nothing downloaded
    assert version == 1
