"""The device client against a real TLS aggregator: rounds, a server restart mid-run, refused tokens."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from _grpc_fixtures import DEVICE_TOKEN, FLEET_TOKEN, aggregator_config, dataset, make_env, start

from fwdfleet.device_runtime.client import ClientError, DeviceClient, DeviceClientConfig, backoff_delay


def client_config(env, port: int, device_id: str, token: str = FLEET_TOKEN, **kw) -> DeviceClientConfig:
    return DeviceClientConfig(address=f"127.0.0.1:{port}", device_id=device_id, token=token,
                              root_cert=str(env.certs["ca"]), long_poll_s=1.0, initial_backoff_s=0.05,
                              max_backoff_s=0.3, rpc_timeout_s=5, **kw)


def run_clients(clients: list[DeviceClient], rounds: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=c.run, args=(rounds,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    return threads


def wait_for(predicate, timeout: float = 60.0) -> None:  # generous: a loaded 2-core CI machine
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture()
def env(tmp_path: Path):
    return make_env(tmp_path)


def test_clients_train_rounds_and_reuse_their_bundle(env) -> None:
    server = start(env, aggregator_config(rounds={"num_rounds": 3}))
    try:
        clients = [DeviceClient(client_config(env, server.port, d), env.tmp / d, dataset(i))
                   for i, d in enumerate(("a", "b"))]
        for t in run_clients(clients, 3):
            t.join(30)
            assert not t.is_alive(), "a client did not finish its 3 rounds"
        assert [c.stats.rounds for c in clients] == [3, 3]
        assert all(c.stats.bundle_downloads == 1 and c.stats.trainable_downloads == 3 for c in clients)
        assert server.servicer.coordinator.status().model_version == 3
        assert all(c.stats.uplink_bytes < 3 * 1024 for c in clients)
        # the same device later: the verified bundle on disk is reused, not downloaded again
        again = DeviceClient(client_config(env, server.port, "a"), env.tmp / "a", dataset(0))
        again._ensure_joined()
        assert again.stats.bundle_downloads == 0
        again.close()
    finally:
        server.stop()


def test_client_resumes_after_the_server_restarts(env, tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    config = aggregator_config(rounds={"num_rounds": 5})
    server = start(env, config, checkpoint_dir=checkpoints)
    port = server.port
    clients = [DeviceClient(client_config(env, port, d), env.tmp / d, dataset(i), seed=i)
               for i, d in enumerate(("a", "b"))]
    threads = run_clients(clients, None)  # until stopped
    restarted = None
    try:
        wait_for(lambda: server.servicer.coordinator.status().model_version >= 2)
        server.stop(grace=0)  # the aggregator goes away while the clients poll
        time.sleep(0.5)
        restarted = start(env, config, checkpoint_dir=checkpoints, port=port)
        assert restarted.servicer.coordinator.status().model_version >= 2  # resumed from its checkpoint
        wait_for(lambda: restarted.servicer.coordinator.status().model_version == 5, timeout=90)
        for c in clients:
            c.stop()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert all(c.stats.retries > 0 for c in clients), [c.stats for c in clients]
        # every round needs both devices, so each took part in the rounds after the restart too; a
        # result whose acknowledgement was lost in the crash may be refused as stale by the new process
        assert all(c.stats.rounds + c.stats.dropped >= 5 for c in clients), [c.stats for c in clients]
        assert all(c.stats.rounds >= 4 for c in clients), [c.stats for c in clients]
    finally:
        for c in clients:
            c.stop()
        server.stop()
        if restarted is not None:
            restarted.stop()


def test_a_refused_token_stops_the_client_with_a_clear_error(env) -> None:
    server = start(env, aggregator_config())
    try:
        bad = DeviceClient(client_config(env, server.port, "a", token="not-a-token"), env.tmp / "a", dataset())
        with pytest.raises(ClientError, match="refused this device's token"):
            bad.run(1)
        other = DeviceClient(client_config(env, server.port, "b", token=DEVICE_TOKEN), env.tmp / "b", dataset())
        with pytest.raises(ClientError, match="may not act for device 'b'"):
            other.run(1)
    finally:
        server.stop()


def test_stop_ends_a_waiting_client(env) -> None:
    server = start(env, aggregator_config())  # needs 2 devices: one alone waits forever
    try:
        client = DeviceClient(client_config(env, server.port, "a"), env.tmp / "a", dataset())
        (thread,) = run_clients([client], 1)
        wait_for(lambda: client.stats.joins == 1)
        client.stop()
        thread.join(10)
        assert not thread.is_alive() and client.stats.rounds == 0
    finally:
        server.stop()


def test_unreachable_server_gives_up_after_max_retries(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # bound for the whole test but never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        config = DeviceClientConfig(address=f"127.0.0.1:{port}", device_id="a", insecure=True,
                                    initial_backoff_s=0.01, max_backoff_s=0.02, max_retries=3, rpc_timeout_s=1)
        client = DeviceClient(config, tmp_path, dataset())
        with pytest.raises(ClientError, match="after 3 attempts"):
            client.run(1)
    assert client.stats.retries == 3


def test_backoff_grows_jittered_and_capped() -> None:
    import random

    config = DeviceClientConfig(address="h:1", device_id="a", insecure=True, initial_backoff_s=0.1,
                                max_backoff_s=1.0, backoff_multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    delays = [backoff_delay(a, config, rng) for a in range(8)]
    assert all(0.05 <= d <= 0.1 for d in delays[:1])
    assert all(0.5 <= d <= 1.0 for d in delays[4:])
    assert len(set(delays)) == len(delays)  # jittered
    with pytest.raises(ValueError, match="jitter"):
        DeviceClientConfig(address="h:1", device_id="a", jitter=2.0)
    with pytest.raises(ValueError, match="address"):
        DeviceClientConfig(address="nohost", device_id="a")


def test_device_run_command_trains_against_a_server(env, tmp_path: Path) -> None:
    import argparse

    import numpy as np

    from fwdfleet.cli.device_run_cmd import register_run

    rng = np.random.default_rng(0)
    data = tmp_path / "train.npz"
    np.savez(data, x=rng.standard_normal((32, 4)).astype(np.float32), labels=rng.integers(0, 3, 32))
    server = start(env, aggregator_config(rounds={"min_devices": 1}))
    try:
        (tmp_path / "token.txt").write_text(FLEET_TOKEN + "\n")
        (tmp_path / "device.toml").write_text(
            f'bundle_dir = "{tmp_path / "dev"}"\nrounds = 2\nthreads = 1\n'
            f'[client]\naddress = "127.0.0.1:{server.port}"\ndevice_id = "cli-device"\n'
            f'token_file = "{tmp_path / "token.txt"}"\nroot_cert = "{env.certs["ca"]}"\n'
            f'long_poll_s = 1.0\n[data]\npath = "{data}"\n')
        parser = argparse.ArgumentParser()
        register_run(parser.add_subparsers())
        args = parser.parse_args(["run", "--config", str(tmp_path / "device.toml")])
        assert args.func(args) == 0
        assert server.servicer.coordinator.status().model_version >= 2
    finally:
        server.stop()
