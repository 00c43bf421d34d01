"""``trajectory``: S local zeroth-order steps per device, only their S x K scalars up (FedKSeed-style).

A device takes ``S = task.local_steps`` perturbed-inference SGD steps from the round's weights and
uploads the ``(k, d_k)`` pairs of every step; no weights travel. The step counter lives in the
perturbation index, so the one Philox counter layout ``(round_seed, device, k)`` covers it:

    step ``s`` (0-based), probe ``j`` (0..K-1):  ``k = k_start + s * K + j``

(``k_start`` and ``K = num_perturbations`` are the task's; the step's minibatch is drawn with
``derive_seed(task.data_seed, s)``). A step applies ``w -= (lr / K) * sum_j d_j z_j`` with the one
float32 sum of both sides (:func:`fwdfleet.perturbation.sums.add_weighted_perturbations`, method
``"pairs"``, weights ``float64(-lr / K * d)``), so the server replays each trajectory from the
round's starting weights and gets the device's final weights bit for bit.

Validation (on top of the round, finiteness and size checks every mode has): exactly ``S x K``
pairs, in the layout above, no skipped probe (a probe with a non-finite loss makes the trajectory
unreplayable as issued), and a replay that leaves finite weights within ``validation.max_abs_value``.
Everything is refused with a :class:`~fwdfleet.aggregator.errors.RejectedError` before the round
changes (the coordinator counts it in the round's ``rejected`` metrics). Accepted uploads keep
their replayed weights until the round closes and are averaged as in ``fedavg`` (weighted by the
samples used, summed in device order); the server optimizer steps along ``w - mean_i w_i``.

Memory on the server: one weight vector per accepted device until the round closes (as
``fedavg``); uplink ``8 S K`` bytes of pairs plus the fixed result fields.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np

from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.aggregator.modes.fedavg import FedAvgMode
from fwdfleet.aggregator.rounds import RoundState
from fwdfleet.aggregator.validation import Issued, check_result, check_round, check_vector
from fwdfleet.bundle import BundleManifest
from fwdfleet.modes import Carries
from fwdfleet.perturbation import Distribution
from fwdfleet.perturbation.sums import WeightedSeeds, add_weighted_perturbations
from fwdfleet.task import Upload


def replay(start: np.ndarray, indices: tuple[int, ...], derivatives: tuple[float, ...], *, round_seed: int,
           device: int, num_perturbations: int, lr: float, distribution: Distribution,
           out: np.ndarray | None = None) -> np.ndarray:
    """The weights a device ends with after the trajectory ``(indices, derivatives)`` from ``start``:
    consecutive groups of ``num_perturbations`` pairs are the steps, each ``w -= lr/K sum_j d_j z_j``
    with the device's float32 ``"pairs"`` sum. ``out`` (float32, ``start``'s size) receives it."""
    w = np.empty(start.size, dtype=np.float32) if out is None else out
    np.copyto(w, start, casting="unsafe")
    k = num_perturbations
    scale = -lr / k  # the device's sgd_step scale, -lr / len(kept), with every probe kept
    for s in range(0, len(indices), k):
        weights = np.array([scale * d for d in derivatives[s : s + k]], dtype=np.float64)
        add_weighted_perturbations(w, [WeightedSeeds(device, tuple(indices[s : s + k]), weights)],
                                   round_seed=round_seed, distribution=distribution, method="pairs")
    return w


class TrajectoryMode(FedAvgMode):
    name = "trajectory"
    carries: ClassVar[Carries] = "scalars"
    vector_name = "replayed weights"

    def check_config(self, config: AggregatorConfig) -> None:
        super().check_config(config)
        loc = config.local
        if loc.steps < 1:
            raise ValueError("mode 'trajectory' replays a fixed number of local steps: set local.steps >= 1 "
                             "(local.epochs depends on each device's shard size and cannot be replayed)")
        if loc.lr <= 0:
            raise ValueError("mode 'trajectory' replays the devices' steps with the round's learning rate: set "
                             "local.lr > 0 (0 would let each device use its own default)")
        if config.perturbation.candidate_ratio != 1:
            raise ValueError("mode 'trajectory' evaluates every issued probe of every step: set "
                             "perturbation.candidate_ratio = 1")

    def check_bundle(self, manifest: BundleManifest) -> None:
        self._need_loss_graph(manifest, every_trainable=True)

    def validate(self, upload: Upload, issued: Issued, config: AggregatorConfig, n: int, declared: int) -> None:
        r = upload.result
        if upload.vector is not None:
            raise RejectedError(RejectCode.MALFORMED, "mode 'trajectory' takes the steps' (index, derivative) "
                                "pairs (Submit), not a vector")
        check_round(r, issued.round_id, issued.model_version)
        steps, k = int(self.task_fields(config, issued.round_id)["local_steps"]), issued.num_perturbations
        if r.skipped:
            raise RejectedError(RejectCode.NON_FINITE, f"probes {list(r.skipped[:5])} had a non-finite loss; a "
                                f"trajectory needs all {k} probes of each of its {steps} steps: retry the round "
                                "with a lower learning rate (or larger eps)")
        count = len(r.indices)
        if count != steps * k:
            what = (f"{count // k} steps of {k} probes" if count % k == 0 else
                    f"{count} scalars, not a whole number of steps of {k} probes")
            raise RejectedError(RejectCode.MALFORMED, f"the trajectory holds {what}; the task asks for {steps} "
                                f"steps x {k} probes = {steps * k} (index, derivative) pairs")
        expected = range(issued.k_start, issued.k_start + steps * k)
        if tuple(r.indices) != tuple(expected):
            wrong = next(i for i, (a, b) in enumerate(zip(r.indices, expected, strict=True)) if a != b)
            raise RejectedError(RejectCode.BAD_INDEX, f"pair {wrong} has index {r.indices[wrong]} but step "
                                f"{wrong // k}, probe {wrong % k} is index {expected[wrong]} (k_start + step x K "
                                f"+ probe, K={k}); upload the pairs in step order with the issued indices")
        # the checks of every scalar upload (finite, bounded), over the whole trajectory's index range
        check_result(r, replace(issued, num_perturbations=steps * k, candidate_ratio=1), config.validation)
        self._check_samples(upload, issued, config, declared)

    def admit(self, rnd: RoundState, device_id: str, device_index: int, upload: Upload, config: AggregatorConfig,
              start: np.ndarray) -> Upload:
        r, p = upload.result, config.perturbation
        weights = replay(start, r.indices, r.derivatives, round_seed=rnd.seed,
                         device=0 if p.shared_seeds else device_index,
                         num_perturbations=rnd.issued[device_id].num_perturbations,
                         lr=float(self.task_fields(config, rnd.round_id)["lr"]),
                         distribution=p.distribution)  # type: ignore[arg-type]
        if not np.isfinite(weights).all():
            bad = int(np.count_nonzero(~np.isfinite(weights)))
            raise RejectedError(RejectCode.NON_FINITE, f"replaying this trajectory leaves {bad} non-finite "
                                "weights (it diverged); lower local.lr or the device's derivatives")
        check_vector(weights, start.size, config.validation, "the weights replayed from this trajectory")
        return Upload(r, weights)


MODE = TrajectoryMode()
