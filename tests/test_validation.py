"""Every validation rule, each rejected with its code, through the coordinator's real path."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from _aggregator_helpers import ManualClock, flat_params, join_all, make_devices, tiny_bundle

from fwdfleet.aggregator.config import AggregatorConfig, PerturbationConfig, RoundsConfig, ValidationConfig
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.aggregator.validation import Issued, build_result, check_vector, fingerprint
from fwdfleet.task import DeviceResult


@pytest.fixture
def setup(tmp_path: Path):
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 3)
    cfg = AggregatorConfig(
        rounds=RoundsConfig(min_devices=2, min_available=3, fraction=0.5),  # target 2, 2 of 3 selected
        perturbation=PerturbationConfig(k=4, candidate_ratio=3),
        validation=ValidationConfig(max_abs_derivative=100.0),
    )
    coord = Coordinator(cfg, bundle, clock=ManualClock())
    join_all(coord, devices)
    tasks = {d.device_id: coord.task_for(d.device_id) for d in devices}
    chosen = [d for d in devices if tasks[d.device_id] is not None]
    outsider = next(d for d in devices if tasks[d.device_id] is None)
    return coord, chosen, outsider, tasks


def _reject(coord, device_id, result, code):
    before = coord.status().results
    with pytest.raises(RejectedError) as e:
        coord.submit(device_id, result)
    assert e.value.code is code, e.value
    assert e.value.message and e.value.code.grpc_status
    assert coord.status().results == before  # nothing of it was counted


def test_valid_upload_from_the_candidate_pool_is_accepted(setup) -> None:
    coord, chosen, _, tasks = setup
    d = chosen[0]
    task = tasks[d.device_id]
    assert list(task.candidate_indices) == list(range(12))
    result = d.answer(task, flat_params(coord), keep_last=True)  # indices 8..11 of the pool
    receipt = coord.submit(d.device_id, result)
    assert receipt.accepted and not receipt.duplicate and coord.status().results == 1


def test_unknown_device(setup) -> None:
    coord, chosen, _, tasks = setup
    result = chosen[0].answer(tasks[chosen[0].device_id], flat_params(coord))
    _reject(coord, "intruder", result, RejectCode.UNKNOWN_DEVICE)


def test_stale_round_and_model_version(setup) -> None:
    coord, chosen, _, tasks = setup
    d = chosen[0]
    good = d.answer(tasks[d.device_id], flat_params(coord))
    _reject(coord, d.device_id, dataclasses.replace(good, round_id=good.round_id + 1), RejectCode.STALE_ROUND)
    _reject(coord, d.device_id, dataclasses.replace(good, model_version=3), RejectCode.STALE_ROUND)


def test_not_selected(setup) -> None:
    coord, chosen, outsider, tasks = setup
    forged = outsider.answer(tasks[chosen[0].device_id], flat_params(coord))
    _reject(coord, outsider.device_id, forged, RejectCode.NOT_SELECTED)


def test_bad_index_outside_the_pool_and_too_many_indices(setup) -> None:
    coord, chosen, _, tasks = setup
    d = chosen[0]
    good = d.answer(tasks[d.device_id], flat_params(coord))
    _reject(coord, d.device_id, dataclasses.replace(good, indices=(0, 1, 2, 12)), RejectCode.BAD_INDEX)
    _reject(coord, d.device_id, dataclasses.replace(good, indices=(0, 1, 2, 3, 4), derivatives=(0.1,) * 5),
            RejectCode.BAD_INDEX)


def test_too_large(setup) -> None:
    coord, chosen, _, tasks = setup
    d = chosen[0]
    good = d.answer(tasks[d.device_id], flat_params(coord))
    _reject(coord, d.device_id, dataclasses.replace(good, derivatives=(0.0, 0.0, 0.0, 101.0)), RejectCode.TOO_LARGE)


def test_malformed_empty_result(setup) -> None:
    coord, chosen, _, tasks = setup
    d = chosen[0]
    t = tasks[d.device_id]
    empty = DeviceResult(t.round_id, t.model_version, (), (), 16, 1.0, skipped=(0, 1, 2, 3))
    _reject(coord, d.device_id, empty, RejectCode.MALFORMED)
    with pytest.raises(RejectedError) as e:
        coord.submit_dense(d.device_id, empty, np.zeros(3, dtype=np.float32))
    assert e.value.code is RejectCode.MALFORMED  # wrong mode


def test_identical_retry_is_idempotent_and_a_different_second_upload_is_refused(setup) -> None:
    coord, chosen, _, tasks = setup
    d = chosen[0]
    first = d.answer(tasks[d.device_id], flat_params(coord))
    receipt = coord.submit(d.device_id, first)
    assert receipt.accepted and not receipt.duplicate and receipt.round_id == 0
    retry = coord.submit(d.device_id, dataclasses.replace(first, compute_seconds=9.0))
    assert retry.accepted and retry.duplicate
    assert coord.status().results == 1  # counted once
    assert coord.task_for(d.device_id) is None
    other = dataclasses.replace(first, derivatives=tuple(x + 1.0 for x in first.derivatives))
    _reject(coord, d.device_id, other, RejectCode.ALREADY_SUBMITTED)
    # After the round closes, a late retry of the counted upload is still just a duplicate.
    e = chosen[1]
    coord.submit(e.device_id, e.answer(tasks[e.device_id], flat_params(coord)))
    assert coord.status().model_version == 1
    assert coord.submit(d.device_id, first).duplicate


def test_build_result_rejects_raw_wire_fields_with_their_codes() -> None:
    ok = {"round_id": 0, "model_version": 0, "indices": [0, 1], "derivatives": [0.5, -0.5], "num_samples": 8,
          "loss_mean": 1.0}
    assert build_result(**ok).indices == (0, 1)
    cases = [
        ({"derivatives": [math.nan, 0.0]}, RejectCode.NON_FINITE),
        ({"derivatives": [math.inf, 0.0]}, RejectCode.NON_FINITE),
        ({"loss_mean": math.nan}, RejectCode.NON_FINITE),
        ({"indices": [1, 1]}, RejectCode.DUPLICATE_INDEX),
        ({"derivatives": [0.5]}, RejectCode.MALFORMED),
        ({"num_samples": -1}, RejectCode.MALFORMED),
        ({"round_id": -1}, RejectCode.MALFORMED),
    ]
    for change, code in cases:
        with pytest.raises(RejectedError) as e:
            build_result(**{**ok, **change})
        assert e.value.code is code, change


def test_vectors_are_checked_for_size_finiteness_and_magnitude() -> None:
    limits = ValidationConfig(max_abs_value=10.0)
    check_vector(np.ones(5, dtype=np.float32), 5, limits)
    for vec, code in [
        (np.ones(4, dtype=np.float32), RejectCode.MALFORMED),
        (np.ones((5, 1), dtype=np.float32), RejectCode.MALFORMED),
        (np.arange(5), RejectCode.MALFORMED),
        (np.array([0, 0, np.nan, 0, 0], dtype=np.float32), RejectCode.NON_FINITE),
        (np.array([0, 0, 11, 0, 0], dtype=np.float32), RejectCode.TOO_LARGE),
    ]:
        with pytest.raises(RejectedError) as e:
            check_vector(vec, 5, limits)
        assert e.value.code is code


def test_fingerprint_ignores_timing_but_not_values() -> None:
    r = DeviceResult(1, 1, (0, 1), (0.25, 0.5), 8, 1.0, compute_seconds=1.0)
    assert fingerprint(r) == fingerprint(dataclasses.replace(r, compute_seconds=2.0))
    assert fingerprint(r) != fingerprint(dataclasses.replace(r, derivatives=(0.25, 0.5000001)))
    assert fingerprint(r) != fingerprint(r, b"payload")
    assert list(Issued(0, 0, 0, 4, 2, candidate_ratio=3).allowed) == list(range(4, 10))
