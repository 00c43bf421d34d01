"""The scalar round's step rule (probe budget, FZOO normalisation) and pacing's halves statistic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _aggregator_helpers import flat_params, join_all, make_devices, play_round, tiny_bundle

from fwdfleet.aggregator.config import (
    AggregatorConfig,
    OptimizerConfig,
    PacingConfig,
    PerturbationConfig,
    RoundsConfig,
    StepConfig,
    config_from_dict,
)
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.reconstruct import Accumulator, Contribution, accumulate
from fwdfleet.aggregator.step_rule import RoundStatistics, StepRule, budget_factor, halves_ratio
from fwdfleet.errors import ConfigError
from fwdfleet.perturbation import perturbation

SEED = 1234


def _linear_round(c: np.ndarray, devices: int, k: int) -> list[Contribution]:
    """Exact directional derivatives of the linear loss ``c . w``: ``d_k = c . z_k``."""
    out = []
    for dev in range(1, devices + 1):
        ds = tuple(float(c @ perturbation(SEED, dev, j, c.size, "rademacher")) for j in range(k))
        out.append(Contribution(dev, tuple(range(k)), ds))
    return out


def _reconstructed(contribs: list[Contribution], n: int, halves: bool = False,
                   cfg: AggregatorConfig | None = None) -> tuple[Accumulator, RoundStatistics]:
    acc = Accumulator(n)
    accumulate(acc, contribs, round_seed=SEED)
    stats = RoundStatistics(n, halves=halves)
    stats.observe(contribs, cfg or AggregatorConfig(), SEED)
    return acc, stats


def test_budget_factor_grows_with_probes_and_shrinks_with_dimension() -> None:
    assert budget_factor(160, 25_450) == pytest.approx(160 / 25_610)
    assert budget_factor(160, 1000) / budget_factor(8, 1000) == pytest.approx(160 * 1008 / (8 * 1160))
    assert budget_factor(0, 10) == 0.0
    assert budget_factor(10**9, 10) == pytest.approx(1.0, abs=1e-7)
    with pytest.raises(ValueError):
        budget_factor(4, 0)


def test_normalised_step_has_unit_length_along_the_gradient_whatever_the_loss_scale() -> None:
    n, rng = 512, np.random.default_rng(0)
    c = rng.standard_normal(n)
    rule = StepRule(AggregatorConfig(step=StepConfig(normalize="std")), n)
    along = []
    for scale in (1e-3, 1.0, 1e3):
        acc, stats = _reconstructed(_linear_round(scale * c, devices=8, k=8), n)
        assert stats.d_std() == pytest.approx(scale * np.linalg.norm(c), rel=0.15)  # std(c . z) = |c|
        step = rule.scale(acc.mean(), acc.pairs, stats)
        along.append(float(step.direction @ c) / np.linalg.norm(c))
    # E[g] = c, so the normalised direction's component along c/|c| is about 1, for every scale
    assert along == pytest.approx([along[1]] * 3, rel=1e-4)
    assert along[1] == pytest.approx(1.0, rel=0.25)
    # without normalisation it scales with the loss
    plain = StepRule(AggregatorConfig(), n)
    acc, stats = _reconstructed(_linear_round(1e3 * c, devices=8, k=8), n)
    assert not plain.active
    assert float(plain.scale(acc.mean(), acc.pairs, stats).direction @ c) / np.linalg.norm(c) > 100


def test_budget_scaling_multiplies_by_probes_over_probes_plus_dimension() -> None:
    n = 256
    c = np.random.default_rng(1).standard_normal(n)
    rule = StepRule(AggregatorConfig(step=StepConfig(probe_scaling="budget", effective_dim=100)), n)
    acc, stats = _reconstructed(_linear_round(c, devices=4, k=5), n)
    step = rule.scale(acc.mean(), acc.pairs, stats)
    assert step.factor == pytest.approx(20 / 120)
    np.testing.assert_allclose(step.direction, acc.mean() * np.float32(20 / 120), rtol=1e-6)
    assert StepRule(AggregatorConfig(step=StepConfig(probe_scaling="budget")), n).effective_dim == n


def test_normalised_step_is_skipped_without_a_measurable_spread() -> None:
    n = 64
    acc, stats = _reconstructed([Contribution(1, (0,), (2.0,))], n)
    step = StepRule(AggregatorConfig(step=StepConfig(normalize="std")), n).scale(acc.mean(), acc.pairs, stats)
    assert step.factor == 0.0 and not step.direction.any() and "skipped_step" in step.info


def test_halves_ratio_falls_with_probes_where_the_spread_ratio_stays_near_one() -> None:
    n = 512
    c = np.random.default_rng(2).standard_normal(n)
    halves, spread = {}, {}
    for k in (16, 256):
        contribs = _linear_round(c, devices=8, k=k)
        acc, stats = _reconstructed(contribs, n, halves=True)
        halves[k] = stats.halves_ratio(acc)
        spread[k] = acc.noise().ratio
    # expected squared relative error of the mean with P Rademacher probes: (n - 1) / P; the
    # halves' inner product has a relative spread of about 2 sqrt(n) / P (0.35 at P = 128)
    assert halves[256] == pytest.approx((n - 1) / (8 * 256), rel=0.3)
    assert halves[16] == pytest.approx((n - 1) / (8 * 16), rel=0.7)
    assert halves[16] / halves[256] > 6  # 16x the probes: about 16x less noise
    assert 0.5 < spread[16] < 1.5  # the older statistic sits near 1 while P << n
    assert halves[16] / halves[256] > 3 * spread[16] / spread[256]  # and moves far less with P


def test_halves_ratio_edge_cases() -> None:
    t = np.ones(4, dtype=np.float32)
    assert math.isnan(halves_ratio(t, 4, t, 4))  # the odd half is empty
    assert math.isinf(halves_ratio(np.zeros(4, np.float32), 4, t, 2))  # halves point opposite ways
    assert halves_ratio(2 * t, 4, t, 2) == 0.0  # identical halves: no noise
    assert math.isnan(RoundStatistics(4, halves=False).halves_ratio(Accumulator(4)))


def test_config_validates_step_and_pacing_statistic() -> None:
    cfg = config_from_dict({"step": {"normalize": "std", "probe_scaling": "budget", "effective_dim": 500}})
    assert cfg.step == StepConfig("std", "budget", 500) and cfg.pacing.statistic == "halves"
    with pytest.raises(ConfigError, match=r"step\.normalize"):
        config_from_dict({"step": {"normalize": "l2"}})
    with pytest.raises(ConfigError, match=r"step\.effective_dim"):
        config_from_dict({"step": {"effective_dim": -1}})
    with pytest.raises(ConfigError, match="mode = 'scalar'"):
        config_from_dict({"mode": "dense", "step": {"normalize": "std"}})
    with pytest.raises(ConfigError, match=r"pacing\.statistic"):
        config_from_dict({"pacing": {"statistic": "ratio"}})


def test_coordinator_applies_the_normalised_budget_step(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    n = bundle.manifest.num_trainable
    devices, _ = make_devices(n, 4)
    metrics = tmp_path / "m.jsonl"
    lr = 0.05
    # 120 probes on 36 trainables: enough for the halves to agree in sign (the logged statistic is finite)
    cfg = AggregatorConfig(rounds=RoundsConfig(min_devices=4), perturbation=PerturbationConfig(k=30, eps=1e-3),
                           optimizer=OptimizerConfig(name="sgd", lr=lr),
                           step=StepConfig(normalize="std", probe_scaling="budget", effective_dim=360),
                           metrics_path=str(metrics))
    coord = Coordinator(cfg, bundle, clock=lambda: 0.0)
    join_all(coord, devices)
    before = flat_params(coord)
    tasks = {d.device_id: coord.task_for(d.device_id) for d in devices}
    results = {d.device_id: d.answer(tasks[d.device_id], before) for d in devices}
    for d in devices:
        coord.submit(d.device_id, results[d.device_id])
    after = flat_params(coord)
    ds = np.array([x for r in results.values() for x in r.derivatives])
    contribs = [Contribution(coord._devices[i].index, r.indices, r.derivatives) for i, r in results.items()]
    g = Accumulator(n)
    accumulate(g, contribs, round_seed=next(iter(tasks.values())).round_seed)  # type: ignore[union-attr]
    expected = before - lr * (120 / (120 + 360)) / ds.std() * g.mean()
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)
    m = json.loads(metrics.read_text().splitlines()[-1])
    assert m["budget_factor"] == pytest.approx(0.25) and m["d_std"] == pytest.approx(ds.std(), rel=1e-9)
    # pacing is off, yet the log carries the halves statistic (and the older spread ratio beside it)
    assert m["noise_ratio"] > 0 and 0 < m["noise_ratio_spread"] < 2


def test_halves_statistic_drives_pacing_in_the_coordinator(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path)
    n = bundle.manifest.num_trainable
    devices, _ = make_devices(n, 6)
    metrics = tmp_path / "m.jsonl"
    cfg = AggregatorConfig(rounds=RoundsConfig(min_devices=6), perturbation=PerturbationConfig(k=1),
                           pacing=PacingConfig(enabled=True, threshold=0.5, max_extra_requests=3, k_max=64),
                           optimizer=OptimizerConfig(lr=1e-3), metrics_path=str(metrics))
    coord = Coordinator(cfg, bundle, clock=lambda: 0.0)
    join_all(coord, devices)
    play_round(coord, devices)
    m = json.loads(metrics.read_text().splitlines()[-1])
    first = m["pacing"][0]
    # 6 probes on 36 trainables: the halves disagree far more than the threshold allows
    assert first["action"] == "request_more" and first["noise_ratio"] > 0.5
    assert m["extra_requests"] >= 1 and m["pairs"] > 6
