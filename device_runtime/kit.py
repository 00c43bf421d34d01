"""A device kit: everything a phone or a board needs to join an aggregator, in one folder.

``fwdfleet pack`` (:func:`pack_kit`) writes::

    kit/
      kit.json               what is in the kit, the device's settings, a sha256 of every file
      bundle.zip             the bundle, zipped as the aggregator serves it
      credentials/token      the device's bearer token (mode 0600), if any
      credentials/ca.pem     the CA that signed the aggregator's certificate, if any
      wheels/fwdfleet-*.whl  the toolkit itself (``pip wheel --no-deps``: the device installs
                             numpy/onnxruntime/grpcio its own way, e.g. from Termux packages)
      data/<file>            the device's local data, if packed
      scripts/...            setup scripts (android_harness), if packed

On the device, ``python -m fwdfleet.device_runtime.kit KIT`` (:func:`run_kit`) verifies the kit and runs a
:class:`~device_runtime.client.DeviceClient` with the kit's settings. The bundle is placed in the
client's download cache first, so a device whose kit was packed from the aggregator's own bundle
folder does not download it again; a bundle that differs is downloaded as usual (the aggregator's
copy is the one that counts).

The token is a secret: the kit folder is created with mode 0700 and the token file 0600; copy the
kit only to the device it was made for (``fwdfleet pack --new-token`` binds a fresh token to one
device id).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwdfleet import __version__
from fwdfleet.bundle import Bundle, load_bundle, sha256_file, zip_bundle
from fwdfleet.device_runtime.client import ClientStats, DeviceClient, DeviceClientConfig, describe
from fwdfleet.device_runtime.credentials import read_token_file
from fwdfleet.errors import FwdfleetError

KIT_VERSION = 1
KIT_FILE = "kit.json"
BUNDLE_FILE = "bundle.zip"
TOKEN_FILE = "credentials/token"
CA_FILE = "credentials/ca.pem"
_SECRET_FIELDS = ("token", "root_cert")


class KitError(FwdfleetError):
    """A kit cannot be written, is corrupt, or is from a newer fwdfleet."""


@dataclass(frozen=True)
class KitManifest:
    """What ``kit.json`` says. Paths are relative to the kit folder."""

    device: Mapping[str, Any]  # DeviceClientConfig fields, without the token and the CA path
    bundle: str = BUNDLE_FILE
    bundle_sha256: str = ""
    wheel: str | None = None
    token_file: str | None = None
    root_cert: str | None = None
    data: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)  # relative path -> sha256 (all but kit.json)
    kit_version: int = KIT_VERSION
    fwdfleet_version: str = __version__
    created_unix: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> KitManifest:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            version = d.get("kit_version")
            if not isinstance(version, int) or version > KIT_VERSION:
                raise KitError(
                    f"{source} has kit version {version!r}; this fwdfleet ({__version__}) reads up to "
                    f"{KIT_VERSION}: install the wheel shipped in the kit, or pack the kit again"
                )
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        except (json.JSONDecodeError, TypeError) as e:
            raise KitError(f"{source} is not a valid kit manifest ({e}); pack the kit again") from e


@dataclass(frozen=True)
class Kit:
    """A verified kit on disk."""

    path: Path
    manifest: KitManifest

    @property
    def bundle_path(self) -> Path:
        return self.path / self.manifest.bundle

    @property
    def wheel_path(self) -> Path | None:
        return self.path / self.manifest.wheel if self.manifest.wheel else None

    @property
    def data_path(self) -> Path | None:
        return self.path / self.manifest.data if self.manifest.data else None

    def client_config(self, **overrides: Any) -> DeviceClientConfig:
        """The device's :class:`DeviceClientConfig` (token read from the kit, CA path made absolute)."""
        m = self.manifest
        values: dict[str, Any] = dict(m.device)
        if m.token_file:
            values["token"] = read_token_file(self.path / m.token_file)
        if m.root_cert:
            values["root_cert"] = str(self.path / m.root_cert)
        values.update(overrides)
        try:
            return DeviceClientConfig(**values)
        except (TypeError, ValueError) as e:
            raise KitError(f"the kit's device settings are invalid: {e}; pack the kit again") from e


def _device_fields(config: DeviceClientConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _SECRET_FIELDS}


def pack_kit(
    out: str | Path,
    *,
    bundle: str | Path | Bundle,
    config: DeviceClientConfig,
    wheel: str | Path | None,
    data: str | Path | None = None,
    extra_files: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
) -> Kit:
    """Write a kit for the device ``config`` describes into the folder ``out``; return it verified.

    ``config.root_cert`` is a CA file on this machine (copied in); ``config.token`` is written to
    ``credentials/token``. ``extra_files`` maps kit-relative paths to files to copy (scripts).
    """
    out = Path(out)
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=True)
    if out.exists():
        if not overwrite:
            raise KitError(f"{out} already exists; remove it or pass --force to replace it")
        shutil.rmtree(out)
    sources: dict[str, Path] = {}
    if wheel is not None:
        sources[f"wheels/{Path(wheel).name}"] = Path(wheel)
    if data is not None:
        sources[f"data/{Path(data).name}"] = Path(data)
    if config.root_cert:
        sources[CA_FILE] = Path(config.root_cert)
    for rel, src in (extra_files or {}).items():
        sources[rel] = Path(src)
    for rel, src in sources.items():
        if not src.is_file():
            raise KitError(f"cannot pack {rel}: {src} is not a file")
    tmp = Path(tempfile.mkdtemp(prefix=".kit-", dir=out.parent if out.parent.exists() else None))
    try:
        os.chmod(tmp, 0o700)
        zip_bundle(b, tmp / BUNDLE_FILE)
        for rel, src in sources.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
            if rel.startswith("scripts/"):
                os.chmod(tmp / rel, 0o755)
        if config.token:
            (tmp / TOKEN_FILE).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(config.token + "\n")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = KitManifest(
            device=_device_fields(config),
            bundle_sha256=files[BUNDLE_FILE],
            wheel=f"wheels/{Path(wheel).name}" if wheel is not None else None,
            token_file=TOKEN_FILE if config.token else None,
            root_cert=CA_FILE if config.root_cert else None,
            data=f"data/{Path(data).name}" if data is not None else None,
            files=files,
            created_unix=time.time(),
        )
        (tmp / KIT_FILE).write_text(manifest.to_json())
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_kit(out)


def load_kit(path: str | Path, *, verify: bool = True) -> Kit:
    """Open a kit folder, check its version and (by default) every file's sha256."""
    path = Path(path)
    mf = path / KIT_FILE
    if not mf.is_file():
        raise KitError(f"{path} has no {KIT_FILE}; is it a folder written by `fwdfleet pack`?")
    manifest = KitManifest.from_json(mf.read_text(), str(mf))
    if verify:
        for rel, digest in sorted(manifest.files.items()):
            p = path / rel
            if not p.is_file():
                raise KitError(f"kit {path} is missing {rel}; copy the whole kit folder")
            if sha256_file(p) != digest:
                raise KitError(f"{rel} in kit {path} does not match its checksum: the copy is corrupt; copy it again")
    return Kit(path=path, manifest=manifest)


def source_tree() -> Path | None:
    """The fwdfleet source checkout this module runs from (None when installed from a wheel)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "fwdfleet"' in pyproject.read_text() else None


def build_wheel(source: str | Path, out_dir: str | Path) -> Path:
    """``pip wheel --no-deps`` of a fwdfleet source tree into ``out_dir``; returns the wheel.

    The tree is copied first (packages, pyproject, README, licence) so that the build leaves no
    ``build/`` folder behind in the checkout. The build backend is taken from this environment
    when it has it, else pip fetches it (build isolation).
    """
    source, out_dir = Path(source), Path(out_dir)
    if not (source / "pyproject.toml").is_file():
        raise KitError(f"{source} has no pyproject.toml; pass the fwdfleet source folder, or --wheel")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fwdfleet-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for p in source.iterdir():
            if p.is_file() and (p.suffix in (".toml", ".md", ".cfg", ".txt") or p.name.startswith("LICEN")):
                shutil.copy2(p, tree / p.name)
            elif p.is_dir() and (p / "__init__.py").is_file():
                shutil.copytree(p, tree / p.name, ignore=skip)
        base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                "-w", str(out_dir), str(tree)]  # fmt: skip
        before = set(out_dir.glob("fwdfleet-*.whl"))
        proc = subprocess.run([*base, "--no-build-isolation"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            proc = subprocess.run(base, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise KitError(f"`pip wheel --no-deps` of {source} failed: {tail}")
    wheels = sorted(set(out_dir.glob("fwdfleet-*.whl")) - before) or sorted(out_dir.glob("fwdfleet-*.whl"))
    if not wheels:
        raise KitError(f"pip built no fwdfleet wheel into {out_dir}")
    return max(wheels, key=lambda p: p.stat().st_mtime)


def seed_bundle_cache(kit: Kit, bundle_dir: Path) -> Path:
    """Unpack the kit's bundle where :class:`DeviceClient` caches the aggregator's bundle."""
    target = bundle_dir / f"bundle-{kit.manifest.bundle_sha256[:16]}"
    if not (target / "manifest.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".seed-", dir=bundle_dir))
        try:
            shutil.unpack_archive(kit.bundle_path, tmp, format="zip")
            load_bundle(tmp, verify=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def run_kit(
    kit: Kit, *, rounds: int | None = None, data: str | Path | None = None, workdir: str | Path | None = None
) -> ClientStats:
    """Take part in ``rounds`` rounds (None: until interrupted) with the kit's settings."""
    from fwdfleet.device_runtime.data import load_dataset

    data_path = Path(data) if data is not None else kit.data_path
    if data_path is None:
        raise KitError("the kit holds no data: pass --data with this device's local data file or folder")
    bundle_dir = Path(workdir) if workdir is not None else kit.path / "work"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    seed_bundle_cache(kit, bundle_dir)
    client = DeviceClient(kit.client_config(), bundle_dir, lambda b: load_dataset(data_path, b))
    return client.run(rounds)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fwdfleet.device_runtime.kit", description="Verify a device kit and run the device with it."
    )
    p.add_argument("kit", help="the kit folder written by `fwdfleet pack`")
    p.add_argument("--rounds", type=int, default=None, help="stop after this many accepted results")
    p.add_argument("--data", default=None, help="local data (default: the data packed in the kit)")
    p.add_argument("--workdir", default=None, help="download cache (default: KIT/work)")
    p.add_argument("--verify-only", action="store_true", help="check the kit and exit")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        kit = load_kit(a.kit)
        config = kit.client_config()
        print(f"kit {kit.path}: device {config.device_id} -> {config.address} (fwdfleet {__version__})", flush=True)
        if a.verify_only:
            return 0
        stats = run_kit(kit, rounds=a.rounds, data=a.data, workdir=a.workdir)
    except FwdfleetError as e:
        print(f"device_runtime.kit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"done: {describe(stats)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
