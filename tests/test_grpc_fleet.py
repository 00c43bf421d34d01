"""A real-gRPC fleet: the TLS server on 127.0.0.1 and three `fwdfleet device run` processes."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import numpy as np
import pytest

from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.bundle import load_bundle
from fwdfleet.fleet.datasets import DatasetConfig, load_split
from fwdfleet.fleet.emulate import EmulationSettings
from fwdfleet.fleet.grpc_fleet import GrpcFleet, GrpcOptions, emulate_grpc, parse_client_stats
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import preset
from fwdfleet.fleet.report import write_report


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("torch", reason="exporting the MLP bundle needs torch (the export extra)")
    from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp

    return load_bundle(export_mlp(MLPConfig(layer_sizes=(64, 16, 10)), tmp_path_factory.mktemp("mlp") / "bundle"))


@pytest.fixture(scope="module")
def digits():
    return load_split(DatasetConfig(name="digits"))


def aggregator(devices: int) -> object:
    return config_from_dict({"rounds": {"min_devices": devices, "deadline_s": 30.0, "batch_size": 32},
                             "perturbation": {"k": 8}, "optimizer": {"lr": 0.5}})


def test_three_device_processes_learn(bundle, digits, tmp_path):
    shards = partition(digits.train.labels, PartitionConfig("iid", 3, seed=0))
    profiles = [preset("flagship-phone"), preset("budget-phone"), preset("raspberry-pi-4")]
    seen = {}
    records = list(emulate_grpc(bundle, aggregator(3), digits.train, shards, profiles,
                                EmulationSettings(rounds=6, eval_every=1), tmp_path / "run", test=digits.test,
                                options=GrpcOptions(round_timeout_s=30), on_stop=lambda f: seen.update(fleet=f)))

    assert [r.model_version for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r.participants == 3 and r.k == 8 for r in records)
    accs = [r.accuracy for r in records]
    assert all(a is not None for a in accs)
    # chance is 0.1; the same fleet in-process reaches 0.29-0.42 after 6 rounds (master seeds 0-2)
    assert accs[-1] > 0.2, accs
    assert all(0 < r.bytes_up_per_device < 1024 for r in records)
    assert records[1].sim_time_s >= records[0].sim_time_s > 0

    fleet: GrpcFleet = seen["fleet"]
    assert [d.exit_code for d in fleet.devices] == [0, 0, 0]  # stopped cleanly by SIGTERM, not killed
    for device_id, stats in fleet.device_stats.items():
        assert stats is not None, device_id
        assert stats.joins >= 1 and stats.bundle_downloads == 1 and stats.rounds == 6  # every round needs all 3
        assert 0 < stats.uplink_bytes / stats.rounds < 1024  # scalars up, per accepted result
    assert json.loads((tmp_path / "run" / "devices.json").read_text())["device-00001"]["stats"]["rounds"] >= 2

    # one token per device, bound to its id; only hashes on the server's side
    tokens = (tmp_path / "run" / "tokens.txt").read_text()
    for d in fleet.devices:
        token = (d.folder / "token").read_text().strip()
        assert token not in tokens and d.device_id in tokens
        assert (d.folder / "token").stat().st_mode & 0o077 == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) >= 2 and "eval" in json.loads(metrics[0])

    assert fleet.server is not None
    with socket.socket() as s:  # the server is gone
        assert s.connect_ex(("127.0.0.1", fleet.server.port)) != 0
    html = write_report(tmp_path / "report", "grpc fleet", records, {"devices": 3})
    assert html.is_file() and (tmp_path / "report" / "accuracy.png").is_file()


def test_a_failing_device_stops_the_fleet(bundle, digits, tmp_path):
    # Five features per example where the bundle takes 64: the device processes refuse their data.
    bad = replace(digits.train, features=np.ascontiguousarray(digits.train.features[:, :5]))
    shards = partition(digits.train.labels, PartitionConfig("iid", 2, seed=0))
    fleet = GrpcFleet(bundle, aggregator(2), bad, shards, [preset("desktop")] * 2,
                      EmulationSettings(rounds=1), tmp_path / "run", options=GrpcOptions(round_timeout_s=30))
    with pytest.raises(RuntimeError, match=r"device process device-0000\d exited with code 2(.|\n)*features"), fleet:
        list(fleet.rounds())
    assert all(d.process is not None and d.process.poll() is not None for d in fleet.devices)


def test_too_many_devices_for_processes(bundle, digits, tmp_path):
    shards = partition(digits.train.labels, PartitionConfig("iid", 4, seed=0))
    with pytest.raises(ValueError, match="inprocess"):
        GrpcFleet(bundle, aggregator(2), digits.train, shards, [preset("desktop")] * 4, EmulationSettings(rounds=1),
                  tmp_path, options=GrpcOptions(max_devices=3))


def test_parse_client_stats():
    log = "noise\ndevice pi-3: rounds 4, dropped 1, retries 0, joins 1, bundle_downloads 1, trainable_downloads 5, " \
          "uplink_bytes 971\n"
    stats = parse_client_stats(log, "pi-3")
    assert stats is not None and stats.rounds == 4 and stats.dropped == 1 and stats.uplink_bytes == 971
    assert parse_client_stats(log, "pi-4") is None


def test_run_fleet_over_grpc_writes_the_report(bundle, tmp_path):
    from fwdfleet.fleet.config import load_fleet_config
    from fwdfleet.fleet.run import run_fleet

    cfg = load_fleet_config(None, [
        "fleet.transport=grpc", "fleet.devices=3", "fleet.rounds=2", "fleet.eval_every=1",
        "fleet.measure_memory=false", f'fleet.out_dir="{tmp_path}"', f'model.bundle="{bundle.path}"',
        "aggregator.rounds.min_devices=3", "aggregator.rounds.batch_size=32", "aggregator.perturbation.k=8",
    ], base={"partition": {"scheme": "iid"}})
    summary = run_fleet(cfg, progress=False, log=lambda _m: None)
    assert summary.rounds == 2 and summary.final_accuracy is not None
    # aggregator side: the results' protobuf size, 8 float32 derivatives + 8 varint indices + statistics
    per_round = summary.uplink_bytes_per_device_per_round
    assert 8 * 4 < per_round < 8 * (4 + 5) + 64
    # device side, counted by the device processes: the two rounds' requests (result + device id),
    # none past the last round (the coordinator stops after the fleet's rounds)
    assert 2 * per_round < summary.uplink_bytes_per_device_total < 2 * (per_round + 40)
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["model_version"] for x in lines] == [1, 2]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "grpc" / "devices.json").is_file()


def test_fleet_config_transport_and_backend_are_validated():
    from fwdfleet.errors import ConfigError
    from fwdfleet.fleet.config import load_fleet_config

    assert load_fleet_config(None, ["fleet.transport=grpc"]).fleet.transport == "grpc"
    assert load_fleet_config(None, ["fleet.backend=ray"]).fleet.backend == "ray"
    with pytest.raises(ConfigError, match=r"fleet\.transport"):
        load_fleet_config(None, ["fleet.transport=carrier-pigeon"])
    with pytest.raises(ConfigError, match=r"fleet\.backend"):
        load_fleet_config(None, ["fleet.transport=grpc", "fleet.backend=ray"])
