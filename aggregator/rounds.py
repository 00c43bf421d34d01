"""One round's state: who was selected, what each was issued, what arrived, the running sums.

The :class:`~aggregator.coordinator.Coordinator` decides *when* things happen (deadlines,
pacing, applying); this module holds *what* a round is and the bookkeeping every accepted upload
shares (:meth:`RoundState.count`); what an upload adds to the round is its upload mode's
(:mod:`fwdfleet.aggregator.modes`).
Selection is a pure function of the master seed, the round id and the attempt, so a restarted
server selects the same devices and issues the same seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fwdfleet.aggregator.config import RoundsConfig
from fwdfleet.aggregator.pacing import PacingDecision
from fwdfleet.aggregator.reconstruct import Accumulator
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
    answered: set[str] = field(default_factory=set)  # devices that answered this request
    kept: dict[str, Any] = field(default_factory=dict)  # what a mode keeps per device until the request closes
    next_k: dict[str, int] = field(default_factory=dict)  # first unused perturbation index per device
    contributors: dict[str, tuple[int, float]] = field(default_factory=dict)  # device -> (samples, loss)
    fed_weight: float = 0.0
    decisions: list[PacingDecision] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # refused uploads by RejectCode value

    def issue_first(self, candidate_ratio: int, n: int, max_samples: int | None) -> None:
        for dev_id in self.selected:
            self.issued[dev_id] = Issued(self.round_id, self.model_version, 0, 0, self.k, candidate_ratio,
                                         max_samples)
            self.next_k[dev_id] = candidate_ratio * self.k
        self.bytes_down = len(self.selected) * (TASK_BYTES + 4 * n)  # task + current trainables

    def issue_more(self, devices: Sequence[str], extra_k: int, shared_seeds: bool, deadline: float,
                   max_samples: int | None) -> None:
        """Pacing's extra request: fresh indices for each device (the same ones when shared)."""
        self.request += 1
        self.issued, self.answered, self.kept = {}, set(), {}
        shared_start = max(self.next_k[d] for d in devices)
        for dev_id in devices:
            start = shared_start if shared_seeds else self.next_k[dev_id]
            self.issued[dev_id] = Issued(self.round_id, self.model_version, self.request, start, extra_k, 1,
                                         max_samples)
            self.next_k[dev_id] = start + extra_k
        self.deadline = deadline
        self.bytes_down += len(devices) * TASK_BYTES

    @property
    def complete(self) -> bool:
        """The round's task: once ``target`` answered; an extra request: once all asked answered."""
        return len(self.answered) >= (self.target if self.request == 0 else len(self.issued))

    def count(self, device_id: str, result: DeviceResult, vector_values: int) -> None:
        """The bookkeeping of a validated upload every mode shares: who answered, the loss of the
        round's model on the device's batch (first request only), the upload's bytes."""
        if self.issued[device_id].request == 0:
            self.contributors[device_id] = (result.num_samples, result.loss_mean)
        self.answered.add(device_id)
        self.bytes_up += serde.result_to_proto(result).ByteSize() + 4 * vector_values  # exact protobuf size
