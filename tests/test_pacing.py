"""Variance-controlled pacing: more perturbations when device estimates disagree, none when they agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _aggregator_helpers import ManualClock, flat_params, join_all, make_devices, play_round, tiny_bundle

from fwdfleet.aggregator.config import AggregatorConfig, OptimizerConfig, PacingConfig, PerturbationConfig, RoundsConfig
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.pacing import Pacer
from fwdfleet.aggregator.reconstruct import NoiseStats


def _noise(ratio: float, pairs: int = 40, units: int = 10) -> NoiseStats:
    return NoiseStats(ratio, 1.0, 1.0, float(units), units, pairs)


def test_decisions_table() -> None:
    cfg = PacingConfig(enabled=True, threshold=2.0, max_extra_requests=2, k_min=2, k_max=32)
    p = Pacer(cfg, k=4)
    assert p.decide(0, _noise(1.0), 0).action == "apply"
    assert p.decide(0, _noise(math.nan), 0).action == "apply"
    more = p.decide(0, _noise(6.0), 0)
    assert (more.action, more.extra_k) == ("request_more", 8)  # 4 * (6/2 - 1)
    assert p.decide(0, _noise(math.inf), 0).extra_k == 4
    assert p.decide(0, _noise(6.0), 2).action == "apply"  # out of extra requests
    assert Pacer(PacingConfig(enabled=False), 4).decide(0, _noise(100.0), 0).action == "apply"
    rec = p.decide(3, _noise(math.nan), 0).to_json()
    assert rec["noise_ratio"] is None and json.dumps(rec)


def test_k_adapts_between_rounds_within_bounds() -> None:
    cfg = PacingConfig(enabled=True, threshold=1.0, k_min=2, k_max=16, shrink_below=0.25)
    p = Pacer(cfg, k=4)
    up = p.adapt(0, _noise(0.9, pairs=120), extra_requests=1, devices=10)
    assert up.next_k == 12 and p.k == 12  # 120 pairs over 10 devices
    assert p.adapt(1, _noise(0.9, pairs=400), 1, 10).next_k == 16  # capped at k_max
    assert p.adapt(2, _noise(0.1), 0, 10).next_k == 8
    assert p.adapt(3, _noise(0.5), 0, 10).next_k == 8
    for r in range(4, 8):
        p.adapt(r, _noise(0.0), 0, 10)
    assert p.k == 2  # floor at k_min
    restored = Pacer(cfg, k=4)
    restored.load_state_json(json.loads(json.dumps(p.state_json())))
    assert restored.k == 2


def _coordinator(tmp_path: Path, *, shared: bool, threshold: float, metrics: Path) -> tuple[Coordinator, list]:
    bundle = tiny_bundle(tmp_path)
    n = bundle.manifest.num_trainable
    devices, _ = make_devices(n, 6, shared_optimum=True)
    cfg = AggregatorConfig(
        rounds=RoundsConfig(min_devices=6),
        perturbation=PerturbationConfig(k=2, shared_seeds=shared),
        pacing=PacingConfig(enabled=True, threshold=threshold, max_extra_requests=3, k_min=1, k_max=64),
        optimizer=OptimizerConfig(lr=0.05),
        metrics_path=str(metrics),
    )
    coord = Coordinator(cfg, bundle, clock=ManualClock())
    join_all(coord, devices)
    return coord, devices


def test_disagreeing_devices_get_extra_requests_before_the_update(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    coord, devices = _coordinator(tmp_path, shared=False, threshold=0.3, metrics=metrics)
    w0 = flat_params(coord)
    first = {d.device_id: coord.task_for(d.device_id) for d in devices}
    for d in devices:
        coord.submit(d.device_id, d.answer(first[d.device_id], w0))
    # Per-device perturbations, K = 2 in 27 dimensions: the six estimates disagree wildly.
    events = coord.advance()
    extra = [e for e in events if e.kind == "extra_requested"]
    assert extra and coord.status().model_version == 0 and coord.status().request == 1
    again = coord.task_for(devices[0].device_id)
    assert again.round_id == 0 and again.k_start == 2 and again.num_perturbations == extra[0].detail["extra_k"]
    assert again.round_seed == first[devices[0].device_id].round_seed
    play_round(coord, devices)
    assert coord.status().model_version == 1
    line = json.loads(metrics.read_text().splitlines()[0])
    actions = [d["action"] for d in line["pacing"]]
    assert actions[0] == "request_more" and actions[-2] == "apply" and actions[-1] == "adapt_k"
    assert line["extra_requests"] >= 1 and line["pairs"] > 12 and line["next_k"] > 2


def test_agreeing_devices_apply_at_once_and_k_shrinks(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    coord, devices = _coordinator(tmp_path, shared=True, threshold=0.3, metrics=metrics)
    # Shared seeds and the same gradient on every device: identical estimates.
    w0 = flat_params(coord)
    ref = devices[0]
    for d in devices:
        task = coord.task_for(d.device_id)
        coord.submit(d.device_id, ref.answer(task, w0))
    assert coord.status().model_version == 1
    line = json.loads(metrics.read_text().splitlines()[0])
    assert [d["action"] for d in line["pacing"]] == ["apply", "adapt_k"]
    assert line["noise_ratio"] < 1e-6 and line["extra_requests"] == 0
    assert line["next_k"] == 1


def test_extra_request_deadline_applies_what_arrived(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    coord, devices = _coordinator(tmp_path, shared=False, threshold=0.3, metrics=metrics)
    clock = coord._clock
    w0 = flat_params(coord)
    for d in devices:
        coord.submit(d.device_id, d.answer(coord.task_for(d.device_id), w0))
    assert coord.status().request == 1
    d = devices[0]
    coord.submit(d.device_id, d.answer(coord.task_for(d.device_id), w0))  # only one answers
    clock.now += 61  # the extra request's deadline: still too noisy, so the one who answered is asked again
    extra = {e.detail["request"]: e.detail for e in coord.advance() if e.kind == "extra_requested"}
    assert sorted(extra) == [1, 2] and (extra[1]["devices"], extra[1]["reason"]) == (6, "all results in")
    assert (extra[2]["devices"], extra[2]["reason"]) == (1, "deadline")
    assert coord.status().model_version == 0
    clock.now += 61  # nobody answers the second one: what arrived is applied
    assert "update_applied" in [e.kind for e in coord.advance()]
    assert coord.status().model_version == 1
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["close_reason"] == "deadline" and line["extra_requests"] == 2
    assert line["pairs"] == 6 * 2 + extra[1]["extra_k"]  # the first request's pairs and the one extra answer


@pytest.mark.parametrize("shared", [False, True])
def test_paced_training_still_converges(tmp_path: Path, shared: bool) -> None:
    coord, devices = _coordinator(tmp_path, shared=shared, threshold=1.0, metrics=tmp_path / "m.jsonl")
    start = float(np.mean([d.loss(flat_params(coord)) for d in devices]))
    for _ in range(30):
        play_round(coord, devices)
    end = float(np.mean([d.loss(flat_params(coord)) for d in devices]))
    assert end < 0.3 * start
