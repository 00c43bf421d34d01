"""The aggregator over real gRPC + TLS on 127.0.0.1: a real round, and every bad input answered clearly."""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from _grpc_fixtures import DEVICE_TOKEN, FLEET_TOKEN, aggregator_config, call, channel, dataset, make_env, start

from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.protocol import rpc, serde, server_codec
from fwdfleet.protocol.v1 import fleet_pb2 as pb  # raw messages: what a broken or hostile client sends
from fwdfleet.task import DeviceResult, RoundTask

PROFILE = serde.DeviceProfile(platform="test", ram_mb=512)


def join(ch: grpc.Channel, device_id: str, token: str = FLEET_TOKEN) -> serde.Joined:
    return serde.joined_from_bytes(call(ch, "Join", serde.join_request(device_id, PROFILE, "test"), token))


def get_task(ch: grpc.Channel, device_id: str, wait: float = 5.0, token: str = FLEET_TOKEN) -> serde.TaskPoll:
    return serde.task_poll_from_bytes(call(ch, "GetTask", serde.get_task_request(device_id, wait), token))


def submit(ch: grpc.Channel, device_id: str, result: DeviceResult, token: str = FLEET_TOKEN) -> serde.SubmitReceipt:
    return serde.submit_ack_from_bytes(call(ch, "Submit", serde.submit_request(device_id, result), token))


def raw_submit(ch: grpc.Channel, device_id: str, result: pb.DeviceResult, token: str | None = FLEET_TOKEN) -> bytes:
    return call(ch, "Submit", pb.SubmitRequest(device_id=device_id, result=result).SerializeToString(), token)


def train(session: BundleSession, trainables: dict, task: RoundTask, seed: int) -> DeviceResult:
    return estimate(session, trainables, dataset(seed).batch(task.data_seed, task.batch_size), task)


def download(ch: grpc.Channel, method: str) -> tuple[bytes, serde.DownloadChunk]:
    stream = rpc.stream_call(ch, method)(serde.download_request("a"), timeout=10,
                                          metadata=(("authorization", f"Bearer {FLEET_TOKEN}"),))
    chunks = [serde.chunk_from_bytes(b) for b in stream]
    return b"".join(c.data for c in chunks), chunks[-1]


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def expect(code: grpc.StatusCode, fn, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == code, f"{err.code()} {err.details()}"
    for w in words:
        assert w in err.details(), err.details()


@pytest.fixture()
def env(tmp_path: Path):
    return make_env(tmp_path)


def test_a_real_round_over_tls(env) -> None:
    server = start(env, aggregator_config())
    ch = channel(env, server.port)
    try:
        joined = [join(ch, d) for d in ("a", "b")]
        assert {j.device_index for j in joined} == {1, 2}
        zip_bytes, last = download(ch, "DownloadBundle")
        assert hashlib.sha256(zip_bytes).hexdigest() == joined[0].bundle_sha256 == last.sha256
        assert len(zip_bytes) == joined[0].bundle_size == last.total_size

        npz, chunk = download(ch, "DownloadTrainables")
        assert chunk.model_version == 0
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            before = {k: z[k] for k in z.files}
        session = BundleSession(env.bundle)
        for seed, device in enumerate(("a", "b")):
            poll = get_task(ch, device)
            assert poll.task is not None and poll.task.num_perturbations == 4
            ack = submit(ch, device, train(session, before, poll.task, seed))
            assert ack.accepted and not ack.duplicate
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1)
        npz, chunk = download(ch, "DownloadTrainables")
        assert chunk.model_version == 1
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            assert not np.allclose(z["layers.0.weight"], before["layers.0.weight"])
        status = serde.status_from_bytes(call(ch, "Status", serde.status_request()))
        assert status.model_version == 1 and status.protocol_version == 1
        assert '"devices_registered": 2' in status.status_json
    finally:
        ch.close()
        server.stop()


def test_long_poll_returns_as_soon_as_a_round_opens(env) -> None:
    server = start(env, aggregator_config())
    ch = channel(env, server.port)
    try:
        join(ch, "a")
        assert get_task(ch, "a", wait=0).task is None  # one device: no round yet, answered at once
        timer = threading.Timer(0.3, lambda: join(ch, "b"))
        timer.start()
        t0 = time.monotonic()
        poll = get_task(ch, "a", wait=10)
        assert poll.task is not None and time.monotonic() - t0 < 5
        timer.join(10)
        assert not timer.is_alive()
    finally:
        ch.close()
        server.stop()


def test_every_bad_input_gets_a_clear_status_and_the_others_are_served(env) -> None:
    server = start(env, aggregator_config())
    ch = channel(env, server.port)
    try:
        join(ch, "a")
        join(ch, "b")
        task_a, task_b = get_task(ch, "a").task, get_task(ch, "b").task
        assert task_a is not None and task_b is not None
        trainables = env.bundle.load_trainables()
        session = BundleSession(env.bundle)
        good_a = train(session, trainables, task_a, 0)
        good_b = train(session, trainables, task_b, 1)
        ks = list(task_a.candidate_indices)

        def result(**kw) -> pb.DeviceResult:
            fields = dict(round_id=task_a.round_id, model_version=task_a.model_version, indices=ks,
                          derivatives=[0.5] * len(ks), num_samples=16, loss_mean=1.0)
            fields.update(kw)
            return pb.DeviceResult(**fields)

        # b's good upload is accepted first; nothing a does afterwards may lose it
        assert submit(ch, "b", good_b).accepted

        bad = grpc.StatusCode.INVALID_ARGUMENT
        expect(bad, lambda: raw_submit(ch, "a", result(derivatives=[0.5, math.nan, 0.5, 0.5])), "NON_FINITE", "nan")
        expect(bad, lambda: raw_submit(ch, "a", result(derivatives=[0.5, 0.5, math.inf, 0.5])), "NON_FINITE")
        expect(bad, lambda: raw_submit(ch, "a", result(indices=[*ks[:3], 10_000])), "BAD_INDEX")
        expect(bad, lambda: raw_submit(ch, "a", result(indices=[ks[0], ks[0], ks[1], ks[2]])), "DUPLICATE_INDEX")
        expect(bad, lambda: raw_submit(ch, "a", result(derivatives=[0.5])), "MALFORMED", "pair up")
        expect(bad, lambda: raw_submit(ch, "a", result(derivatives=[1e30] * 4)), "TOO_LARGE")
        expect(grpc.StatusCode.FAILED_PRECONDITION,
               lambda: raw_submit(ch, "a", result(round_id=task_a.round_id + 7)), "STALE_ROUND")
        expect(bad, lambda: call(ch, "Submit", b"\xff\xff\xff\xff garbage"), "MALFORMED", "SubmitRequest")
        expect(bad, lambda: call(ch, "Submit", pb.SubmitRequest(device_id="a").SerializeToString()), "no result")
        oversized = result(indices=list(range(5000)), derivatives=[0.1] * 5000)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: raw_submit(ch, "a", oversized))
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: submit(ch, "a", good_a, token="wrong-token"), "unknown token")
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: raw_submit(ch, "a", result(), token=None), "missing")
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: call(ch, "Status", serde.status_request(), "nope"))
        expect(grpc.StatusCode.PERMISSION_DENIED, lambda: submit(ch, "a", good_a, token=DEVICE_TOKEN),
               "may not act for device 'a'")
        expect(grpc.StatusCode.UNAUTHENTICATED, lambda: submit(ch, "ghost", good_a), "UNKNOWN_DEVICE")
        assert server.servicer.coordinator.status().model_version == 0  # nothing bad was applied

        # a's good upload still goes through, the retry is a duplicate, and the round applies with both
        assert submit(ch, "a", good_a).accepted
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1)
        # a retry of the same result after the round closed is acknowledged, not counted twice
        ack = submit(ch, "a", good_a)
        assert ack.duplicate
        status = server.servicer.coordinator.status()
        assert status.model_version == 1 and status.rounds_completed == 1
    finally:
        ch.close()
        server.stop()


def test_a_device_vanishing_mid_round_does_not_stall_it(env) -> None:
    config = aggregator_config(rounds={"min_devices": 3, "min_results": 2, "deadline_s": 1.0})
    server = start(env, config)
    ch = channel(env, server.port)
    try:
        for d in ("a", "b", "c"):
            join(ch, d)
        tasks = {d: get_task(ch, d).task for d in ("a", "b", "c")}
        trainables = env.bundle.load_trainables()
        session = BundleSession(env.bundle)
        for seed, d in enumerate(("a", "b")):
            assert submit(ch, d, train(session, trainables, tasks[d], seed)).accepted
        # "c" took its task and vanished; the round closes at its deadline with a and b
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1, timeout=10)
        late = train(session, trainables, tasks["c"], 2)
        expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: submit(ch, "c", late), "STALE_ROUND")
        assert get_task(ch, "a").task is not None  # the server goes on serving
    finally:
        ch.close()
        server.stop()


def test_uplink_per_round_is_under_1kb_at_k64() -> None:
    worst = (1 << 32) - 64  # largest indices: 5-byte varints
    for start_k in (0, worst):
        result = DeviceResult(round_id=123_456, model_version=123_456, indices=tuple(range(start_k, start_k + 64)),
                              derivatives=tuple(float(np.float32(1.2345e3 * (i - 32))) for i in range(64)),
                              num_samples=16, loss_mean=1.234, loss_std=0.1, compute_seconds=2.5)
        request = serde.submit_request("device-" + "x" * 32, result)
        assert len(request) < 1024, len(request)
        decoded = server_codec.parse_submit(request)[1]
        assert decoded.indices == result.indices and decoded.derivatives == result.derivatives
    print(f"SubmitRequest at K=64: {len(request)} bytes (worst-case indices), "
          f"{len(serde.result_to_proto(result).SerializeToString())} bytes for the result")


def test_status_gen_certs_and_add_token_commands(env, tmp_path: Path, capsys) -> None:
    import json

    from fwdfleet.aggregator.auth import TokenAllowList
    from fwdfleet.cli.main import main

    assert main(["aggregator", "gen-certs", "--out", str(tmp_path / "c"), "--host", "agg.lan"]) == 0
    capsys.readouterr()
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o077 == 0
    tokens = tmp_path / "t.txt"
    assert main(["aggregator", "add-token", "--tokens-file", str(tokens), "--name", "ops"]) == 0
    token = capsys.readouterr().out.strip()
    assert token not in tokens.read_text() and TokenAllowList.load(tokens).identify(token).name == "ops"
    server = start(env, aggregator_config(), tls_cert=str(tmp_path / "c" / "server.pem"),
                   tls_key=str(tmp_path / "c" / "server.key"), tokens_file=str(tokens))
    try:
        base = ["aggregator", "status", "--address", f"127.0.0.1:{server.port}", "--ca", str(tmp_path / "c" / "ca.pem")]
        assert main([*base, "--token", token, "--json"]) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["coordinator"]["model_version"] == 0 and body["protocol_version"] == 1
        assert main([*base, "--token", "wrong"]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        # a certificate from another CA is refused by the client: TLS really verifies
        other = tmp_path / "other"
        main(["aggregator", "gen-certs", "--out", str(other)])
        assert main(["aggregator", "status", "--address", f"127.0.0.1:{server.port}", "--ca",
                     str(other / "ca.pem"), "--token", token]) == 2
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        server.stop()


def test_server_refuses_to_start_without_tls_or_tokens(env) -> None:
    from fwdfleet.aggregator.server import ServerConfig

    with pytest.raises(ValueError, match="tls_cert"):
        ServerConfig(port=0)
    with pytest.raises(ValueError, match="tokens_file"):
        ServerConfig(port=0, tls_cert="c.pem", tls_key="k.pem")
    assert ServerConfig(port=0, insecure=True).insecure  # development only, warned at start
