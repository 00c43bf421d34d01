"""``dense``: FwdLLM's upload of a full forward-gradient estimate ``mean_k d_k z_k``.

Each device uploads one flat float32 vector; vectors are summed as they arrive (O(n) memory,
never stored per device), so float rounding follows arrival order. The update is their mean.
"""

from __future__ import annotations

import numpy as np

from fwdfleet.aggregator.modes._base import ServerMode
from fwdfleet.aggregator.rounds import RoundState
from fwdfleet.bundle import BundleManifest
from fwdfleet.task import Upload


class DenseMode(ServerMode):
    name = "dense"
    carries = "vector"
    vector_name = "gradient"

    def check_bundle(self, manifest: BundleManifest) -> None:
        self._need_loss_graph(manifest, every_trainable=True)

    def accept(self, rnd: RoundState, device_id: str, device_index: int, upload: Upload) -> None:
        assert upload.vector is not None  # validate() refused a missing vector
        v = upload.vector.astype(np.float32, copy=False)
        rnd.acc.total += v
        rnd.acc.add_unit(1, float(np.einsum("i,i->", v, v, dtype=np.float64)))


MODE = DenseMode()
