"""Split bundles: the frozen prefix runs once per example, every probe runs only the suffix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _gguf_fixture import tiny_llama_gguf

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import RawData, dataset_for_bundle
from fwdfleet.device_runtime.estimator import estimate
from fwdfleet.device_runtime.prefix_cache import cache_prefix, split_graphs
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import BundleError, ExportError
from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
from fwdfleet.export.hf import LoraSettings
from fwdfleet.task import RoundTask

TEXTS = ("Oil prices fall as stocks rally", "The team won the final", "A new phone chip is faster",
         "Leaders met to discuss the treaty and the talks went on late into the night", "Rain",
         "Shares of the bank rose after the report")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _export(source: Path, out: Path, **kw: object) -> Bundle:
    cfg = CausalLmExport(source=source, lora=LoraSettings(rank=4, alpha=8), max_length=40, trainable_layers=1, **kw)
    bundle = export_causal_lm(cfg, out).bundle
    rng = np.random.default_rng(5)  # non-zero LoRA B so that the trainables matter
    return bundle.save_as(out.parent / f"{out.name}-moved", {
        t.name: (0.2 * rng.standard_normal(t.shape)).astype(np.float32) for t in bundle.manifest.trainables})


@pytest.mark.parametrize("objective", ["prompted-cls", "lm"])
def test_suffix_on_cached_features_equals_the_whole_model(source: Path, tmp_path: Path, objective: str) -> None:
    kw = {"template": "Topic: {text}\nAnswer:", "label_words": (" the", " a", " to", " of")} \
        if objective == "prompted-cls" else {}
    bundle = _export(source, tmp_path / objective, objective=objective, **kw)
    m = bundle.manifest
    assert split_graphs(bundle) == ("prefix", "suffix", "hidden")
    assert all(".layers.1." in t.name for t in m.trainables)  # LoRA only in the top layer
    assert m.graph("prefix").trainables == () and set(m.graph("suffix").trainables) == {t.name for t in m.trainables}
    raw = RawData(source="t", texts=TEXTS, labels=np.array([0, 1, 3, 2, 1, 0]))
    data = dataset_for_bundle(raw, bundle)
    cache = cache_prefix(bundle, data, batch_size=4)  # batches of different widths, one cache width
    assert len(cache) == len(TEXTS) and cache.arrays["hidden"].shape[2] == 32
    whole, suffix = BundleSession(bundle), BundleSession(bundle, graph="suffix")
    w = bundle.load_trainables()
    idx = np.array([4, 0, 3], dtype=np.int64)
    np.testing.assert_allclose(suffix.run(w, cache.take(idx))["loss"], whole.run(w, data.take(idx))["loss"],
                               rtol=1e-5, atol=1e-5)
    task = RoundTask(round_id=0, model_version=0, round_seed=7, device_index=1, num_perturbations=6)
    a = estimate(suffix, w, cache.take(idx), task)
    b = estimate(whole, w, data.take(idx), task)
    assert a.indices == b.indices
    np.testing.assert_allclose(a.derivatives, b.derivatives, rtol=1e-3, atol=2e-4)
    assert np.abs(np.asarray(a.derivatives)).max() > 1e-3  # the probes see a real signal


def test_split_bundle_errors(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="leaves no frozen prefix"):
        export_causal_lm(CausalLmExport(source=source, trainable_layers=2, max_length=16), tmp_path / "all")
    with pytest.raises(ExportError, match="--method lora"):
        CausalLmExport(source=source, trainable_layers=1, method="bitfit")
    plain = export_causal_lm(CausalLmExport(source=source, lora=LoraSettings(rank=2, alpha=4), max_length=16),
                             tmp_path / "plain").bundle
    assert split_graphs(plain) is None
    with pytest.raises(BundleError, match="not a split bundle"):
        cache_prefix(plain, dataset_for_bundle(RawData(source="t", texts=TEXTS, labels=None), plain))


def test_the_device_worker_trains_a_split_bundle_on_cached_features(source: Path, tmp_path: Path) -> None:
    from fwdfleet.device_runtime.worker import DeviceWorker

    bundle = _export(source, tmp_path / "w", objective="prompted-cls", template="Topic: {text}\nAnswer:",
                     label_words=(" the", " a", " to", " of"))
    data = dataset_for_bundle(RawData(source="t", texts=TEXTS, labels=np.array([0, 1, 3, 2, 1, 0])), bundle)
    worker = DeviceWorker(bundle, BundleSession(bundle))
    assert worker.session.graph.name == "suffix"  # every probe runs the top layer only
    w = bundle.load_trainables()
    worker.set_model(0, w)
    whole = BundleSession(bundle)
    for round_id in range(2):
        task = RoundTask(round_id=round_id, model_version=0, round_seed=11 + round_id, device_index=2,
                         num_perturbations=4, batch_size=3, data_seed=round_id)
        upload = worker.run(task, data)
        expected = estimate(whole, w, data.batch(task.data_seed, task.batch_size), task)  # the whole model, raw text
        np.testing.assert_allclose(upload.result.derivatives, expected.derivatives, rtol=1e-3, atol=2e-4)
    assert len(worker._features) == 1  # the prefix ran once for this data, not once per round
