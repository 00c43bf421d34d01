"""Layer-local Forward-Forward training on the device: closed-form gradients, perturbed inference of the
layer graphs, negatives, prediction, and real learning on scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff import FFLayout, NumpyLayers, OnnxLayers, label_scores
from fwdfleet.device_runtime.ff_objectives import (
    LayerShape,
    layer_forward,
    layer_gradients,
    negative_labels,
    objective_value,
)
from fwdfleet.device_runtime.ff_train import (
    AdamState,
    FFTrainConfig,
    LayerBatch,
    estimate_layer_derivatives,
    evaluate_ff,
    optimizer_update,
    train_ff,
    train_layer_step,
)
from fwdfleet.errors import BundleError, DataError
from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp
from fwdfleet.fleet.datasets import DIGITS_FILE

HEAD_OF = {"hinton": "none", "symmetric": "none", "sff": "class-goodness", "pon": "softmax"}


@pytest.fixture(scope="module")
def digits():
    with np.load(DIGITS_FILE, allow_pickle=False) as d:  # scikit-learn's digits, shipped with fleet
        x = (d["images"] / 16.0).astype(np.float32)
        y = d["labels"].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("ff")
    return {
        heads: load_bundle(export_ff_mlp(FFMLPConfig(layers=(64, 256, 256), num_classes=10, heads=heads), root / heads))
        for heads in ("none", "softmax", "class-goodness")
    }


@pytest.mark.parametrize("objective", ["hinton", "symmetric", "sff", "pon"])
def test_closed_form_gradient_matches_finite_differences_in_float64(objective):
    rng = np.random.default_rng(7)
    shape = LayerShape(d_in=7, d_out=5, num_classes=3, head=HEAD_OF[objective], head_units_per_class=2)
    params = {"weight": rng.normal(size=(5, 7)), "bias": rng.normal(size=5) * 0.3}
    if shape.head != "none":
        width = shape.head_width
        params |= {"head_weight": rng.normal(size=(width, 5)), "head_bias": rng.normal(size=width)}
    x, x_neg = rng.normal(size=(6, 7)), rng.normal(size=(6, 7))
    labels = rng.integers(0, 3, size=6)

    def loss(p):
        pos, neg = layer_forward(p, x, shape), layer_forward(p, x_neg, shape)
        return objective_value(objective, pos=pos, neg=neg, labels=labels, threshold=0.8, alpha=2.0).mean

    pos, neg = layer_forward(params, x, shape), layer_forward(params, x_neg, shape)
    value = objective_value(objective, pos=pos, neg=neg, labels=labels, threshold=0.8, alpha=2.0)
    grads = layer_gradients(params, shape, value, pos, neg)
    assert grads.keys() == params.keys()
    h = 1e-6
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for j in np.ndindex(p.shape):
            up, down = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
            up[name][j] += h
            down[name][j] -= h
            numeric[j] = (loss(up) - loss(down)) / (2 * h)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)
    assert np.abs(grads["weight"]).max() > 1e-3  # the check is not vacuous


def test_negative_labels_are_wrong_and_follow_their_strategy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=500)
    for strategy in ("random", "fixed", "adaptive"):
        scores = rng.normal(size=(500, 10))
        neg = negative_labels(strategy, labels, 10, rng, scores=scores, sample_ids=np.arange(500), seed=3)
        assert np.all(neg != labels) and neg.min() >= 0 and neg.max() < 10
        assert len(np.unique(neg)) == 10
    fixed = [negative_labels("fixed", labels, 10, np.random.default_rng(s), sample_ids=np.arange(500), seed=3)
             for s in (1, 2)]
    np.testing.assert_array_equal(fixed[0], fixed[1])
    scores = rng.normal(size=(500, 10))
    hardest = negative_labels("adaptive", labels, 10, rng, scores=scores, temperature=0.0)
    masked = scores.copy()
    masked[np.arange(500), labels] = -np.inf
    np.testing.assert_array_equal(hardest, masked.argmax(axis=1))
    sharp = np.where(np.arange(10) == 4, 50.0, 0.0)[None].repeat(500, axis=0)  # label 4 dominates the softmax
    sampled = negative_labels("adaptive", labels, 10, rng, scores=sharp, temperature=1.0)
    assert np.all(sampled[labels != 4] == 4)


@pytest.mark.parametrize("heads", ["none", "softmax", "class-goodness"])
def test_numpy_and_onnx_layers_agree_and_match_the_model_graph(tmp_path, heads):
    config = FFMLPConfig(layers=(20, 16, 12), num_classes=5, heads=heads, batch=4, head_units_per_class=2)
    bundle = load_bundle(export_ff_mlp(config, tmp_path / "b"))
    layout, values = FFLayout.from_manifest(bundle.manifest), bundle.load_trainables()
    x = np.random.default_rng(1).random((10, 20), dtype=np.float32)  # 10 rows through a fixed batch of 4
    onnx_layers = OnnxLayers(bundle)
    for predict in ("goodness", "head") if heads != "none" else ("goodness",):
        ref = label_scores(layout, NumpyLayers(layout), values, x, predict=predict)
        np.testing.assert_allclose(label_scores(layout, onnx_layers, values, x, predict=predict), ref, atol=1e-5)
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.graph_path("model")), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"x": x[:4], "labels": np.zeros(4, np.int64), **values})[0]
    np.testing.assert_allclose(label_scores(layout, NumpyLayers(layout), values, x[:4]), logits, atol=1e-5)


@pytest.mark.parametrize("objective", ["hinton", "symmetric", "sff", "pon"])
def test_closed_form_training_learns_digits(bundles, digits, objective):
    xtr, ytr, xte, yte = digits
    bundle = bundles[HEAD_OF[objective]]
    layout = FFLayout.from_manifest(bundle.manifest)
    before = evaluate_ff(layout, bundle.load_trainables(), xte, yte, score_layers="all").accuracy
    result = train_ff(bundle, xtr, ytr, FFTrainConfig(objective=objective, epochs=4, seed=1))
    after = evaluate_ff(layout, result.trainables, xte, yte, score_layers="all")
    assert after.accuracy > 0.75 > before + 0.3, (objective, before, after)
    assert result.metrics["steps"] == 4 * 22
    assert {k: (v.shape, v.dtype) for k, v in result.trainables.items()} == {
        k: (v.shape, v.dtype) for k, v in bundle.load_trainables().items()
    }


@pytest.mark.parametrize("negatives", ["random", "fixed"])
def test_other_negatives_learn_too(bundles, digits, negatives):
    xtr, ytr, xte, yte = digits
    layout = FFLayout.from_manifest(bundles["none"].manifest)
    result = train_ff(bundles["none"], xtr, ytr, FFTrainConfig(negatives=negatives, epochs=3))
    assert evaluate_ff(layout, result.trainables, xte, yte, score_layers="all").accuracy > 0.6


def test_training_is_deterministic_and_saves_back_into_the_bundle(bundles, digits, tmp_path):
    xtr, ytr, _, _ = digits
    config = FFTrainConfig(objective="symmetric", max_steps=5, seed=4)
    a = train_ff(bundles["none"], xtr, ytr, config)
    b = train_ff(bundles["none"], xtr, ytr, config)
    c = train_ff(bundles["none"], xtr, ytr, FFTrainConfig(objective="symmetric", max_steps=5, seed=5))
    for name in a.trainables:
        np.testing.assert_array_equal(a.trainables[name], b.trainables[name])
    assert not np.array_equal(a.trainables["layers.0.weight"], c.trainables["layers.0.weight"])
    saved = bundles["none"].save_as(tmp_path / "trained", a.trainables)
    np.testing.assert_array_equal(saved.load_trainables()["layers.1.bias"], a.trainables["layers.1.bias"])


def test_train_layers_selects_which_layers_change(bundles, digits):
    xtr, ytr, _, _ = digits
    init = bundles["softmax"].load_trainables()
    out = train_ff(bundles["softmax"], xtr, ytr, FFTrainConfig(objective="pon", max_steps=3, train_layers=(1,)))
    np.testing.assert_array_equal(out.trainables["layers.0.weight"], init["layers.0.weight"])
    assert not np.array_equal(out.trainables["layers.1.weight"], init["layers.1.weight"])
    assert set(out.metrics) >= {"loss_layer_1", "steps", "seconds"} and "loss_layer_0" not in out.metrics


def test_perturbed_derivatives_match_the_closed_form_gradient(bundles, digits):
    """d_k from perturbed inference of the layer's ONNX graph ~ <closed-form gradient, z_k>."""
    from fwdfleet.device_runtime.ff_train import layer_specs
    from fwdfleet.perturbation import flatten, perturbation

    xtr, ytr, _, _ = digits
    bundle = bundles["softmax"]
    layout, values = FFLayout.from_manifest(bundle.manifest), bundle.load_trainables()
    config = FFTrainConfig(objective="pon", mode="perturbed", num_perturbations=12, eps=1e-3)
    batch = LayerBatch(layout.embed_neutral(xtr[:64]), ytr[:64])
    pairs, skipped = estimate_layer_derivatives(0, values, batch, config, layout=layout, runner=OnnxLayers(bundle),
                                                round_seed=123)
    assert skipped == () and [k for k, _ in pairs] == list(range(12))
    local = layout.layer_params(0, values)
    pos = layer_forward(local, batch.x, layout.layer_shape(0))
    grads = layer_gradients(local, layout.layer_shape(0), objective_value("pon", pos=pos, labels=batch.labels), pos)
    specs = layer_specs(layout, 0, values)
    g = flatten({layout.param_names(0)[k]: v for k, v in grads.items()}, specs)
    exact = np.array([g @ perturbation(123, 0, k, g.size) for k, _ in pairs])
    measured = np.array([d for _, d in pairs])
    np.testing.assert_allclose(measured, exact, rtol=0.05, atol=0.02 * np.abs(exact).max())


@pytest.mark.parametrize("objective", ["symmetric", "pon"])
def test_perturbed_inference_lowers_the_layer_loss(bundles, digits, objective):
    xtr, ytr, _, _ = digits
    bundle = bundles[HEAD_OF[objective]]
    layout, values = FFLayout.from_manifest(bundle.manifest), bundle.load_trainables()
    runner = OnnxLayers(bundle)
    lr = {"symmetric": 0.5, "pon": 0.01}[objective]  # SGD; a zeroth-order step's noise grows with the layer size
    config = FFTrainConfig(objective=objective, mode="perturbed", optimizer="sgd", lr=lr, num_perturbations=8)
    x, y = xtr[:64], ytr[:64]
    if objective == "pon":
        batch = LayerBatch(layout.embed_neutral(x), y)
    else:
        batch = LayerBatch(layout.embed_labels(x, y), y, layout.embed_labels(x, (y + 3) % 10))
    first = train_layer_step(0, values, batch, config, layout=layout, runner=runner, round_seed=0)
    current, losses = first.trainables, [first.loss]
    for step in range(1, 25):
        res = train_layer_step(0, current, batch, config, layout=layout, runner=runner, round_seed=step)
        current, losses = res.trainables, [*losses, res.loss]
        np.testing.assert_array_equal(res.trainables["layers.1.weight"], values["layers.1.weight"])
    assert losses[-1] < losses[0] - 0.02, losses


def test_bad_input_gets_clear_errors(bundles, digits):
    xtr, ytr, _, _ = digits
    with pytest.raises(BundleError, match="--heads class-goodness"):
        train_ff(bundles["none"], xtr, ytr, FFTrainConfig(objective="sff"))
    with pytest.raises(DataError, match=r"shape \(n, 64\)"):
        train_ff(bundles["none"], xtr[:, :10], ytr, FFTrainConfig())
    with pytest.raises(DataError, match="labels must be in"):
        train_ff(bundles["none"], xtr, ytr + 5, FFTrainConfig())
    with pytest.raises(ValueError, match=r"FFTrainConfig\.lr"):
        FFTrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"FFTrainConfig\.mode"):
        FFTrainConfig(mode="backprop")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_non_finite_batch_never_changes_the_weights(bundles, digits):
    xtr, ytr, _, _ = digits
    layout, values = FFLayout.from_manifest(bundles["none"].manifest), bundles["none"].load_trainables()
    x = layout.embed_labels(xtr[:8], ytr[:8])
    x[0, 20] = np.nan
    res = train_layer_step(0, values, LayerBatch(x, ytr[:8], x.copy()), FFTrainConfig(), layout=layout)
    assert not np.isfinite(res.loss)
    np.testing.assert_array_equal(res.trainables["layers.0.weight"], values["layers.0.weight"])


@pytest.mark.parametrize("grad_dtype", [np.float32, np.float64])
def test_adam_in_place_is_the_textbook_expression_bit_for_bit(grad_dtype):
    """optimizer_update reuses its moment arrays; params, moments and outputs equal the plain expression's."""
    rng = np.random.default_rng(3)
    p0 = {"w": rng.standard_normal((7, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    params, state = dict(p0), AdamState()
    ref_p = dict(p0)
    ref_m = {k: np.zeros(v.shape, np.result_type(v, grad_dtype)) for k, v in p0.items()}
    ref_v = {k: np.zeros_like(m) for k, m in ref_m.items()}
    for t in range(1, 6):
        grads = {k: rng.standard_normal(v.shape).astype(grad_dtype) for k, v in p0.items()}
        given, copies = dict(params), {k: v.copy() for k, v in params.items()}
        params, state = optimizer_update(params, grads, state, 3e-3, "adam")
        for k in p0:
            assert np.array_equal(given[k], copies[k])  # the parameters passed in were not written to
            g = grads[k]
            ref_m[k] = 0.9 * ref_m[k] + (1 - 0.9) * g
            ref_v[k] = 0.999 * ref_v[k] + (1 - 0.999) * g * g
            mhat, vhat = ref_m[k] / (1 - 0.9 ** t), ref_v[k] / (1 - 0.999 ** t)
            ref_p[k] = (ref_p[k] - 3e-3 * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)
            assert params[k].dtype == np.float32 and np.array_equal(params[k], ref_p[k])
            assert np.array_equal(state.m[k], ref_m[k]) and np.array_equal(state.v[k], ref_v[k])
            assert state.t[k] == t
