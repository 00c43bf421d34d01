"""Server optimizers and schedules: exact steps, convergence, exact resume from saved state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fwdfleet.aggregator.config import OptimizerConfig
from fwdfleet.aggregator.optim import Optimizer, learning_rate


def test_sgd_step_is_exact() -> None:
    opt = Optimizer(OptimizerConfig(name="sgd", lr=0.5), 3)
    w = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    lr = opt.apply(w, np.array([2.0, 0.0, -4.0], dtype=np.float32))
    assert lr == 0.5 and opt.step == 1
    np.testing.assert_array_equal(w, [0.0, 2.0, 5.0])


def test_momentum_accumulates_velocity() -> None:
    opt = Optimizer(OptimizerConfig(name="momentum", lr=0.1, momentum=0.5), 1)
    w = np.array([0.0], dtype=np.float32)
    opt.apply(w, np.array([1.0], dtype=np.float32))  # v = 1
    opt.apply(w, np.array([1.0], dtype=np.float32))  # v = 1.5
    np.testing.assert_allclose(w, [-(0.1 + 0.15)], rtol=1e-6)


def test_adam_matches_the_reference_formula() -> None:
    cfg = OptimizerConfig(name="adam", lr=0.01, beta1=0.9, beta2=0.99, adam_eps=1e-8)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(5).astype(np.float32)
    ref = w.astype(np.float64)
    m = np.zeros(5)
    v = np.zeros(5)
    opt = Optimizer(cfg, 5)
    for t in range(1, 6):
        g = rng.standard_normal(5)
        opt.apply(w, g.astype(np.float32))
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        ref -= 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,lr", [("sgd", 0.1), ("momentum", 0.05), ("adam", 0.05)])
def test_optimizers_minimise_a_quadratic(name: str, lr: float) -> None:
    h = np.diag(np.linspace(1.0, 3.0, 10))
    w = np.ones(10, dtype=np.float32)
    opt = Optimizer(OptimizerConfig(name=name, lr=lr), 10)
    for _ in range(300):
        opt.apply(w, (h @ w).astype(np.float32))
    assert np.linalg.norm(w) < 1e-2


def test_weight_decay_shrinks_without_gradient() -> None:
    opt = Optimizer(OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.5), 2)
    w = np.array([2.0, -2.0], dtype=np.float32)
    opt.apply(w, np.zeros(2, dtype=np.float32))
    np.testing.assert_allclose(w, [1.9, -1.9], rtol=1e-6)


def test_linear_schedule_warms_up_then_decays() -> None:
    cfg = OptimizerConfig(lr=1.0, schedule="linear", warmup_steps=4, total_steps=14, final_lr_ratio=0.1)
    lrs = [learning_rate(cfg, s) for s in range(20)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(1.0 - 0.9 * 0.5)
    assert lrs[14] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    # total_steps = 0 falls back to the number of rounds.
    cfg2 = OptimizerConfig(lr=1.0, schedule="linear", warmup_steps=0)
    assert learning_rate(cfg2, 5, total_steps=10) == pytest.approx(0.5)
    assert learning_rate(OptimizerConfig(lr=0.3), 1000) == 0.3


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_resume_from_state_arrays_is_bit_identical(name: str) -> None:
    cfg = OptimizerConfig(name=name, lr=0.01, schedule="linear", warmup_steps=2, total_steps=10)
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(50).astype(np.float32) for _ in range(6)]
    w_ref = np.ones(50, dtype=np.float32)
    ref = Optimizer(cfg, 50)
    for g in grads:
        ref.apply(w_ref, g)
    w = np.ones(50, dtype=np.float32)
    first = Optimizer(cfg, 50)
    for g in grads[:3]:
        first.apply(w, g)
    state = {k: np.array(v) for k, v in first.state_arrays().items()}
    second = Optimizer(cfg, 50)
    second.load_state_arrays(state)
    for g in grads[3:]:
        second.apply(w, g)
    assert w.tobytes() == w_ref.tobytes()
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_loading_another_optimizers_state_is_refused() -> None:
    adam = Optimizer(OptimizerConfig(name="adam"), 4)
    sgd = Optimizer(OptimizerConfig(name="sgd"), 4)
    with pytest.raises(ValueError, match="sgd"):
        sgd.load_state_arrays(adam.state_arrays())
    with pytest.raises(ValueError, match="shape"):
        Optimizer(OptimizerConfig(name="adam"), 5).load_state_arrays(adam.state_arrays())
