"""The coordinator end to end, in-process: selection, deadlines, stragglers, modes, convergence."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from _aggregator_helpers import ManualClock, flat_params, join_all, make_devices, play_round, tiny_bundle

from fwdfleet.aggregator.config import AggregatorConfig, OptimizerConfig, PerturbationConfig, RoundsConfig
from fwdfleet.aggregator.coordinator import Coordinator, DeviceProfile
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.perturbation import split
from fwdfleet.task import DeviceResult


def _config(**sections) -> AggregatorConfig:
    return AggregatorConfig(**sections)


def _mean_loss(devices, w) -> float:
    return float(np.mean([d.loss(w) for d in devices]))


@pytest.mark.parametrize("shared,opt", [(False, OptimizerConfig(name="sgd", lr=0.3)),
                                        # Adam moves each value by about lr per round: 0.1 reaches the
                                        # optimum from the bundle's Glorot-uniform start in 60 rounds
                                        (True, OptimizerConfig(name="adam", lr=0.1))])
def test_training_from_directional_derivatives_converges(tmp_path: Path, shared: bool, opt) -> None:
    bundle = tiny_bundle(tmp_path)
    n = bundle.manifest.num_trainable
    devices, w_star = make_devices(n, 8)
    clock = ManualClock()
    cfg = _config(rounds=RoundsConfig(min_devices=8, min_results=8, deadline_s=10),
                  perturbation=PerturbationConfig(k=8, shared_seeds=shared), optimizer=opt)
    coord = Coordinator(cfg, bundle, clock=clock)
    join_all(coord, devices)
    start = _mean_loss(devices, flat_params(coord))
    for r in range(60):
        assert coord.status().state == "open"
        assert play_round(coord, devices) == 8
        assert coord.status().model_version == r + 1
    end = _mean_loss(devices, flat_params(coord))
    assert end < 0.02 * start, (start, end)
    assert np.linalg.norm(flat_params(coord) - w_star) < 0.2 * np.linalg.norm(w_star)


def test_selection_by_fraction_and_over_selection_is_deterministic(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 20)
    cfg = _config(rounds=RoundsConfig(fraction=0.25, min_devices=2, min_available=20, over_selection=1.4),
                  master_seed=7)
    tasks = []
    for _ in range(2):
        coord = Coordinator(cfg, bundle, clock=ManualClock())
        join_all(coord, devices)
        st = coord.status()
        assert (st.target, st.selected) == (5, 7)  # ceil(0.25 * 20) = 5; ceil(5 * 1.4) = 7
        tasks.append({d.device_id: coord.task_for(d.device_id) for d in devices})
    assert tasks[0] == tasks[1]
    chosen = [t for t in tasks[0].values() if t is not None]
    assert len(chosen) == 7 and len({t.device_index for t in chosen}) == 7
    other = Coordinator(dataclasses.replace(cfg, master_seed=8), bundle, clock=ManualClock())
    join_all(other, devices)
    some = next(t for t in (other.task_for(d.device_id) for d in devices) if t is not None)
    assert some.round_seed != chosen[0].round_seed


def test_round_closes_at_target_and_rejects_late_stragglers(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 6)
    cfg = _config(rounds=RoundsConfig(fraction=0.5, min_devices=2, min_available=6, over_selection=2.0))
    coord = Coordinator(cfg, bundle, clock=ManualClock())
    join_all(coord, devices)
    assert (coord.status().target, coord.status().selected) == (3, 6)
    tasks = {d.device_id: coord.task_for(d.device_id) for d in devices}
    w = flat_params(coord)
    for d in devices[:3]:
        coord.submit(d.device_id, d.answer(tasks[d.device_id], w))
    assert coord.status().model_version == 1  # closed as soon as the target arrived
    late = devices[5]
    with pytest.raises(RejectedError) as e:
        coord.submit(late.device_id, late.answer(tasks[late.device_id], w))
    assert e.value.code is RejectCode.STALE_ROUND


def test_deadline_closes_with_what_arrived_and_dropouts_do_not_stall(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 5)
    clock = ManualClock()
    cfg = _config(rounds=RoundsConfig(min_devices=5, min_results=2, deadline_s=30))
    coord = Coordinator(cfg, bundle, clock=clock)
    join_all(coord, devices)
    gone = frozenset(d.device_id for d in devices[2:])
    play_round(coord, devices, skip=gone)
    assert coord.status().model_version == 0 and coord.status().results == 2
    assert [e.kind for e in coord.advance()] == ["round_opened"]
    clock.now += 29
    assert coord.advance() == []
    clock.now += 2
    events = coord.advance()
    applied = [e for e in events if e.kind == "update_applied"]
    assert len(applied) == 1 and applied[0].detail["participants"] == 2
    assert coord.status().model_version == 1


def test_too_few_results_extends_then_restarts_with_a_new_seed(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 3)
    clock = ManualClock()
    cfg = _config(rounds=RoundsConfig(min_devices=3, min_results=2, deadline_s=10, max_extensions=1,
                                      heartbeat_timeout_s=1e6))
    coord = Coordinator(cfg, bundle, clock=clock)
    join_all(coord, devices)
    first_seed = coord.task_for(devices[0].device_id).round_seed
    play_round(coord, devices[:1])
    clock.now += 11
    kinds = [e.kind for e in coord.advance()]
    assert "deadline_extended" in kinds
    clock.now += 11
    kinds = [e.kind for e in coord.advance()]
    assert kinds[:2] == ["round_restarted", "round_opened"]
    st = coord.status()
    assert st.attempt == 1 and st.round_id == 0 and st.model_version == 0 and st.results == 0
    assert coord.task_for(devices[0].device_id).round_seed != first_seed
    play_round(coord, devices)
    assert coord.status().model_version == 1


def test_devices_not_seen_recently_are_not_selected(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 4)
    clock = ManualClock()
    cfg = _config(rounds=RoundsConfig(min_devices=2, min_available=3, heartbeat_timeout_s=60))
    coord = Coordinator(cfg, bundle, clock=clock)
    join_all(coord, devices[:2])
    clock.now += 100  # devices 0 and 1 fall silent
    join_all(coord, devices[2:])
    st = coord.status()
    assert (st.state, st.devices_registered, st.devices_available) == ("waiting", 4, 2)
    coord.heartbeat(devices[0].device_id)  # device 0 is back: three live devices
    assert coord.status().selected == 3
    assert coord.task_for(devices[1].device_id) is None  # seen again now, but not in this round
    assert all(coord.task_for(d.device_id) is not None for d in (devices[0], devices[2], devices[3]))


def test_finishes_after_num_rounds(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 2)
    coord = Coordinator(_config(rounds=RoundsConfig(min_devices=2, num_rounds=3)), bundle, clock=ManualClock())
    join_all(coord, devices)
    for _ in range(5):
        play_round(coord, devices)
    st = coord.status()
    assert st.state == "finished" and st.model_version == 3
    assert coord.task_for(devices[0].device_id) is None
    json.dumps(dataclasses.asdict(st))


def test_unknown_device_cannot_poll(tmp_path: Path) -> None:
    coord = Coordinator(AggregatorConfig(), tiny_bundle(tmp_path), clock=ManualClock())
    with pytest.raises(RejectedError) as e:
        coord.task_for("stranger")
    assert e.value.code is RejectCode.UNKNOWN_DEVICE
    info = coord.join("a", DeviceProfile())
    assert (info.device_index, info.model_version, info.round_id) == (1, 0, 0)
    assert coord.join("a", DeviceProfile()).device_index == 1  # re-join keeps the index


def test_dense_mode_applies_the_mean_gradient(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    n = bundle.manifest.num_trainable
    devices, _ = make_devices(n, 3)
    cfg = _config(mode="dense", rounds=RoundsConfig(min_devices=3), optimizer=OptimizerConfig(lr=0.1))
    coord = Coordinator(cfg, bundle, clock=ManualClock())
    join_all(coord, devices)
    w0 = flat_params(coord)
    grads = []
    for d in devices:
        task = coord.task_for(d.device_id)
        g = d.grad(w0).astype(np.float32)
        grads.append(g)
        meta = DeviceResult(task.round_id, task.model_version, (), (), 16, d.loss(w0))
        with pytest.raises(RejectedError) as e:
            coord.submit(d.device_id, meta)
        assert e.value.code is RejectCode.MALFORMED
        coord.submit_dense(d.device_id, meta, g)
    np.testing.assert_allclose(flat_params(coord), w0 - 0.1 * np.mean(grads, axis=0), rtol=1e-5, atol=1e-6)


def test_fedavg_mode_with_unit_sgd_is_the_weighted_average(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    specs = bundle.manifest.trainables
    n = bundle.manifest.num_trainable
    cfg = _config(mode="fedavg", rounds=RoundsConfig(min_devices=2), optimizer=OptimizerConfig(name="sgd", lr=1.0))
    coord = Coordinator(cfg, bundle, clock=ManualClock())
    for name, shard in (("a", 10), ("b", 30)):
        coord.join(name, DeviceProfile(num_samples=shard))  # the declared shard bounds the weight
    rng = np.random.default_rng(0)
    uploads = {name: (rng.standard_normal(n).astype(np.float32), samples) for name, samples in (("a", 10), ("b", 30))}
    for name, (flat, samples) in uploads.items():
        task = coord.task_for(name)
        meta = DeviceResult(task.round_id, task.model_version, (), (), samples, 1.0)
        coord.submit_weights(name, meta, split(flat.copy(), specs))
    want = (10 * uploads["a"][0] + 30 * uploads["b"][0]) / 40
    np.testing.assert_allclose(flat_params(coord), want, rtol=1e-5, atol=1e-6)


def test_metrics_lines_and_evaluation_callback(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 4)
    metrics = tmp_path / "out" / "metrics.jsonl"
    seen: list[int] = []

    def evaluate(version, trainables):
        seen.append(version)
        assert set(trainables) == {"layers.0.weight", "layers.0.bias"}
        return {"accuracy": 0.5}

    cfg = _config(rounds=RoundsConfig(min_devices=4), perturbation=PerturbationConfig(k=3),
                  metrics_path=str(metrics))
    coord = Coordinator(cfg, bundle, clock=ManualClock(), evaluate=evaluate)
    join_all(coord, devices)
    for _ in range(3):
        play_round(coord, devices)
    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert [m["round_id"] for m in lines] == [0, 1, 2] and seen == [1, 2, 3]
    m = lines[0]
    assert m["participants"] == 4 and m["k"] == 3 and m["pairs"] == 12
    assert m["eval"] == {"accuracy": 0.5}
    assert m["loss_mean"] > 0 and m["spread_sq"] > 0 and m["mean_sqnorm"] > 0  # four devices, four datasets
    # the relative standard error over n_eff = 4 equally weighted devices (3 pairs each)
    # noise_ratio is pacing.statistic's (halves by default); the spread ratio is logged beside it
    assert m["noise_ratio_spread"] == pytest.approx(m["spread_sq"] / (4 * m["mean_sqnorm"]), rel=1e-9)
    assert 4 * 3 * 5 <= m["bytes_up"] <= 4 * 100 and m["bytes_down"] > 0  # exact protobuf sizes of 4 uploads
    assert m["pacing"][0]["action"] == "apply" and m["pacing"][-1]["action"] == "adapt_k"


def test_concurrent_uploads_from_threads_are_each_counted_once(tmp_path: Path) -> None:
    import threading

    bundle = tiny_bundle(tmp_path)
    devices, _ = make_devices(bundle.manifest.num_trainable, 16)
    coord = Coordinator(_config(rounds=RoundsConfig(min_devices=16)), bundle, clock=ManualClock())
    join_all(coord, devices)
    w = flat_params(coord)
    results = {d.device_id: d.answer(coord.task_for(d.device_id), w) for d in devices}
    receipts = []

    def upload(d) -> None:
        for _ in range(2):  # every device retries once
            receipts.append(coord.submit(d.device_id, results[d.device_id]))

    threads = [threading.Thread(target=upload, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert len(receipts) == 32 and sum(not r.duplicate for r in receipts) == 16
    assert coord.status().model_version == 1
