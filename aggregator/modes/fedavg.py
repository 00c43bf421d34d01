"""``fedavg``: devices train locally from the current weights and upload them (FedFwd, FedAvg).

The round's task carries the local-training settings (``[local]`` in the aggregator config: the
learning rate of this round from the server-side schedule, local steps or epochs, objective and
local mode), so that any device reproduces an emulated run. Uploaded weights are summed as they
arrive, weighted by the samples each device used, and a claimed count is bounded by what the task
allowed (batch size x local steps) and by the shard size the device declared at join: no device
can weigh more than the examples it could have used. The weights are kept per device until the
round closes (O(n) per upload) and summed in device order, so the result does not depend on the
order of arrival. The server applies its optimizer to the
pseudo-gradient ``w - sum_i s_i w_i / sum_i s_i``, so ``sgd`` with ``lr = 1`` is plain FedAvg.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.modes._base import ServerMode
from fwdfleet.aggregator.rounds import RoundState
from fwdfleet.aggregator.step_rule import RoundStatistics
from fwdfleet.lr_schedule import round_lr
from fwdfleet.modes import Carries
from fwdfleet.task import Upload


class FedAvgMode(ServerMode):
    name = "fedavg"
    carries: ClassVar[Carries] = "vector"  # typed as the base's: the trajectory mode carries scalars
    vector_name = "weights"

    def task_fields(self, config: AggregatorConfig, round_id: int) -> dict[str, Any]:
        loc = config.local
        rounds = config.rounds.num_rounds or max(1, round_id + 1)
        lr = round_lr(loc.lr, round_id, rounds, loc.lr_schedule,  # type: ignore[arg-type]
                                 loc.final_lr_ratio) if loc.lr else 0.0
        return {"lr": lr, "local_steps": loc.steps, "local_epochs": loc.epochs, "objective": loc.objective,
                "local_mode": loc.mode}

    def sample_budget(self, config: AggregatorConfig, fields: dict[str, Any]) -> int | None:
        steps = int(fields.get("local_steps", 0))
        return config.rounds.batch_size * steps if steps else None  # epochs: the declared shard bounds it

    def accept(self, rnd: RoundState, device_id: str, device_index: int, upload: Upload) -> None:
        assert upload.vector is not None  # validate() refused a missing vector
        rnd.kept[device_id] = (device_index, float(max(upload.result.num_samples, 1)),
                               upload.vector.astype(np.float32, copy=False))

    def close(self, rnd: RoundState, config: AggregatorConfig, stats: RoundStatistics) -> None:
        """Sum the kept weights in device-index order: the same float result whatever order the
        uploads arrived in (threads, network), so any transport reproduces an emulated run bit for bit."""
        for _, w, v in sorted(rnd.kept.values(), key=lambda kv: kv[0]):
            rnd.acc.total += np.float32(w) * v
            rnd.fed_weight += w
            rnd.acc.pairs += 1
        rnd.kept.clear()

    def gradient(self, rnd: RoundState, params: np.ndarray) -> np.ndarray:
        mean = rnd.acc.total / np.float32(rnd.fed_weight)
        grad: np.ndarray = params - mean
        return grad


MODE = FedAvgMode()
