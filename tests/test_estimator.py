"""The estimator on real onnxruntime sessions: accuracy, reproducibility, server-side regeneration, NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _tiny_bundles import B, W, make_classifier_bundle, numpy_directional_derivative, numpy_gradient, numpy_loss

from fwdfleet.bundle import TensorSpec
from fwdfleet.device_runtime.estimator import (
    EstimatorWorkspace,
    accumulate_update,
    dense_gradient,
    estimate,
    flat_view,
    load_flat_trainables,
    uplink_bytes,
)
from fwdfleet.device_runtime.sampling import select_indices
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.perturbation import PerturbationSpec, flatten, perturbation, split
from fwdfleet.task import DeviceResult, RoundTask


@pytest.fixture(scope="module")
def softmax(tmp_path_factory: pytest.TempPathFactory):
    bundle = make_classifier_bundle(tmp_path_factory.mktemp("sm"), in_dim=12, num_classes=4, seed=3)
    session = BundleSession(bundle, SessionOptions(intra_op_threads=1))
    rng = np.random.default_rng(0)
    trainables = {
        k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.3 for k, v in bundle.load_trainables().items()
    }
    batch = {"x": rng.standard_normal((32, 12)).astype(np.float32), "labels": rng.integers(0, 4, 32).astype(np.int64)}
    return bundle, session, trainables, batch


def _task(**kw) -> RoundTask:
    base = {"round_id": 3, "model_version": 2, "round_seed": 0xC0FFEE, "device_index": 7, "num_perturbations": 6}
    return RoundTask(**{**base, **kw})


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_central_difference_matches_the_analytic_directional_derivative(softmax, distribution) -> None:
    bundle, session, trainables, batch = softmax
    task = _task(eps=1e-2, distribution=distribution)
    result = estimate(session, trainables, batch, task)
    assert result.indices == tuple(range(6)) and not result.skipped
    spec = PerturbationSpec(task.round_seed, task.device_index, bundle.manifest.num_trainable, distribution)
    for k, d in zip(result.indices, result.derivatives, strict=True):
        z = split(spec.z(k), bundle.manifest.trainables)
        exact = numpy_directional_derivative(trainables, z, batch["x"], batch["labels"])
        # float32 losses (~1e-7 relative) over 2 eps = 2e-2, plus O(eps^2) truncation: 1e-3 absolute is generous
        assert abs(d - exact) <= 1e-3 + 1e-3 * abs(exact), (k, d, exact)


def test_forward_difference_takes_k_plus_one_passes_and_is_close(softmax) -> None:
    _, session, trainables, batch = softmax
    central = estimate(session, trainables, batch, _task())
    forward = estimate(session, trainables, batch, _task(difference="forward", eps=1e-3))
    assert central.extras["passes"] == 12 and forward.extras["passes"] == 7
    np.testing.assert_allclose(forward.derivatives, central.derivatives, rtol=0.05, atol=0.02)
    exact_loss = float(numpy_loss(trainables, batch["x"], batch["labels"]).mean())
    assert forward.loss_mean == pytest.approx(exact_loss, rel=1e-5)
    assert central.loss_mean == pytest.approx(exact_loss, rel=1e-3)  # mean of L(w +- eps z): O(eps^2) off
    assert central.loss_std > 0 and central.num_samples == 32


def test_estimate_is_reproducible_and_the_server_regenerates_the_update(softmax) -> None:
    bundle, session, trainables, batch = softmax
    task = _task(num_perturbations=8)
    ws = EstimatorWorkspace(session.trainable_specs)
    a = estimate(session, trainables, batch, task, workspace=ws)
    b = estimate(session, trainables, batch, task, workspace=ws)
    assert a.indices == b.indices and a.derivatives == b.derivatives
    other = estimate(session, trainables, batch, _task(num_perturbations=8, round_seed=task.round_seed + 1))
    assert other.derivatives != a.derivatives

    # "server side": only (seed, device, k, d_k) and the manifest; z regenerated independently
    n = bundle.manifest.num_trainable
    spec = PerturbationSpec(task.round_seed, task.device_index, n)
    g = np.zeros(n, dtype=np.float64)
    for k, d in zip(a.indices, a.derivatives, strict=True):
        g += d * spec.z(k).astype(np.float64)
    g /= len(a.indices)
    np.testing.assert_allclose(dense_gradient(a, task, n), g, rtol=1e-5, atol=1e-6)
    # the estimate is unbiased-ish: it correlates with the true gradient
    true = np.concatenate([
        np.asarray(v).reshape(-1)
        for v in _numpy_gradient(trainables, batch).values()
    ])  # fmt: skip
    assert float(np.dot(g, true)) > 0


def _numpy_gradient(trainables, batch) -> dict[str, np.ndarray]:
    return numpy_gradient(trainables, batch["x"], batch["labels"])


def test_trainables_are_not_modified(softmax) -> None:
    _, session, trainables, batch = softmax
    before = {k: v.copy() for k, v in trainables.items()}
    estimate(session, trainables, batch, _task())
    for k in before:
        np.testing.assert_array_equal(trainables[k], before[k])


def test_nan_losses_are_skipped_and_reported(softmax) -> None:
    _, session, trainables, batch = softmax
    bad = {"x": batch["x"].copy(), "labels": batch["labels"]}
    bad["x"][0, 0] = np.inf  # inf * w of both signs -> NaN logits -> NaN loss on every pass
    result = estimate(session, trainables, bad, _task())
    assert result.indices == () and result.derivatives == ()
    assert result.skipped == tuple(range(6))
    assert math.isfinite(result.loss_mean) and result.extras["finite_loss"] == 0.0


def test_only_non_finite_perturbations_are_skipped(softmax) -> None:
    session = softmax[1]
    # logits = 1e38 * 0.5 * (sum of 12 random signs) overflow float32 (3.4e38) only when |sum| >= 7
    x = np.full((4, 12), 1e38, dtype=np.float32)
    t = {W: np.zeros((4, 12), np.float32), B: np.zeros(4, np.float32)}
    result = estimate(session, t, {"x": x, "labels": np.zeros(4, np.int64)}, _task(num_perturbations=16, eps=0.5))
    assert set(result.skipped) | set(result.indices) == set(range(16))
    assert result.skipped and result.indices  # a mix: only the overflowing ones are dropped
    assert all(math.isfinite(d) for d in result.derivatives)


def test_discriminative_sampling_inside_estimate(softmax) -> None:
    bundle, session, trainables, batch = softmax
    n = bundle.manifest.num_trainable
    guide = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    task = _task(num_perturbations=4, candidate_ratio=5)
    result = estimate(session, trainables, batch, task, guide)
    assert result.indices == select_indices(task, n, guide)
    assert len(result.indices) == 4 and set(result.indices) <= set(task.candidate_indices)


def test_uplink_is_under_one_kilobyte_at_k64(softmax) -> None:
    _, session, trainables, batch = softmax
    result = estimate(session, trainables, batch, _task(num_perturbations=64))
    assert len(result.indices) == 64
    assert uplink_bytes(result) < 1024


# ------------------------------------------------------------------ memory: chunks and no copies


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("chunk", [5, 64, 10_000])
def test_chunked_perturbed_point_and_update_match_whole_vectors_bit_for_bit(distribution, chunk) -> None:
    specs = (TensorSpec("a", (13, 7)), TensorSpec("b", (300,)))
    n = 13 * 7 + 300
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal(n).astype(np.float32)
    ws = EstimatorWorkspace(specs, chunk=chunk)
    ws.load(split(w0, specs))
    z = perturbation(77, 3, 5, n, distribution)
    for scale in (1e-2, -1e-2):  # each formed afresh from w0 (no +point of the same k before it)
        ws.load(split(w0, specs))
        ws.perturb(77, 3, 5, distribution, scale)
        expected = z * np.float32(scale)
        expected += w0
        np.testing.assert_array_equal(ws.wp.view(np.uint32), expected.view(np.uint32))
    task = _task(round_seed=77, device_index=3, distribution=distribution)
    result = DeviceResult(round_id=3, model_version=2, indices=(1, 4, 9), derivatives=(0.5, -2.25, 1e-3),
                          num_samples=1, loss_mean=0.0, loss_std=0.0)  # fmt: skip
    got = w0.copy()
    accumulate_update(result, task, n, scale=-0.1, out=got, buffer=np.empty(chunk, np.float32))
    want = w0.copy()
    for k, d in zip(result.indices, result.derivatives, strict=True):  # the whole-vector formula
        zk = perturbation(77, 3, k, n, distribution)
        zk *= np.float32(-0.1 * d)
        want += zk
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _small_workspace() -> tuple[EstimatorWorkspace, np.ndarray, tuple[TensorSpec, ...]]:
    """A 1,230-value workspace (chunks of 64) loaded with weights spanning 1e-4..10, some below eps."""
    specs = (TensorSpec("a", (40, 30)), TensorSpec("b", (30,)))
    n = 40 * 30 + 30
    w0 = (np.random.default_rng(5).standard_normal(n) * np.logspace(-4, 1, n)).astype(np.float32)
    ws = EstimatorWorkspace(specs, chunk=64)
    ws.load(split(w0, specs))
    return ws, w0, specs


def test_rademacher_points_are_exactly_the_formula_and_reuse_the_signs(monkeypatch) -> None:
    import fwdfleet.device_runtime.estimator as estimator_module

    ws, w0, _ = _small_workspace()
    n = w0.size
    generated = []
    real = estimator_module.rademacher_words

    def counted(round_seed: int, device: int, k: int, *args, **kwargs):
        generated.append((round_seed, device, k))
        return real(round_seed, device, k, *args, **kwargs)

    monkeypatch.setattr(estimator_module, "rademacher_words", counted)
    for k, scale in ((5, 1e-3), (5, -1e-3), (6, -1e-3), (6, 1e-3), (5, 2e-3)):
        ws.perturb(77, 3, k, "rademacher", scale)
        want = w0 + perturbation(77, 3, k, n, "rademacher") * np.float32(scale)
        np.testing.assert_array_equal(ws.wp.view(np.uint32), want.view(np.uint32))
    assert generated == [(77, 3, 5), (77, 3, 6), (77, 3, 5)]  # once per pair: the -eps point reuses the signs


def test_gaussian_minus_point_right_after_the_plus_point_is_its_reflection_about_w() -> None:
    distribution = "gaussian"
    ws, w0, specs = _small_workspace()
    n = w0.size
    ws.perturb(77, 3, 5, distribution, 1e-3)
    plus = ws.wp.copy()
    ws.perturb(77, 3, 5, distribution, -1e-3)
    reflected = w0 - (plus - w0)
    np.testing.assert_array_equal(ws.wp.view(np.uint32), reflected.view(np.uint32))
    formula = w0 + perturbation(77, 3, 5, n, distribution) * np.float32(-1e-3)
    # float32 rounding, in absolute terms: at most two ulps of |w0| + |eps| (near w0 = eps z the
    # point is close to 0 and its own ulp far smaller)
    bound = 2 * np.spacing(np.abs(w0) + np.float32(1e-3))
    assert np.all(np.abs(ws.wp.astype(np.float64) - formula) <= bound)
    assert np.mean(ws.wp == formula) > 0.5  # and mostly bit for bit
    assert not np.array_equal(ws.wp, w0)
    ws.perturb(77, 3, 5, distribution, 1e-3)  # the +point again: formed afresh, not reflected back
    np.testing.assert_array_equal(ws.wp, plus)
    # any other point is formed from w0 afresh: a different k, or after load()
    ws.perturb(77, 3, 6, distribution, -1e-3)
    np.testing.assert_array_equal(ws.wp, w0 + perturbation(77, 3, 6, n, distribution) * np.float32(-1e-3))
    ws.perturb(77, 3, 6, distribution, 1e-3)  # reflection of k=6's -point
    ws.load(split(w0, specs))
    ws.perturb(77, 3, 6, distribution, -1e-3)
    np.testing.assert_array_equal(ws.wp, w0 + perturbation(77, 3, 6, n, distribution) * np.float32(-1e-3))


def test_workspace_reads_a_flat_vector_in_place_and_copies_anything_else(softmax) -> None:
    bundle, session, trainables, batch = softmax
    specs = session.trainable_specs
    w = flatten(trainables, specs)
    ws = EstimatorWorkspace(specs)
    ws.load(split(w, specs))
    assert not ws.copies_trainables and np.shares_memory(ws.w0, w)
    ws.load(trainables)  # separate arrays: copied once
    assert ws.copies_trainables and not np.shares_memory(ws.w0, w)
    np.testing.assert_array_equal(ws.w0, w)
    assert flat_view(split(w, specs[::-1]), specs) is None  # views out of canonical order
    np.testing.assert_array_equal(load_flat_trainables(bundle, specs), flatten(bundle.load_trainables(), specs))
    # same estimate whether w is read in place or copied
    task = _task(num_perturbations=3)
    a = estimate(session, split(w, specs), batch, task, workspace=ws)
    b = estimate(session, trainables, batch, task, workspace=ws)
    assert a.derivatives == b.derivatives
