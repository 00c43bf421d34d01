"""`fleet emulate` exports any kind of the export registry from [model] and refuses bad settings first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fwdfleet.bundle import load_bundle
from fwdfleet.errors import ConfigError
from fwdfleet.fleet.config import load_fleet_config
from fwdfleet.fleet.run import run_fleet


def _ff(out: Path, objective: str, mode: str, *extra: str) -> Any:
    return load_fleet_config(None, [
        f'fleet.out_dir="{out}"', "fleet.devices=4", "fleet.rounds=3", "fleet.eval_every=1",
        "fleet.measure_memory=false", 'partition.scheme="iid"', 'model.export="ff-mlp"', "model.hidden=[32, 32]",
        'aggregator.mode="fedavg"', "aggregator.rounds.min_devices=4", "aggregator.rounds.min_results=4",
        "aggregator.rounds.fraction=1.0", "aggregator.optimizer.lr=1.0", "aggregator.local.lr=0.003",
        "aggregator.local.epochs=1", f'aggregator.local.objective="{objective}"', f'aggregator.local.mode="{mode}"',
        "aggregator.rounds.batch_size=32", *extra,
    ])


# learns: three FedAvg rounds lift the test accuracy well above chance (Hinton's goodness and
# perturbed local steps are slower: there the test checks that the run trains and saves its model)
@pytest.mark.parametrize(("objective", "mode", "extra", "learns"), [
    ("symmetric", "closed_form", (), True),
    ("hinton", "closed_form", (), False),
    ("sff", "closed_form", ('model.options.heads="class-goodness"',), True),
    ("pon", "closed_form", ('model.options.heads="softmax"',), True),
    ("symmetric", "perturbed", ("aggregator.perturbation.k=4",), False),
])
def test_fedfwd_runs_from_the_config_alone(tmp_path: Path, objective: str, mode: str, extra: tuple[str, ...],
                                           learns: bool) -> None:
    summary = run_fleet(_ff(tmp_path / "run", objective, mode, *extra), progress=False, log=lambda _m: None)
    assert load_bundle(summary.initial_bundle).manifest.kind == "ff_mlp"
    assert summary.final_bundle is not None and load_bundle(summary.final_bundle).manifest.kind == "ff_mlp"
    assert summary.final_accuracy is not None and summary.initial_accuracy is not None
    initial = load_bundle(summary.initial_bundle).load_trainables()
    final = load_bundle(summary.final_bundle).load_trainables()
    assert any(not np.array_equal(initial[k], final[k]) for k in initial)
    if learns:
        assert summary.final_accuracy > max(0.3, summary.initial_accuracy + 0.1)


def test_an_unknown_kind_or_option_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not an export kind; choose one of"):
        load_fleet_config(None, ['model.export="cnn"'])
    cfg = _ff(tmp_path / "run", "symmetric", "closed_form", 'model.options.head="softmax"')
    with pytest.raises(ConfigError, match=r"'head' \(did you mean 'heads'\?\)"):
        run_fleet(cfg, progress=False, log=lambda _m: None)
    cfg = _ff(tmp_path / "run2", "goodness", "closed_form")
    with pytest.raises(ConfigError, match=r"\[aggregator.local\] for an ff_mlp model: .*objective"):
        run_fleet(cfg, progress=False, log=lambda _m: None)
    assert not (tmp_path / "run2" / "rounds.jsonl").exists()
