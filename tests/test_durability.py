"""Kill the aggregator process (SIGKILL) mid-round, restart it from its checkpoints, finish training:
the trainables end up exactly where an uninterrupted run puts them."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from _grpc_fixtures import FLEET_TOKEN, call, channel, dataset, make_env

from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.protocol import bearer_metadata, rpc, serde

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 4
DEVICES = ("a", "b")
CONFIG = f"""
master_seed = 7
[rounds]
min_devices = 2
num_rounds = {ROUNDS}
deadline_s = 60
[perturbation]
k = 4
[optimizer]
lr = 0.05
"""

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


class Aggregator:
    """`fwdfleet aggregator serve` in a real child process."""

    def __init__(self, env, checkpoints: Path) -> None:
        cfg = env.tmp / "aggregator.toml"
        cfg.write_text(CONFIG)
        args = [sys.executable, "-m", "fwdfleet.cli.main", "aggregator", "serve", "--config", str(cfg),
                "--bundle", str(env.bundle.path), "--checkpoint-dir", str(checkpoints), "--host", "127.0.0.1",
                "--port", "0", "--tls-cert", str(env.certs["cert"]), "--tls-key", str(env.certs["key"]),
                "--tokens-file", str(env.tokens), "--set", "server.advance_interval_s=0.05"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(match.group(1))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


def trainables(ch: grpc.Channel) -> tuple[int, dict[str, np.ndarray]]:
    stream = rpc.stream_call(ch, "DownloadTrainables")(serde.download_request("a"), timeout=10,
                                                          metadata=bearer_metadata(FLEET_TOKEN))
    chunks = [serde.chunk_from_bytes(b) for b in stream]
    with np.load(io.BytesIO(b"".join(c.data for c in chunks)), allow_pickle=False) as z:
        return chunks[-1].model_version, {k: z[k] for k in z.files}


def play_round(ch: grpc.Channel, session: BundleSession, devices=DEVICES) -> None:
    """Each device fetches its task and current tensors, trains, submits."""
    for d in devices:
        i = DEVICES.index(d)  # each device keeps its own data
        poll = serde.task_poll_from_bytes(call(ch, "GetTask", serde.get_task_request(d, 10)))
        assert poll.task is not None, poll
        version, values = trainables(ch)
        assert version == poll.task.model_version
        batch = dataset(i).batch(poll.task.data_seed, poll.task.batch_size)
        result = estimate(session, values, batch, poll.task)
        assert serde.submit_ack_from_bytes(call(ch, "Submit", serde.submit_request(d, result))).accepted


def wait_version(ch: grpc.Channel, version: int) -> None:
    end = time.monotonic() + 20
    while serde.status_from_bytes(call(ch, "Status", serde.status_request())).model_version < version:
        assert time.monotonic() < end, "the update was not applied"
        time.sleep(0.05)


def run(env, checkpoints: Path, kill_in_round: int | None) -> dict[str, np.ndarray]:
    session = BundleSession(env.bundle)
    server = Aggregator(env, checkpoints)
    ch = channel(env, server.port)
    try:
        for d in DEVICES:
            call(ch, "Join", serde.join_request(d, serde.DeviceProfile(platform="test"), "test"))
        for r in range(ROUNDS):
            if r == kill_in_round:
                play_round(ch, session, devices=DEVICES[:1])  # a's result is in, b's is not
                server.kill()
                ch.close()
                server = Aggregator(env, checkpoints)  # restarts from the last checkpoint
                ch = channel(env, server.port)
                status = serde.status_from_bytes(call(ch, "Status", serde.status_request()))
                assert status.model_version == r  # every applied update survived, none was applied twice
                # a's upload was journaled before it was acknowledged: it survived, only b still owes one
                play_round(ch, session, devices=DEVICES[1:])
            else:
                play_round(ch, session)
            wait_version(ch, r + 1)
        version, values = trainables(ch)
        assert version == ROUNDS
        assert server.terminate() == 0  # SIGTERM: clean shutdown
        return values
    finally:
        ch.close()
        if server.proc.poll() is None:
            server.proc.kill()


def test_sigkill_mid_round_then_restart_reaches_the_same_trainables(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    reference = run(env, tmp_path / "ckpt-reference", kill_in_round=None)
    interrupted = run(env, tmp_path / "ckpt-killed", kill_in_round=2)
    initial = env.bundle.load_trainables()
    assert not np.allclose(reference["layers.0.weight"], initial["layers.0.weight"])  # training moved the model
    for name in reference:
        np.testing.assert_array_equal(interrupted[name], reference[name])
