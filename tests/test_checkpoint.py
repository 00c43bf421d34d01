"""Durability: atomic checkpoints, and a crash mid-round resumes to bit-identical trainables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _aggregator_helpers import ManualClock, flat_params, join_all, make_devices, play_round, tiny_bundle

from fwdfleet.aggregator.checkpoint import (
    LATEST,
    ROUND_JOURNAL,
    CheckpointError,
    CheckpointState,
    Journal,
    load_checkpoint,
    save_checkpoint,
)
from fwdfleet.aggregator.config import AggregatorConfig, OptimizerConfig, PacingConfig, PerturbationConfig, RoundsConfig
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.task import DeviceResult


def _state(version: int) -> CheckpointState:
    rng = np.random.default_rng(version)
    return CheckpointState(round_id=version + 2, model_version=version,
                           trainables=rng.standard_normal(10).astype(np.float32),
                           optimizer={"m": rng.standard_normal(10).astype(np.float32), "step": np.array(version)},
                           pacing={"k": 4}, meta={"master_seed": 1})


def test_round_trip_is_exact_and_old_files_are_removed(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, _state(1))
    s2 = _state(2)
    save_checkpoint(tmp_path, s2)
    got = load_checkpoint(tmp_path)
    assert got is not None
    assert got.trainables.tobytes() == s2.trainables.tobytes()
    assert got.optimizer["m"].tobytes() == s2.optimizer["m"].tobytes() and int(got.optimizer["step"]) == 2
    assert (got.round_id, got.model_version, dict(got.pacing), dict(got.meta)) == (4, 2, {"k": 4}, {"master_seed": 1})
    assert len(list(tmp_path.glob("ckpt-*.npz"))) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1))
    # A crash while writing the next one leaves a temp file behind; latest.json still points to v1.
    (tmp_path / "ckpt-00000002-r00000004.npz.abc.tmp").write_bytes(b"partial")
    (tmp_path / (LATEST + ".xyz.tmp")).write_text("{")
    got = load_checkpoint(tmp_path)
    assert got is not None and got.model_version == 1


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    npz = save_checkpoint(tmp_path, _state(1))
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path)
    (tmp_path / LATEST).write_text("not json")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


def test_journal_ignores_a_torn_last_line(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl")
    j.append({"a": 1})
    j.append({"a": 2})
    with open(j.path, "a") as f:
        f.write('{"a": 3')  # the process died mid-write
    assert [r["a"] for r in j.records()] == [1, 2]


def _config() -> AggregatorConfig:
    return AggregatorConfig(
        rounds=RoundsConfig(min_devices=5, deadline_s=30),
        perturbation=PerturbationConfig(k=2),
        optimizer=OptimizerConfig(name="adam", lr=0.05, schedule="linear", warmup_steps=2, total_steps=8),
        pacing=PacingConfig(enabled=True, threshold=0.5, max_extra_requests=2, k_min=1, k_max=8),
        master_seed=42,
    )


def _reference(tmp_path: Path, bundle, devices, rounds: int) -> np.ndarray:
    ref = Coordinator(_config(), bundle, checkpoint_dir=tmp_path / "ref", clock=ManualClock())
    join_all(ref, devices)
    while ref.status().model_version < rounds:
        play_round(ref, devices)
    return flat_params(ref)


@pytest.mark.parametrize("lose_journal", [False, True])
def test_crash_mid_round_resumes_to_the_same_trainables(tmp_path: Path, lose_journal: bool) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 5)
    rounds = 6
    want = _reference(tmp_path, bundle, devices, rounds)

    ckdir = tmp_path / "crash"
    first = Coordinator(_config(), bundle, checkpoint_dir=ckdir, clock=ManualClock())
    join_all(first, devices)
    while first.status().model_version < 3:
        play_round(first, devices)
    w = flat_params(first)
    accepted = {}
    for d in devices[:2]:  # round 3 is half done when the server dies
        accepted[d.device_id] = d.answer(first.task_for(d.device_id), w)
        first.submit(d.device_id, accepted[d.device_id])
    assert first.status().results == 2
    del first  # the crash: nothing is flushed beyond what each call already made durable
    if lose_journal:
        (ckdir / ROUND_JOURNAL).unlink()

    second = Coordinator(_config(), bundle, checkpoint_dir=ckdir, clock=ManualClock())
    st = second.status()
    # the journaled round is open again; without the journal the round waits for live devices
    # (restored devices are not live until heard from)
    assert (st.model_version, st.round_id, st.devices_registered, st.state) == \
        (3, 3, 5, "waiting" if lose_journal else "open")
    if lose_journal:  # once the devices are back the round starts over: the same task is issued again
        for d in devices:
            second.heartbeat(d.device_id)
        assert second.status().results == 0 and second.task_for(devices[0].device_id) is not None
    else:  # what was accepted is still there; an identical retry is recognised
        assert st.results == 2 and second.task_for(devices[0].device_id) is None
        assert second.submit(devices[0].device_id, accepted[devices[0].device_id]).duplicate
    assert flat_params(second).tobytes() != want.tobytes()
    while second.status().model_version < rounds:  # devices keep polling: no re-join needed
        play_round(second, devices)
    assert second.status().model_version == rounds
    assert flat_params(second).tobytes() == want.tobytes()
    latest = json.loads((ckdir / LATEST).read_text())
    assert (latest["model_version"], latest["round_id"]) == (rounds, rounds)


def test_crash_during_a_pacing_extra_request_resumes_it(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 5)
    want = _reference(tmp_path, bundle, devices, 2)
    ckdir = tmp_path / "crash"
    first = Coordinator(_config(), bundle, checkpoint_dir=ckdir, clock=ManualClock())
    join_all(first, devices)
    play_round(first, devices)
    w = flat_params(first)
    for d in devices:
        first.submit(d.device_id, d.answer(first.task_for(d.device_id), w))
    assert first.status().request >= 1  # pacing asked for more perturbations
    extra = first.task_for(devices[0].device_id)
    first.submit(devices[0].device_id, devices[0].answer(extra, w))
    del first
    second = Coordinator(_config(), bundle, checkpoint_dir=ckdir, clock=ManualClock())
    st = second.status()
    assert st.model_version == 1 and st.request >= 1
    assert second.task_for(devices[0].device_id) is None
    again = second.task_for(devices[1].device_id)  # the same extra request as before the crash
    key = ("round_id", "model_version", "round_seed", "k_start", "num_perturbations")
    assert again is not None and [getattr(again, f) for f in key] == [getattr(extra, f) for f in key]
    while second.status().model_version < 2:
        play_round(second, devices)
    assert flat_params(second).tobytes() == want.tobytes()


def test_resuming_with_another_master_seed_is_refused(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 5)
    coord = Coordinator(_config(), bundle, checkpoint_dir=tmp_path / "ck", clock=ManualClock())
    join_all(coord, devices)
    play_round(coord, devices)
    other = AggregatorConfig(rounds=_config().rounds, optimizer=_config().optimizer, master_seed=1)
    with pytest.raises(CheckpointError, match="master_seed"):
        Coordinator(other, bundle, checkpoint_dir=tmp_path / "ck", clock=ManualClock())


def test_crash_mid_round_keeps_accepted_dense_uploads(tmp_path: Path) -> None:
    """Dense gradients (and FedAvg weights) are journaled like scalars: accepted means kept."""
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 3)
    cfg = AggregatorConfig(mode="dense", rounds=RoundsConfig(min_devices=3, deadline_s=30),
                           optimizer=OptimizerConfig(lr=0.1))

    def upload(coord: Coordinator, d) -> tuple[DeviceResult, np.ndarray]:
        task = coord.task_for(d.device_id)
        w = flat_params(coord)
        return DeviceResult(task.round_id, task.model_version, (), (), 16, d.loss(w)), d.grad(w).astype(np.float32)

    ref = Coordinator(cfg, bundle, checkpoint_dir=tmp_path / "ref", clock=ManualClock())
    join_all(ref, devices)
    for d in devices:
        ref.submit_dense(d.device_id, *upload(ref, d))
    assert ref.status().model_version == 1

    ckdir = tmp_path / "crash"
    first = Coordinator(cfg, bundle, checkpoint_dir=ckdir, clock=ManualClock())
    join_all(first, devices)
    kept = [upload(first, d) for d in devices[:2]]
    for d, (meta, g) in zip(devices[:2], kept):
        first.submit_dense(d.device_id, meta, g)
    del first  # the crash, with two of three uploads accepted

    second = Coordinator(cfg, bundle, checkpoint_dir=ckdir, clock=ManualClock())
    assert second.status().results == 2 and second.task_for(devices[0].device_id) is None
    assert second.submit_dense(devices[0].device_id, *kept[0]).duplicate  # an identical retry
    second.submit_dense(devices[2].device_id, *upload(second, devices[2]))
    assert second.status().model_version == 1
    assert flat_params(second).tobytes() == flat_params(ref).tobytes()
    assert not list((ckdir / "uploads").glob("*.npy"))  # dropped once the checkpoint holds them
