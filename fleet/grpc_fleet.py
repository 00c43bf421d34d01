"""Real-gRPC fleet emulation: the aggregator server and N device processes on 127.0.0.1, over TLS.

Where :mod:`fleet.emulate` calls the Coordinator in-process, this mode runs the whole product
as it runs in the field, on one machine:

* a fresh development CA and server certificate (``certs/``), and one bearer token per device,
  bound to its device id (``tokens.txt`` holds only their hashes; ``devices/<id>/token`` the
  tokens, mode 0600);
* the real server (:func:`aggregator.server.serve`, TLS + token auth) on ``127.0.0.1``, port 0,
  around a real Coordinator that appends one JSON line per applied round to ``metrics.jsonl``
  (with the test accuracy, when a test split is given);
* one ``fwdfleet device run --config devices/<id>/device.toml`` process per device, with its
  shard of the training data written as ``devices/<id>/data.npz`` (or ``.csv`` for text); each
  downloads the bundle, long-polls for tasks, trains by perturbed inference, uploads scalars.

:func:`emulate_grpc` yields one :class:`~fleet.emulate.RoundRecord` per applied round, like
:func:`fleet.emulate.emulate`, so :mod:`fleet.report` works for both. Time is real here:
``sim_time_s`` is the aggregator's clock since the start, profiles only set what each device
reports when it joins (platform, RAM, speed), and ``bytes_up`` is the aggregator's count of the
uploads. What each device measured itself (accepted results, retries, uplink bytes) is in
:attr:`GrpcFleet.device_stats` and ``devices.json`` after the run. Every process is stopped on
return, on error and on Ctrl-C (SIGTERM, then SIGKILL after ``stop_timeout_s``). The device
processes run in their own sessions, so a terminal's Ctrl-C reaches only this process, which
stops them in order; should this process be killed outright, they give up on their own once
the aggregator has been unreachable for about a minute (``max_retries`` in their TOML).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from fwdfleet.aggregator.auth import append_token, new_token
from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.server import RunningServer, ServerConfig, serve
from fwdfleet.aggregator.tls import write_dev_certificates
from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.client import ClientStats
from fwdfleet.device_runtime.data import RawData
from fwdfleet.fleet.datasets import subset
from fwdfleet.fleet.emulate import EmulationSettings, Evaluator, RoundRecord
from fwdfleet.fleet.keep import ModelKeeper
from fwdfleet.fleet.profiles import EmulatedProfile


@dataclass(frozen=True)
class GrpcOptions:
    """Transport settings of a real-gRPC fleet (the rest comes from :class:`EmulationSettings`)."""

    round_timeout_s: float = 120.0  # fail when no round was applied for this long (incl. start-up)
    stop_timeout_s: float = 10.0  # SIGTERM, then SIGKILL a device still running after this
    long_poll_s: float = 2.0  # devices' GetTask long poll (short: quick clean stops)
    advance_interval_s: float = 0.1  # the server's round clock
    threads_per_device: int = 1  # onnxruntime intra-op threads of each device process
    max_devices: int = 256  # one OS process each: beyond this use the in-process transport

    def __post_init__(self) -> None:
        for name in ("round_timeout_s", "stop_timeout_s", "long_poll_s", "advance_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"GrpcOptions.{name} must be a positive number, got {value}")
        if self.threads_per_device < 0:
            raise ValueError(f"GrpcOptions.threads_per_device must be >= 0, got {self.threads_per_device}")
        if self.max_devices < 1:
            raise ValueError(f"GrpcOptions.max_devices must be >= 1, got {self.max_devices}")


@dataclass
class _Device:
    device_id: str
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    stats: ClientStats | None = None
    exit_code: int | None = None


@dataclass
class GrpcFleet:
    """A running real-gRPC fleet; use as a context manager, iterate :meth:`rounds`."""

    bundle: Bundle
    config: AggregatorConfig
    train: RawData
    shards: list[np.ndarray]
    profiles: list[EmulatedProfile]
    settings: EmulationSettings
    run_dir: Path
    test: RawData | None = None
    options: GrpcOptions = field(default_factory=GrpcOptions)
    keeper: ModelKeeper | None = None  # receives every evaluated model (final/ and best/)
    devices: list[_Device] = field(default_factory=list)
    server: RunningServer | None = None
    started_at: float = field(default=0.0, init=False)  # the aggregator clock (unix time) at the start
    metrics_path: Path = field(init=False)

    def __post_init__(self) -> None:
        if len(self.shards) != len(self.profiles):
            raise ValueError(f"{len(self.shards)} data shards but {len(self.profiles)} device profiles")
        if len(self.shards) > self.options.max_devices:
            raise ValueError(
                f"the gRPC transport runs one process per device; {len(self.shards)} devices exceed "
                f"max_devices={self.options.max_devices}: use fleet.transport = \"inprocess\" for large fleets"
            )
        self.run_dir = Path(self.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ start
    def __enter__(self) -> GrpcFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        certs = write_dev_certificates(self.run_dir / "certs")
        tokens = self.run_dir / "tokens.txt"
        tokens.unlink(missing_ok=True)
        self.metrics_path.unlink(missing_ok=True)
        self.devices = [_Device(f"device-{i:05d}", self.run_dir / "devices" / f"device-{i:05d}")
                        for i in range(len(self.shards))]
        for dev, shard in zip(self.devices, self.shards):
            dev.folder.mkdir(parents=True, exist_ok=True)
            token = new_token()
            append_token(tokens, token, dev.device_id, dev.device_id)
            token_file = dev.folder / "token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            write_shard(self.train, shard, dev.folder / "data")

        evaluator = (Evaluator(self.bundle, self.test, self.settings.eval_batch, self.keeper)
                     if self.test is not None else None)
        config = replace(self.settings.bound(self.config), metrics_path=str(self.metrics_path))
        coordinator = Coordinator(config, self.bundle, evaluate=self._evaluate_hook(evaluator))
        n = len(self.devices)
        self.server = serve(
            ServerConfig(host="127.0.0.1", port=0, tls_cert=str(certs["cert"]), tls_key=str(certs["key"]),
                         tokens_file=str(tokens), advance_interval_s=self.options.advance_interval_s,
                         shutdown_grace_s=0.5, max_workers=n + 10, long_poll_slots=n + 4),
            coordinator, self.bundle)
        self.started_at = time.time()
        for dev, profile in zip(self.devices, self.profiles):
            toml = dev.folder / "device.toml"
            toml.write_text(device_toml(dev, profile, self.server.address, certs["ca"], self.options))
            dev.log = open(dev.folder / "log.txt", "wb")  # noqa: SIM115 - closed in stop()
            dev.process = subprocess.Popen(
                [sys.executable, "-m", "fwdfleet.cli.main", "device", "run", "--config", str(toml)],
                stdout=dev.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": str(max(1, self.options.threads_per_device))},
                start_new_session=True,  # a terminal's Ctrl-C reaches this process only, which stops them in order
            )

    def _evaluate_hook(self, evaluator: Evaluator | None) -> Callable[[int, Mapping[str, np.ndarray]],
                                                                        Mapping[str, float]] | None:
        if evaluator is None:
            return None
        every, last = self.settings.eval_every, self.settings.rounds

        def hook(version: int, trainables: Mapping[str, np.ndarray]) -> Mapping[str, float]:
            if (every and version % every == 0) or version >= last:
                ev = evaluator.evaluate(trainables, version)
                return {"loss": ev.loss, "accuracy": ev.accuracy, "macro_f1": ev.macro_f1}
            return {}

        return hook

    # ------------------------------------------------------------------ run
    def rounds(self) -> Iterator[RoundRecord]:
        """Yield a RoundRecord per applied round until ``settings.rounds``; raise if the fleet stalls."""
        start = time.perf_counter()
        offset, applied, last_progress = 0, 0, time.monotonic()
        while applied < self.settings.rounds:
            lines, offset = _read_new_lines(self.metrics_path, offset)
            for line in lines:
                rec = round_record(json.loads(line), self.started_at, time.perf_counter() - start)
                applied += 1
                last_progress = time.monotonic()
                yield rec
                if applied >= self.settings.rounds:
                    return
            self._check_devices()
            if time.monotonic() - last_progress > self.options.round_timeout_s:
                raise TimeoutError(
                    f"no round applied for {self.options.round_timeout_s:.0f} s ({applied} of "
                    f"{self.settings.rounds} done); device logs: {self.run_dir / 'devices'}/*/log.txt"
                )
            time.sleep(0.05)

    def _check_devices(self) -> None:
        for dev in self.devices:
            code = dev.process.poll() if dev.process is not None else None
            if code is not None:
                raise RuntimeError(f"device process {dev.device_id} exited with code {code} before the fleet "
                                   f"finished:\n{_tail(dev.folder / 'log.txt')}")

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop every device process and the server (idempotent); collect the devices' stats."""
        running = [d for d in self.devices if d.process is not None and d.process.poll() is None]
        for dev in running:
            assert dev.process is not None
            dev.process.send_signal(signal.SIGTERM)
        if self.server is not None:
            self.server.stop(grace=0.5)  # cancels the devices' long polls: they see the stop at once
        deadline = time.monotonic() + self.options.stop_timeout_s
        for dev in self.devices:
            if dev.process is None:
                continue
            try:
                dev.exit_code = dev.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                dev.process.kill()
                dev.exit_code = dev.process.wait()
            if dev.log is not None:
                dev.log.close()
                dev.log = None
            dev.stats = parse_client_stats((dev.folder / "log.txt").read_text(errors="replace"), dev.device_id)
        if self.devices:
            (self.run_dir / "devices.json").write_text(json.dumps(
                {d.device_id: {"exit_code": d.exit_code, "stats": None if d.stats is None else vars(d.stats)}
                 for d in self.devices}, indent=2) + "\n")

    @property
    def device_stats(self) -> dict[str, ClientStats | None]:
        return {d.device_id: d.stats for d in self.devices}


def emulate_grpc(
    bundle: Bundle,
    config: AggregatorConfig,
    train: RawData,
    shards: list[np.ndarray],
    profiles: list[EmulatedProfile],
    settings: EmulationSettings,
    run_dir: str | Path,
    *,
    test: RawData | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    options: GrpcOptions | None = None,
    on_stop: Callable[[GrpcFleet], None] | None = None,
    keeper: ModelKeeper | None = None,
) -> Generator[RoundRecord, None, None]:
    """Like :func:`fleet.emulate.emulate`, over real gRPC; ``on_stop`` sees the fleet after its shutdown;
    ``keeper`` receives every evaluated model."""
    fleet = GrpcFleet(bundle, config, train, shards, profiles, settings, Path(run_dir), test,
                      options or GrpcOptions(), keeper)
    try:
        with fleet:
            for rec in fleet.rounds():
                if on_round is not None:
                    on_round(rec)
                yield rec
    finally:
        if on_stop is not None:
            on_stop(fleet)


# ---------------------------------------------------------------------------- files and records


def write_shard(train: RawData, indices: np.ndarray, base: Path) -> Path:
    """Write one device's examples where ``fwdfleet device run`` reads them (.npz, or .csv for text)."""
    part = subset(train, indices)
    labels = part.labels if part.labels is not None else np.zeros(0, np.int64)
    if part.features is not None:
        path = base.with_suffix(".npz")
        np.savez(path, x=part.features, labels=labels)
    elif part.arrays is not None:
        path = base.with_suffix(".npz")
        arrays: dict[str, Any] = {"labels": labels, **part.arrays}
        np.savez(path, **arrays)
    elif part.texts is not None:
        path = base.with_suffix(".csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["label", "text"])
            for y, text in zip(labels, part.texts):
                w.writerow([int(y), " ".join(text.split())])
    else:
        raise ValueError(f"{train.source}: no features, arrays or texts to give the devices")
    return path


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def device_toml(dev: _Device, profile: EmulatedProfile, address: str, ca: Path, options: GrpcOptions) -> str:
    data = next(dev.folder.glob("data.*"))
    return "\n".join([
        f"bundle_dir = {_toml_str(dev.folder / 'bundle')}",
        "rounds = 0",
        f"threads = {options.threads_per_device}",
        "[client]",
        f"address = {_toml_str(address)}",
        f"device_id = {_toml_str(dev.device_id)}",
        f"token_file = {_toml_str(dev.folder / 'token')}",
        f"root_cert = {_toml_str(ca)}",
        f"platform = {_toml_str('emulated-' + profile.name)}",
        f"ram_mb = {profile.memory_cap_mb}",
        f"compute_speed = {profile.compute_speed}",
        f"long_poll_s = {options.long_poll_s}",
        "initial_backoff_s = 0.2",
        "max_backoff_s = 2.0",
        "max_retries = 30",  # a device whose aggregator vanished (parent killed) gives up within a minute
        "[data]",
        f"path = {_toml_str(data)}",
        "",
    ])


def round_record(m: Mapping[str, Any], started_at: float, wall_s: float) -> RoundRecord:
    """A Coordinator metrics line as a :class:`RoundRecord` (selected but absent devices are stragglers)."""
    ev = m.get("eval") or {}
    participants = int(m["participants"])
    noise = m.get("noise_ratio")
    return RoundRecord(
        round_id=int(m["round_id"]), model_version=int(m["model_version"]), participants=participants,
        dropouts=0, stragglers=max(0, int(m["selected"]) - participants), k=int(m["k"]),
        extra_requests=int(m["extra_requests"]),
        noise_ratio=float(noise) if noise is not None and math.isfinite(noise) else None,
        loss=ev.get("loss"), accuracy=ev.get("accuracy"), bytes_up=int(m["bytes_up"]),
        bytes_up_per_device=int(m["bytes_up"]) / participants if participants else 0.0,
        bytes_down=int(m["bytes_down"]), sim_time_s=float(m["time"]) - started_at, wall_time_s=wall_s,
        pacing=list(m.get("pacing", [])),
        macro_f1=_finite(ev.get("macro_f1")),
    )


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def parse_client_stats(log: str, device_id: str) -> ClientStats | None:
    """The stats line ``fwdfleet device run`` prints when it stops (``device <id>: rounds 2, ...``)."""
    found = None
    for line in log.splitlines():
        if line.startswith(f"device {device_id}: "):
            found = line.split(": ", 1)[1]
    if found is None:
        return None
    values = dict(re.findall(r"(\w+) (-?\d+)", found))
    return ClientStats(**{k: int(values[k]) for k in vars(ClientStats()) if k in values})


def _read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # only whole lines: the writer may be mid-line
    return data[:end].decode().splitlines(), offset + end


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
