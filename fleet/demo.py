"""``fwdfleet demo``: the product's point in under two minutes, on scikit-learn's digits (shipped here).

Exports an MLP classifier to a bundle, starts the aggregator's round logic, emulates 20
devices with their own (Dirichlet non-IID) shards of the digits, trains by perturbed
inference (seeds down, scalars up) and prints what it reached, the bytes each device
uploaded, and the peak memory of a device's training step next to its inference. Needs only
the base install (the MLP is written with ``onnx.helper``, the digits ship in the package).
"""

from __future__ import annotations

from typing import Any

from fwdfleet.fleet.config import FleetConfig, load_fleet_config

DEMO: dict[str, Any] = {
    "fleet": {"devices": 20, "rounds": 60, "eval_every": 5, "out_dir": "runs/demo",
              "profiles": {"flagship-phone": 1.0, "budget-phone": 1.0, "raspberry-pi-4": 1.0}},
    "dataset": {"name": "digits"},
    "partition": {"scheme": "dirichlet", "alpha": 1.0},
    "model": {"export": "mlp", "hidden": [32]},
    "aggregator": {
        "mode": "scalar",
        "rounds": {"fraction": 0.8, "over_selection": 1.25, "min_devices": 5, "min_available": 10, "min_results": 5,
                   "deadline_s": 60.0, "batch_size": 32},
        "perturbation": {"k": 8, "eps": 0.01},
        "optimizer": {"name": "sgd", "lr": 0.5},
    },
}


def demo_config(overrides: list[str] | None = None) -> FleetConfig:
    return load_fleet_config(None, overrides or [], base=DEMO)
