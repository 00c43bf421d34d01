"""Hardening against crowds, crashes and hostile clients, each over real gRPC + TLS on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from _grpc_fixtures import aggregator_config, call, channel, dataset, make_env, start

from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.protocol import serde
from fwdfleet.task import DeviceResult

PROFILE = serde.DeviceProfile(platform="test", ram_mb=512)


@pytest.fixture()
def env(tmp_path: Path):
    return make_env(tmp_path)


def _join(ch: grpc.Channel, device_id: str) -> None:
    call(ch, "Join", serde.join_request(device_id, PROFILE, "test"))


def _submit(ch: grpc.Channel, device_id: str, result: DeviceResult) -> serde.SubmitReceipt:
    return serde.submit_ack_from_bytes(call(ch, "Submit", serde.submit_request(device_id, result)))


def _play(ch: grpc.Channel, session: BundleSession, trainables: dict, devices: tuple[str, ...]) -> dict:
    """Each device polls its task, trains on its own data, submits; returns the results by device."""
    results = {}
    for seed, d in enumerate(devices):
        poll = serde.task_poll_from_bytes(call(ch, "GetTask", serde.get_task_request(d, 5)))
        assert poll.task is not None, poll
        results[d] = estimate(session, trainables, dataset(seed).batch(poll.task.data_seed, poll.task.batch_size),
                              poll.task)
        assert _submit(ch, d, results[d]).accepted
    return results


def _version(server) -> int:
    return int(server.servicer.coordinator.status().model_version)


def _wait(predicate, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_a_counted_upload_is_a_duplicate_after_any_number_of_restarts_whatever_its_round(env, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    config = aggregator_config()
    session = BundleSession(env.bundle)
    server = start(env, config, checkpoint_dir=ckpt)
    ch = channel(env, server.port)
    try:
        for d in ("a", "b"):
            _join(ch, d)
        first = _play(ch, session, env.bundle.load_trainables(), ("a", "b"))  # round 0
        _wait(lambda: _version(server) == 1)
        second = _play(ch, session, server.servicer.coordinator.current_trainables()[1], ("a",))  # half of round 1
    finally:
        ch.close()
        server.stop()
    for restart in range(3):
        server = start(env, config, checkpoint_dir=ckpt)
        ch = channel(env, server.port)
        try:
            for d in ("a", "b"):
                _join(ch, d)
            for label, results in (("round 0", first), ("round 1", second)):
                for d, result in results.items():
                    ack = _submit(ch, d, result)  # the retry of an upload counted before the restart
                    assert ack.accepted and ack.duplicate, (restart, label, d, ack)
            assert _version(server) == 1  # acknowledged, never counted twice
        finally:
            ch.close()
            server.stop()
