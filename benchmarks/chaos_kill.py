"""Chaos: SIGKILL the aggregator at random points of a run while real device processes train.

One run with no kill gives the reference; the chaos run starts the same aggregator (a real
``fwdfleet aggregator serve`` process, TLS and tokens, checkpoints on) and the same real
``fwdfleet device run`` processes, then kills the aggregator ``--kills`` times at seeded random
moments (0.1-1.0 s after it came back, so mid-round, mid-upload or between counting an upload and
acknowledging it, wherever the moment falls) and restarts it on the same port from its checkpoint
folder. Every device must finish its rounds (each counted upload acknowledged, as new or as a
duplicate, never refused) and the final trainables must equal the reference bit for bit (no
upload lost or counted twice).

    python benchmarks/chaos_kill.py --kills 12 --rounds 40     # prints kills, seconds, result

The suite (tests/test_chaos.py) runs the same code with fewer kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fwdfleet.aggregator.auth import append_token
from fwdfleet.aggregator.checkpoint import load_checkpoint
from fwdfleet.aggregator.tls import write_dev_certificates
from fwdfleet.cli.aggregator_cmd import fetch_status
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

TOKEN = "chaos-fleet-token"
DEVICES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Setup:
    def __init__(self, work: Path, rounds: int) -> None:
        self.work = work
        self.rounds = rounds
        self.bundle = export_mlp(MLPConfig(layer_sizes=(4, 8, 3), seed=0, opset=17), work / "bundle")
        self.certs = write_dev_certificates(work / "certs")
        self.tokens = work / "tokens.txt"
        append_token(self.tokens, TOKEN, "fleet")
        (work / "token.txt").write_text(TOKEN + "\n")
        (work / "aggregator.toml").write_text(
            f"master_seed = 7\n[rounds]\nmin_devices = {DEVICES}\nnum_rounds = {rounds}\ndeadline_s = 600\n"
            "[perturbation]\nk = 4\n[optimizer]\nlr = 0.05\n")
        rng = np.random.default_rng(0)
        for i in range(DEVICES):
            np.savez(work / f"data-{i}.npz", x=rng.standard_normal((64, 4)).astype(np.float32),
                     labels=rng.integers(0, 3, 64))


def _start_aggregator(s: _Setup, ckpt: Path, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "fwdfleet.cli.main", "aggregator", "serve",
           "--config", str(s.work / "aggregator.toml"), "--bundle", str(s.bundle), "--checkpoint-dir", str(ckpt),
           "--host", "127.0.0.1", "--port", str(port),
           "--tls-cert", str(s.certs["cert"]), "--tls-key", str(s.certs["key"]), "--tokens-file", str(s.tokens),
           "--set", "server.advance_interval_s=0.05"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline() if proc.stdout else ""
    if not re.search(r"listening on", line):
        proc.kill()
        raise RuntimeError(f"the aggregator did not start: {line!r}")
    return proc


def _start_device(s: _Setup, i: int, port: int, tag: str) -> subprocess.Popen[str]:
    config = s.work / f"device-{tag}-{i}.toml"
    config.write_text(
        f'bundle_dir = "{s.work / f"dev-{tag}-{i}"}"\nrounds = {s.rounds}\nthreads = 1\n'
        f'[client]\naddress = "127.0.0.1:{port}"\ndevice_id = "dev-{i}"\n'
        f'token_file = "{s.work / "token.txt"}"\nroot_cert = "{s.certs["ca"]}"\n'
        f'long_poll_s = 1.0\ninitial_backoff_s = 0.1\nmax_backoff_s = 1.0\n'
        f'[data]\npath = "{s.work / f"data-{i}.npz"}"\n')
    return subprocess.Popen([sys.executable, "-m", "fwdfleet.cli.main", "device", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_registered(s: _Setup, port: int, count: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        status = fetch_status(f"127.0.0.1:{port}", token=TOKEN, ca=str(s.certs["ca"]), insecure=False)
        if json.loads(status.status_json)["devices_registered"] >= count:
            return
        if time.monotonic() > end:
            raise AssertionError(f"device {count - 1} did not join within {timeout} s")
        time.sleep(0.1)


def run_once(s: _Setup, tag: str, kills: int, seed: int, timeout: float) -> tuple[np.ndarray, int]:
    """One run; returns the final trainables (from the last checkpoint) and the kills made."""
    ckpt = s.work / f"ckpt-{tag}"
    port = _free_port()
    rng = random.Random(seed)
    server = _start_aggregator(s, ckpt, port)
    devices = []
    for i in range(DEVICES):  # one at a time: device indices (hence seeds and summing order) are the same every run
        devices.append(_start_device(s, i, port, tag))
        _wait_registered(s, port, i + 1, timeout)
    made = 0
    # each kill lands in a seeded random round (distinct rounds, never the last), at a seeded random
    # moment after that round's model is checkpointed: the kills happen however fast rounds go
    planned = sorted(rng.sample(range(s.rounds - 1), min(kills, s.rounds - 1)))
    end = time.monotonic() + timeout
    try:
        while any(d.poll() is None for d in devices):
            if time.monotonic() > end:
                raise AssertionError(f"{tag}: devices did not finish within {timeout} s ({made} kills made)")
            state = load_checkpoint(ckpt) if made < len(planned) else None
            if state is not None and state.model_version >= planned[made]:
                time.sleep(rng.uniform(0.0, 0.05))
                server.send_signal(signal.SIGKILL)
                server.wait(10)
                made += 1
                server = _start_aggregator(s, ckpt, port)
            else:
                time.sleep(0.02 if made < len(planned) else 0.2)
        failed = [(i, d.returncode, (d.stderr.read() if d.stderr else "")[-500:]) for i, d in enumerate(devices)
                  if d.returncode != 0]
        if failed:
            raise AssertionError(f"{tag}: device processes failed: {failed}")
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    finally:
        for p in (server, *devices):
            if p.poll() is None:
                p.kill()
    state = load_checkpoint(ckpt)
    assert state is not None and state.model_version == s.rounds, (tag, state and state.model_version)
    return state.trainables, made


def run_chaos(work: Path, *, kills: int, rounds: int, seed: int = 0, timeout: float = 900.0) -> dict[str, object]:
    s = _Setup(work, rounds)
    t0 = time.monotonic()
    reference, _ = run_once(s, "reference", 0, seed, timeout)
    t1 = time.monotonic()
    chaotic, made = run_once(s, "chaos", kills, seed, timeout)
    return {"kills": made, "rounds": rounds, "reference_s": round(t1 - t0, 1),
            "chaos_s": round(time.monotonic() - t1, 1), "identical": reference.tobytes() == chaotic.tobytes(),
            "moved": float(np.abs(reference).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = run_chaos(Path(tempfile.mkdtemp(prefix="fwdfleet-chaos-")), kills=args.kills, rounds=args.rounds,
                    seed=args.seed)
    for key, value in out.items():
        print(f"{key:12s} {value}")
    return 0 if out["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
