"""``scalar``: seeds down, ``(k, d_k)`` pairs up (BAFFLE / FwdLLM without the dense upload).

Each device uploads K scalars; the pairs are kept per device (O(K) floats) until the request
closes, then rebuilt into ``sum d_k z_k`` in device order (:func:`aggregator.reconstruct.accumulate`,
with robust aggregation if configured). The only mode with pacing: a noisy estimate asks the same
devices for more perturbations before the update is applied.
"""

from __future__ import annotations

from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.modes._base import ServerMode
from fwdfleet.aggregator.reconstruct import Contribution, accumulate
from fwdfleet.aggregator.rounds import RoundState
from fwdfleet.aggregator.step_rule import RoundStatistics
from fwdfleet.bundle import BundleManifest
from fwdfleet.task import Upload


class ScalarMode(ServerMode):
    name = "scalar"
    carries = "scalars"
    paced = True
    per_seed_robust = True
    step_rules = True

    def check_bundle(self, manifest: BundleManifest) -> None:
        self._need_loss_graph(manifest, every_trainable=False)

    def accept(self, rnd: RoundState, device_id: str, device_index: int, upload: Upload) -> None:
        r = upload.result
        rnd.kept[device_id] = Contribution(device_index, r.indices, r.derivatives)

    def close(self, rnd: RoundState, config: AggregatorConfig, stats: RoundStatistics) -> None:
        p = config.perturbation
        contribs = list(rnd.kept.values())
        accumulate(rnd.acc, contribs, round_seed=rnd.seed,
                   distribution=p.distribution,  # type: ignore[arg-type]
                   shared_seeds=p.shared_seeds, robust=config.robust)
        stats.observe(contribs, config, rnd.seed)
        rnd.kept.clear()

MODE = ScalarMode()
