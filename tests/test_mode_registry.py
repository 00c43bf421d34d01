"""Adding an upload mode is one module per side: a signSGD mode (devices upload the sign of their
dense forward gradient, the server steps along the majority vote) written here as two modules,
dropped into the two registries, trains the digits fleet through the unchanged engine."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from _tiny_bundles import make_classifier_bundle

import fwdfleet.aggregator.modes as server_modes
import fwdfleet.device_runtime.modes as device_modes
from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.aggregator.modes import server_mode_names
from fwdfleet.fleet.datasets import DatasetConfig, load_split
from fwdfleet.fleet.emulate import EmulationSettings, emulate
from fwdfleet.fleet.partition import PartitionConfig, partition
from fwdfleet.fleet.profiles import EmulatedProfile
from fwdfleet.modes import mode_names

SERVER_HALF = '''
    """signsgd: one vote per device and coordinate; the update is the mean vote."""
    import numpy as np

    from fwdfleet.aggregator.modes import ServerMode


    class SignMode(ServerMode):
        name = "signsgd"
        carries = "vector"
        vector_name = "sign vector"

        def accept(self, rnd, device_id, device_index, upload):
            rnd.acc.total += np.sign(upload.vector).astype(np.float32)
            rnd.acc.add_unit(1, float(upload.vector.size))


    MODE = SignMode()
'''

DEVICE_HALF = '''
    """signsgd: the sign of the dense forward gradient."""
    from dataclasses import replace

    import numpy as np

    from fwdfleet.device_runtime.estimator import dense_gradient, estimate
    from fwdfleet.task import Upload


    class SignMode:
        name = "signsgd"
        carries = "vector"

        def check(self, worker):
            pass

        def compute(self, worker, task, data):
            batch = data.batch(task.data_seed, task.batch_size)
            result = estimate(worker.session, worker.trainables, batch, task, workspace=worker.workspace)
            g = dense_gradient(result, task, worker.bundle.manifest.num_trainable)
            return Upload(replace(result, indices=(), derivatives=()), np.sign(g).astype(np.float32))


    MODE = SignMode()
'''


@pytest.fixture
def signsgd(tmp_path: Path):
    """The two modules in folders added to the registries' package paths (as if installed there)."""
    added = []
    for pkg, text in ((server_modes, SERVER_HALF), (device_modes, DEVICE_HALF)):
        folder = tmp_path / pkg.__name__.replace(".", "_")
        folder.mkdir()
        (folder / "signsgd.py").write_text(textwrap.dedent(text))
        pkg.__path__.append(str(folder))
        added.append((pkg, str(folder)))
    yield
    for pkg, folder in added:
        pkg.__path__.remove(folder)
        sys.modules.pop(f"{pkg.__name__}.signsgd", None)


def test_a_new_mode_is_one_module_per_side(signsgd, tmp_path):
    assert "signsgd" in server_mode_names() and "signsgd" in mode_names(device_modes.__name__)
    data = load_split(DatasetConfig(name="digits"))
    bundle = make_classifier_bundle(tmp_path / "bundle", in_dim=64, num_classes=10, hidden=16)
    config = config_from_dict({"mode": "signsgd", "rounds": {"min_devices": 4, "batch_size": 32},
                               "perturbation": {"k": 8}, "optimizer": {"name": "sgd", "lr": 0.05}})
    shards = partition(data.train.labels, PartitionConfig("iid", 4, seed=0))
    records = list(emulate(bundle, config, data.train, shards, [EmulatedProfile()] * 4,
                           EmulationSettings(rounds=12, eval_every=12), test=data.test))
    assert [r.model_version for r in records] == list(range(1, 13))
    assert records[-1].accuracy is not None and records[-1].accuracy > 0.4, records[-1].accuracy
    up = records[-1].bytes_up_per_device
    assert up > 4 * bundle.manifest.num_trainable  # a vector went up, through SubmitVector's encoding
