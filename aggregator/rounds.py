"""One round's state: who was selected, what each was issued, what arrived, the running sums.

The :class:`~aggregator.coordinator.Coordinator` decides *when* things happen (deadlines,
pacing, applying); this module holds *what* a round is and how an accepted upload changes it.
Selection is a pure function of the master seed, the round id and the attempt, so a restarted
server selects the same devices and issues the same seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fwdfleet.aggregator.config import RoundsConfig
from fwdfleet.aggregator.pacing import PacingDecision
from fwdfleet.aggregator.reconstruct import Accumulator, Contribution
from fwdfleet.aggregator.records import derive_seed
from fwdfleet.aggregator.validation import Issued
from fwdfleet.protocol import serde
from fwdfleet.task import DeviceResult

TASK_BYTES = 96  # estimate of one task message on the wire


def select(live_ids: Sequence[str], cfg: RoundsConfig, master_seed: int, round_id: int,
           attempt: int) -> tuple[list[str], int] | None:
    """``(selected device ids, target results)``, or None while too few devices are live."""
    if len(live_ids) < max(cfg.min_devices, cfg.min_available):
        return None
    target = max(cfg.min_devices, math.ceil(cfg.fraction * len(live_ids)))
    count = min(len(live_ids), math.ceil(target * cfg.over_selection))
    order = sorted(live_ids, key=lambda d: derive_seed(master_seed, "select", round_id, attempt, d))
    return order[:count], min(target, count)


@dataclass
class RoundState:
    round_id: int
    attempt: int
    seed: int
    model_version: int
    k: int
    opened_at: float
    deadline: float
    selected: list[str]
    target: int
    acc: Accumulator
    request: int = 0  # 0: the round's task; 1, 2, ...: pacing's extra requests
    extensions: int = 0
    issued: dict[str, Issued] = field(default_factory=dict)  # this request, by device
    answered: dict[str, Contribution | None] = field(default_factory=dict)  # this request's answers
    next_k: dict[str, int] = field(default_factory=dict)  # first unused perturbation index per device
    contributors: dict[str, tuple[int, float]] = field(default_factory=dict)  # device -> (samples, loss)
    fed_weight: float = 0.0
    decisions: list[PacingDecision] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0

    def issue_first(self, candidate_ratio: int, n: int) -> None:
        for dev_id in self.selected:
            self.issued[dev_id] = Issued(self.round_id, self.model_version, 0, 0, self.k, candidate_ratio)
            self.next_k[dev_id] = candidate_ratio * self.k
        self.bytes_down = len(self.selected) * (TASK_BYTES + 4 * n)  # task + current trainables

    def issue_more(self, devices: Sequence[str], extra_k: int, shared_seeds: bool, deadline: float) -> None:
        """Pacing's extra request: fresh indices for each device (the same ones when shared)."""
        self.request += 1
        self.issued, self.answered = {}, {}
        shared_start = max(self.next_k[d] for d in devices)
        for dev_id in devices:
            start = shared_start if shared_seeds else self.next_k[dev_id]
            self.issued[dev_id] = Issued(self.round_id, self.model_version, self.request, start, extra_k, 1)
            self.next_k[dev_id] = start + extra_k
        self.deadline = deadline
        self.bytes_down += len(devices) * TASK_BYTES

    @property
    def complete(self) -> bool:
        """The round's task: once ``target`` answered; an extra request: once all asked answered."""
        return len(self.answered) >= (self.target if self.request == 0 else len(self.issued))

    def accept(self, device_id: str, device_index: int, result: DeviceResult, vector: np.ndarray | None,
               mode: str) -> None:
        """Count a validated upload: scalars are kept (O(K) floats) until the request closes;
        vectors are summed into the accumulator at once (O(n), never stored per device)."""
        request = self.issued[device_id].request
        samples, loss = self.contributors.get(device_id, (0, 0.0))
        if request == 0:  # the loss of the round's model on the device's batch
            samples, loss = result.num_samples, result.loss_mean
        self.contributors[device_id] = (samples, loss)
        self.bytes_up += serde.result_to_proto(result).ByteSize()  # the upload's exact protobuf size
        if vector is None:
            self.answered[device_id] = Contribution(device_index, result.indices, result.derivatives)
            return
        self.answered[device_id] = None
        self.bytes_up += 4 * vector.size
        v = vector.astype(np.float32)
        if mode == "dense":
            self.acc.total += v
            self.acc.add_unit(1, float(np.einsum("i,i->", v, v, dtype=np.float64)))
        else:  # fedavg: sample-weighted sum of weights
            w = float(max(result.num_samples, 1))
            self.acc.total += np.float32(w) * v
            self.fed_weight += w
            self.acc.pairs += 1

    def scalar_contributions(self) -> list[Contribution]:
        return [c for c in self.answered.values() if c is not None]
