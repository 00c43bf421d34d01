"""Hardening against crowds, crashes and hostile clients, each over real gRPC + TLS on 127.0.0.1."""

from __future__ import annotations

import time
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


def _big_env(tmp_path: Path):
    """A bundle of ~14 MB of trainables: a download that is not read holds its call (a few MB are buffered)."""
    from _grpc_fixtures import Env
    from _tiny_bundles import make_classifier_bundle

    small = make_env(tmp_path)
    return Env(small.tmp, make_classifier_bundle(tmp_path / "big", in_dim=4, num_classes=3, hidden=1 << 19),
               small.certs, small.tokens)


def _unread_streams(ch: grpc.Channel, method: str, n: int, device_id: str = "a") -> list:
    from _grpc_fixtures import FLEET_TOKEN

    from fwdfleet.protocol import bearer_metadata, rpc

    calls = [rpc.stream_call(ch, method)(serde.download_request(device_id), timeout=60,
                                         metadata=bearer_metadata(FLEET_TOKEN)) for _ in range(n)]
    return calls


def test_a_device_retries_resource_exhausted_with_backoff_and_finishes(tmp_path) -> None:
    import threading

    from fwdfleet.device_runtime.client import DeviceClient, DeviceClientConfig

    env = _big_env(tmp_path)
    server = start(env, aggregator_config(rounds={"num_rounds": 1}), max_concurrent_rpcs=2, chunk_bytes=64 * 1024)
    holder = channel(env, server.port)
    try:
        held = _unread_streams(holder, "DownloadTrainables", 2)  # every call slot is taken
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as info:
            call(channel(env, server.port), "Status", serde.status_request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        clients = [DeviceClient(DeviceClientConfig(address=f"127.0.0.1:{server.port}", device_id=d,
                                                   token="fleet-token-for-tests", root_cert=str(env.certs["ca"]),
                                                   long_poll_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.3,
                                                   rpc_timeout_s=10), env.tmp / d, dataset(i))
                   for i, d in enumerate(("a", "b"))]
        threads = [threading.Thread(target=c.run, args=(1,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        threading.Timer(1.5, lambda: [c.cancel() for c in held]).start()  # the crowd leaves
        for t in threads:
            t.join(60)
        assert [c.stats.rounds for c in clients] == [1, 1]
        assert all(c.stats.retries > 0 for c in clients)  # they were turned away, waited and came back
    finally:
        holder.close()
        server.stop()


def test_unread_downloads_cannot_starve_the_server(tmp_path) -> None:
    from fwdfleet.protocol.retry import retry_after

    env = _big_env(tmp_path)
    server = start(env, aggregator_config(), chunk_bytes=64 * 1024, download_timeout_s=3.0)
    holder = channel(env, server.port)
    ch = channel(env, server.port)
    try:
        held = _unread_streams(holder, "DownloadBundle", 16)  # 16 slow readers, one token, one device id
        time.sleep(0.5)
        t0 = time.monotonic()
        status = serde.status_from_bytes(call(ch, "Status", serde.status_request(), timeout=5))
        assert status.model_version == 0 and time.monotonic() - t0 < 2  # the pool still serves
        turned_away = []
        for c in held:
            if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                turned_away.append(c)
        assert len(turned_away) == 14  # downloads_per_device = 2: the rest are told to come back
        assert all(retry_after(c) == 1.0 for c in turned_away)  # with the delay to wait
        assert "downloads_per_device" in turned_away[0].details()
        # the two admitted streams are cancelled at their deadline (3 s), freeing their threads and slots:
        # device "a" downloads again, in full
        time.sleep(3.5)
        data = b"".join(serde.chunk_from_bytes(b).data for b in _unread_streams(ch, "DownloadBundle", 1)[0])
        assert len(data) == server.servicer.archive.size
    finally:
        holder.close()
        ch.close()
        server.stop()


def test_the_global_download_cap_answers_with_a_retry_after(tmp_path) -> None:
    from fwdfleet.protocol.retry import retry_after

    env = _big_env(tmp_path)
    server = start(env, aggregator_config(), chunk_bytes=64 * 1024, download_slots=3, downloads_per_device=4)
    holder = channel(env, server.port)
    try:
        for d in ("a", "b"):
            _join(holder, d)
        held = [*_unread_streams(holder, "DownloadTrainables", 2, "a"),
                *_unread_streams(holder, "DownloadTrainables", 2, "b")]
        time.sleep(0.5)
        refused = [c for c in held if c.done()]
        assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "download_slots" in refused[0].details() and retry_after(refused[0]) == 1.0
        assert serde.status_from_bytes(call(holder, "Status", serde.status_request(), timeout=5)).model_version == 0
    finally:
        holder.close()
        server.stop()


def test_untrusted_strings_are_escaped_and_bounded_before_they_are_logged(env, caplog) -> None:
    import logging

    server = start(env, aggregator_config())
    ch = channel(env, server.port)
    forged = "1.0\nWARNING fwdfleet.aggregator: token of device dev-b REVOKED\x00" + "x" * 5000
    try:
        with caplog.at_level(logging.INFO, logger="fwdfleet.aggregator"):
            call(ch, "Join", serde.join_request("dev-a\n\x00evil", PROFILE, forged))
        lines = [r.getMessage() for r in caplog.records if r.name == "fwdfleet.aggregator"]
        joined = [m for m in lines if "joined as index" in m]
        assert joined, lines
        for message in lines:
            assert "\n" not in message and "\x00" not in message and "\r" not in message, message
            assert len(message) < 400, len(message)
        assert "REVOKED" in joined[0] and "\\n" in joined[0] and "\\x00" in joined[0]  # shown, escaped
        assert "(+" in joined[0]  # and the cut is said
    finally:
        ch.close()
        server.stop()


def test_a_revoked_token_is_refused_within_seconds_and_a_new_one_admitted_without_a_restart(env) -> None:
    from _grpc_fixtures import DEVICE_TOKEN, FLEET_TOKEN

    from fwdfleet.aggregator.auth import append_token

    server = start(env, aggregator_config(), tokens_reload_s=0.5)
    ch = channel(env, server.port)
    try:
        call(ch, "Join", serde.join_request("phone-a", PROFILE, "test"), DEVICE_TOKEN)
        kept = [line for line in env.tokens.read_text().splitlines() if "phone-a" not in line]
        env.tokens.write_text("\n".join(kept) + "\n")  # the operator revokes phone-a's token
        append_token(env.tokens, "token-of-phone-b", "phone-b", "phone-b")  # and issues phone-b's
        t0 = time.monotonic()

        def refused() -> bool:
            try:
                call(ch, "Heartbeat", serde.heartbeat_request("phone-a"), DEVICE_TOKEN)
                return False
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                return True

        _wait(refused, timeout=5)
        assert time.monotonic() - t0 < 5
        call(ch, "Join", serde.join_request("phone-b", PROFILE, "test"), "token-of-phone-b")
        call(ch, "Status", serde.status_request(), FLEET_TOKEN)  # the others are untouched
        env.tokens.write_text("garbage\n")  # a broken edit keeps the last good list in force
        time.sleep(1.0)
        call(ch, "Status", serde.status_request(), FLEET_TOKEN)
    finally:
        ch.close()
        server.stop()


def test_gen_certs_creates_the_private_key_owner_only_from_its_first_byte(tmp_path) -> None:
    import os
    import sys

    from fwdfleet.aggregator.tls import write_dev_certificates

    key = tmp_path / "certs" / "server.key"
    exposed: list[int] = []
    watching = [True]

    def hook(event: str, args: tuple) -> None:  # after every audited step: was the key ever readable by others?
        if watching[0] and key.is_file() and key.stat().st_size > 0 and key.stat().st_mode & 0o077:
            exposed.append(key.stat().st_mode & 0o777)

    sys.addaudithook(hook)
    old = os.umask(0o022)
    try:
        write_dev_certificates(tmp_path / "certs")
        write_dev_certificates(tmp_path / "certs")  # again, over the existing files
    finally:
        os.umask(old)
        watching[0] = False
    assert not exposed, f"the private key held data with mode {oct(exposed[0])}"
    assert key.stat().st_mode & 0o777 == 0o600


def test_insecure_mode_binds_loopback_unless_told_otherwise_and_says_so(env, caplog) -> None:
    import logging

    from fwdfleet.aggregator.coordinator import Coordinator
    from fwdfleet.aggregator.server import ServerConfig, serve

    assert ServerConfig(tls_cert="c", tls_key="k", tokens_file="t").host == "0.0.0.0"  # TLS: every interface
    config = ServerConfig(insecure=True, port=0, advance_interval_s=0.05)
    assert config.host == "127.0.0.1"
    with caplog.at_level(logging.WARNING, logger="fwdfleet.aggregator"):
        server = serve(config, Coordinator(aggregator_config(), env.bundle), env.bundle)
    try:
        assert server.address == f"127.0.0.1:{server.port}"
        assert any("loopback interface only" in r.getMessage() for r in caplog.records)
        ch = grpc.insecure_channel(server.address)
        assert serde.status_from_bytes(call(ch, "Status", serde.status_request(), token=None)).model_version == 0
        ch.close()
    finally:
        server.stop()
    exposed = ServerConfig(insecure=True, host="0.0.0.0")
    from fwdfleet.aggregator.server import insecure_binding

    assert "reachable from the network WITHOUT TLS" in insecure_binding(exposed)


def test_restored_devices_are_not_live_until_heard_from(env, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    config = aggregator_config(rounds={"min_devices": 2, "deadline_s": 30})
    server = start(env, config, checkpoint_dir=ckpt)
    ch = channel(env, server.port)
    try:
        for d in ("a", "b", *(f"junk-{i}" for i in range(8))):
            _join(ch, d)
    finally:
        ch.close()
        server.stop()
    server = start(env, config, checkpoint_dir=ckpt)
    ch = channel(env, server.port)
    try:
        status = server.servicer.coordinator.status()
        assert status.devices_registered == 10 and status.devices_available == 0
        assert status.state in ("waiting", "open")
        for d in ("a", "b"):  # only these come back
            call(ch, "Heartbeat", serde.heartbeat_request(d))
        status = server.servicer.coordinator.status()
        assert status.devices_available == 2
        _wait(lambda: server.servicer.coordinator.status().selected > 0)
        for d in ("a", "b"):  # a round selects only devices that were heard from
            poll = serde.task_poll_from_bytes(call(ch, "GetTask", serde.get_task_request(d, 5)))
            assert poll.task is not None
    finally:
        ch.close()
        server.stop()


def test_registrations_are_capped_per_token_and_the_registry_journal_is_compacted(env, tmp_path) -> None:
    from _grpc_fixtures import DEVICE_TOKEN

    from fwdfleet.aggregator.checkpoint import DEVICES

    ckpt = tmp_path / "ckpt"
    config = aggregator_config(rounds={"min_devices": 50})

    def expect(code, fn, word: str) -> None:
        with pytest.raises(grpc.RpcError) as info:
            fn()
        assert info.value.code() == code and word in info.value.details(), info.value

    for _restart in range(2):
        server = start(env, config, checkpoint_dir=ckpt, max_devices_per_token=5)
        ch = channel(env, server.port)
        try:
            for i in range(5):  # the fleet-wide token registers its five (again after the restart)
                _join(ch, f"dev-{i}")
            expect(grpc.StatusCode.PERMISSION_DENIED, lambda ch=ch: _join(ch, "dev-5"), "max_devices_per_token")
            call(ch, "Join", serde.join_request("phone-a", PROFILE, "test"), DEVICE_TOKEN)  # another token's own
            big = serde.DeviceProfile(platform="x" * 15_000)
            expect(grpc.StatusCode.INVALID_ARGUMENT,
                   lambda ch=ch, big=big: call(ch, "Join", serde.join_request("dev-0", big, "test")),
                   "profile is too large")
            for n in range(200):  # re-joins with a changing profile: journaled, but compacted
                call(ch, "Join", serde.join_request("dev-0", serde.DeviceProfile(platform="p", ram_mb=n), "t"))
            assert server.servicer.coordinator.status().devices_registered == 6
        finally:
            ch.close()
            server.stop()
        lines = (ckpt / DEVICES).read_text().splitlines()
        assert len(lines) <= 2 * 6 + 64 + 1, len(lines)


def test_the_pff_store_serves_tls_with_tokens_and_refuses_an_overflowing_shape(env, tmp_path) -> None:
    import numpy as np
    from _grpc_fixtures import FLEET_TOKEN

    from fwdfleet.pff.store import StoreClient, StoreServer
    from fwdfleet.pff.wire import StoreError, TaskRecord
    from fwdfleet.protocol import bearer_metadata
    from fwdfleet.protocol.v1 import pff_pb2 as pb
    from fwdfleet.protocol.v1 import pff_pb2_grpc as pb_grpc

    server = StoreServer(tmp_path / "store", tls_cert=str(env.certs["cert"]), tls_key=str(env.certs["key"]),
                         tokens_file=str(env.tokens))
    ca = str(env.certs["ca"])
    try:
        client = StoreClient(server.address, root_cert=ca, token=FLEET_TOKEN, retry_seconds=5)
        params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
        assert client.publish(0, 1, params, TaskRecord()) is False
        np.testing.assert_array_equal(client.fetch(0, 1).params["w"], params["w"])
        client.close()
        for token in (None, "not-a-token"):  # no token, a wrong one: refused before any handler runs
            stranger = StoreClient(server.address, root_cert=ca, token=token, retry_seconds=2)
            with pytest.raises(StoreError, match="token"):
                stranger.fetch(0, 1)
            stranger.close()
        with pytest.raises(grpc.RpcError):  # plaintext cannot talk to it
            pb_grpc.PffStoreStub(grpc.insecure_channel(server.address)).Status(pb.PffStatusRequest(), timeout=5)
        ch = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(env.certs["ca"].read_bytes()))
        stub = pb_grpc.PffStoreStub(ch)
        huge = pb.Tensor(name="w", shape=[2**32, 2**32], data=b"", sha256="e3b0c44298fc1c149afbf4c8996fb924"
                         "27ae41e4649b934ca495991b7852b855")  # sha256 of nothing: only the shape is wrong
        with pytest.raises(grpc.RpcError) as info:
            stub.Publish(pb.PublishRequest(layer=0, version=2, tensors=[huge]), timeout=5,
                         metadata=bearer_metadata(FLEET_TOKEN))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "bytes for shape" in info.value.details()
        ch.close()
    finally:
        server.stop()
    with pytest.raises(StoreError, match="loopback"):
        StoreServer(tmp_path / "store2", host="0.0.0.0")
