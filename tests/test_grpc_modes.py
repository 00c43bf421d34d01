"""Dense-gradient and FedAvg uploads over real gRPC + TLS on 127.0.0.1 (port 0).

A round in each mode is applied by the server exactly as the in-process coordinator applies the
same uploads; vector uploads have their own size limit (the scalar one stays small) and a vector
of the wrong length, a corrupted one or one for the wrong mode is refused with a clear status.
Real device clients then train in each mode, learning the mode from the aggregator alone.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from _grpc_fixtures import FLEET_TOKEN, call, channel, dataset, make_env, start
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.client import DeviceClient, DeviceClientConfig
from fwdfleet.device_runtime.data import ArrayDataset
from fwdfleet.device_runtime.estimator import dense_gradient, estimate
from fwdfleet.device_runtime.ff_train import FFTrainConfig, train_ff
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.perturbation import flatten, split
from fwdfleet.protocol import rpc, serde
from fwdfleet.protocol.v1 import fleet_pb2 as pb  # raw messages: what a broken client sends
from fwdfleet.task import DeviceProfile, DeviceResult, RoundTask

PROFILE = serde.DeviceProfile(platform="test", ram_mb=512)
DEVICES = ("a", "b")


def mode_config(mode: str, **optimizer: Any) -> Any:
    return config_from_dict({
        "mode": mode,
        "rounds": {"min_devices": 2, "deadline_s": 30},
        "perturbation": {"k": 4},
        "optimizer": {"name": "sgd", "lr": 0.5, **optimizer},
    })


def submit_vector(ch: grpc.Channel, device_id: str, result: DeviceResult, mode: str,
                  values: np.ndarray) -> serde.SubmitReceipt:
    request = serde.submit_vector_request(device_id, result, mode, values)  # type: ignore[arg-type]
    return serde.submit_ack_from_bytes(call(ch, "SubmitVector", request))


def expect(code: grpc.StatusCode, fn, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, f"{info.value.code()} {info.value.details()}"
    for w in words:
        assert w in info.value.details(), info.value.details()


def wait_for(predicate, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def server_trainables(ch: grpc.Channel) -> tuple[int, dict[str, np.ndarray]]:
    stream = rpc.stream_call(ch, "DownloadTrainables")(serde.download_request("a"), timeout=10,
                                                        metadata=(("authorization", f"Bearer {FLEET_TOKEN}"),))
    chunks = [serde.chunk_from_bytes(b) for b in stream]
    with np.load(io.BytesIO(b"".join(c.data for c in chunks)), allow_pickle=False) as z:
        return chunks[-1].model_version, {k: z[k] for k in z.files}


def join_and_poll(ch: grpc.Channel, mode: str) -> dict[str, RoundTask]:
    tasks: dict[str, RoundTask] = {}
    for d in DEVICES:
        joined = serde.joined_from_bytes(call(ch, "Join", serde.join_request(d, PROFILE, "test")))
        assert joined.mode == mode
    for d in DEVICES:
        poll = serde.task_poll_from_bytes(call(ch, "GetTask", serde.get_task_request(d, 5.0)))
        assert poll.mode == mode and poll.task is not None
        tasks[d] = poll.task
    return tasks


def in_process(env: Any, config: Any, uploads: dict[str, tuple[DeviceResult, np.ndarray]], mode: str) -> dict:
    """The same uploads, in the same order, given to a coordinator without any transport."""
    coordinator = Coordinator(config, env.bundle)
    for d in DEVICES:
        coordinator.join(d, DeviceProfile(platform="test", ram_mb=512))
    for d in DEVICES:
        assert coordinator.task_for(d) is not None
        result, vector = uploads[d]
        if mode == "dense":
            coordinator.submit_dense(d, result, vector)
        else:
            coordinator.submit_weights(d, result, split(vector, env.bundle.manifest.trainables))
    version, tensors = coordinator.current_trainables()
    assert version == 1
    return tensors


@pytest.fixture()
def env(tmp_path: Path):
    return make_env(tmp_path)


def test_dense_round_equals_in_process_and_bad_vectors_are_refused(env, tmp_path: Path) -> None:
    # 8,195 trainable values: a 32 KB vector, twice the 16 KiB scalar limit
    env = dataclasses.replace(env, bundle=make_classifier_bundle(tmp_path / "wide", in_dim=4, num_classes=3,
                                                                 hidden=1024))
    config = mode_config("dense")
    server = start(env, config)
    ch = channel(env, server.port)
    try:
        tasks = join_and_poll(ch, "dense")
        session = BundleSession(env.bundle)
        initial = env.bundle.load_trainables()
        n = env.bundle.manifest.num_trainable
        uploads = {}
        for seed, d in enumerate(DEVICES):
            result = estimate(session, initial, dataset(seed).batch(tasks[d].data_seed, tasks[d].batch_size), tasks[d])
            uploads[d] = (dataclasses.replace(result, indices=(), derivatives=()),
                          dense_gradient(result, tasks[d], n))
        assert submit_vector(ch, "a", uploads["a"][0], "dense", uploads["a"][1]).accepted

        meta, grad = uploads["b"]
        bad = grpc.StatusCode.INVALID_ARGUMENT
        expect(bad, lambda: submit_vector(ch, "b", meta, "dense", grad[:-1]), "MALFORMED", f"{n} trainable values")
        expect(bad, lambda: submit_vector(ch, "b", meta, "fedavg", grad), "mode 'dense'")
        raw = pb.SubmitVectorRequest.FromString(serde.submit_vector_request("b", meta, "dense", grad))
        raw.values = (grad + 1).astype("<f4").tobytes()  # corrupted in transit: the digest no longer matches
        expect(bad, lambda: call(ch, "SubmitVector", raw.SerializeToString()), "sha256")
        nan = grad.copy()
        nan[0] = np.nan
        expect(bad, lambda: submit_vector(ch, "b", meta, "dense", nan), "NON_FINITE")
        scalar = DeviceResult(round_id=meta.round_id, model_version=meta.model_version, indices=(0,),
                              derivatives=(0.5,), num_samples=1, loss_mean=1.0)
        expect(bad, lambda: call(ch, "Submit", serde.submit_request("b", scalar)), "mode 'dense'")
        # vector uploads have their own limit; the scalar limit stays small in dense mode
        limit = 4 * n + server.config.max_receive_bytes
        huge = np.zeros(limit // 4 + 1024, dtype=np.float32)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: submit_vector(ch, "b", meta, "dense", huge))
        big_scalar = pb.SubmitRequest(device_id="b", result=pb.DeviceResult(
            round_id=meta.round_id, model_version=meta.model_version, indices=list(range(5000)),
            derivatives=[0.1] * 5000, num_samples=1)).SerializeToString()
        assert server.config.max_receive_bytes < len(big_scalar) < limit
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: call(ch, "Submit", big_scalar), "Submit request")
        assert server.servicer.coordinator.status().model_version == 0  # nothing bad was applied

        assert submit_vector(ch, "b", meta, "dense", grad).accepted
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1)
        assert submit_vector(ch, "b", meta, "dense", grad).duplicate  # a retry is not counted twice
        version, tensors = server_trainables(ch)
        assert version == 1
        expected = in_process(env, config, uploads, "dense")
        for name, value in expected.items():
            np.testing.assert_array_equal(tensors[name], value)
        assert not np.array_equal(tensors["layers.0.weight"], initial["layers.0.weight"])
    finally:
        ch.close()
        server.stop()


def test_fedavg_round_equals_in_process(env) -> None:
    config = mode_config("fedavg", lr=1.0, momentum=0.0)  # sgd with lr 1: plain FedAvg
    server = start(env, config)
    ch = channel(env, server.port)
    try:
        tasks = join_and_poll(ch, "fedavg")
        initial = flatten(env.bundle.load_trainables(), env.bundle.manifest.trainables)
        uploads = {}
        for i, d in enumerate(DEVICES):
            weights = initial + np.random.default_rng(i).standard_normal(initial.size).astype(np.float32) * 0.1
            result = DeviceResult(round_id=tasks[d].round_id, model_version=tasks[d].model_version, indices=(),
                                  derivatives=(), num_samples=5 * (i + 1), loss_mean=1.0)
            uploads[d] = (result, weights)
            assert submit_vector(ch, d, result, "fedavg", weights).accepted
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1)
        _, tensors = server_trainables(ch)
        expected = in_process(env, config, uploads, "fedavg")
        mean = (5 * uploads["a"][1] + 10 * uploads["b"][1]) / 15  # weighted by samples
        got = flatten(tensors, env.bundle.manifest.trainables)
        np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6)
        for name, value in expected.items():
            np.testing.assert_array_equal(tensors[name], value)
    finally:
        ch.close()
        server.stop()


def client_config(env: Any, port: int, device_id: str) -> DeviceClientConfig:
    return DeviceClientConfig(address=f"127.0.0.1:{port}", device_id=device_id, token=FLEET_TOKEN,
                              root_cert=str(env.certs["ca"]), long_poll_s=1.0, initial_backoff_s=0.05,
                              max_backoff_s=0.3, rpc_timeout_s=5)


def run_devices(env: Any, server: Any, datasets: list[Any], **kw: Any) -> list[DeviceClient]:
    """Two real clients, joined in order (device indices 1, 2), one accepted round each."""
    clients = [DeviceClient(client_config(env, server.port, d), env.tmp / d, data, seed=i, **kw)
               for i, (d, data) in enumerate(zip(DEVICES, datasets, strict=True))]
    threads = []
    for i, c in enumerate(clients):
        threads.append(threading.Thread(target=c.run, args=(1,), daemon=True))
        threads[-1].start()
        wait_for(lambda i=i: server.servicer.coordinator.status().devices_registered == i + 1)
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive()
    return clients


@pytest.mark.parametrize("mode", ["dense", "fedavg"])
def test_device_clients_train_in_the_aggregators_mode(env, mode: str) -> None:
    server = start(env, mode_config(mode))
    ch = channel(env, server.port)
    try:
        clients = run_devices(env, server, [dataset(0), dataset(1)])
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1)
        n = env.bundle.manifest.num_trainable
        for c in clients:
            assert c.stats.rounds == 1 and c.stats.dropped == 0
            assert c.stats.uplink_bytes > 4 * n  # a vector went up, not a few scalars
        _, tensors = server_trainables(ch)
        assert not np.array_equal(tensors["layers.0.weight"], env.bundle.load_trainables()["layers.0.weight"])
    finally:
        ch.close()
        server.stop()


def test_fedavg_of_forward_forward_layers_trained_on_devices(env, tmp_path: Path) -> None:
    from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp

    bundle = load_bundle(export_ff_mlp(FFMLPConfig(layers=(8, 16, 16), num_classes=3), tmp_path / "ff"))
    ff_env = dataclasses.replace(env, bundle=bundle)
    config = mode_config("fedavg", lr=1.0, momentum=0.0)
    rng = np.random.default_rng(7)
    datasets = [ArrayDataset({"x": rng.standard_normal((48, 8)).astype(np.float32),
                              "labels": rng.integers(0, 3, 48).astype(np.int64)}) for _ in DEVICES]
    ff_config = FFTrainConfig(lr=1e-2, batch_size=16)
    server = start(ff_env, config)
    ch = channel(ff_env, server.port)
    try:
        run_devices(ff_env, server, datasets, ff_train=ff_config)
        wait_for(lambda: server.servicer.coordinator.status().model_version == 1)
        _, tensors = server_trainables(ch)
    finally:
        ch.close()
        server.stop()
    # what each device computes: closed-form FF from the initial weights, seeded by its task
    reference = Coordinator(config, bundle)
    for d in DEVICES:
        reference.join(d, DeviceProfile())
    specs = bundle.manifest.trainables
    trained = []
    for d, data in zip(DEVICES, datasets, strict=True):
        task = reference.task_for(d)
        assert task is not None
        cfg = dataclasses.replace(ff_config, seed=task.data_seed & 0xFFFFFFFF)
        out = train_ff(bundle, data.arrays["x"], data.arrays["labels"], cfg, trainables=bundle.load_trainables())
        trained.append(flatten(out.trainables, specs))
    got = flatten(tensors, specs)
    np.testing.assert_allclose(got, (trained[0] + trained[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, flatten(bundle.load_trainables(), specs))
