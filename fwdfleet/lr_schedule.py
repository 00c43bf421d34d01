"""Learning-rate schedules over the rounds (FedFwd) or chapters (pipeline FF) of a run.

One function for every place that decays a local learning rate, so that a federated run, its
backprop baseline and a PFF run with its sequential baseline schedule it the same way.
"""

from __future__ import annotations

import math
from typing import Literal

LrSchedule = Literal["constant", "linear", "cosine"]
LR_SCHEDULES: tuple[LrSchedule, ...] = ("constant", "linear", "cosine")


def round_lr(lr: float, round_index: int, rounds: int, schedule: LrSchedule = "constant",
             final_lr_ratio: float = 0.0) -> float:
    """The local learning rate of round ``round_index`` (0-based) of ``rounds``.

    ``constant``: ``lr`` every round. ``linear`` and ``cosine`` start at ``lr`` in the first round
    and decay towards ``final_lr_ratio * lr`` at the end of the last one (evaluated at the start
    of each round, ``progress = round_index / rounds``, so every round's rate stays positive).
    The same function schedules FedFwd (the aggregator's ``fedavg`` mode puts each round's rate in
    the task), its backprop baseline
    (``benchmarks/baselines_mlp.py``) and pipeline FF's chapters (:mod:`pff.config`).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if rounds < 1 or not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"round_lr needs rounds >= 1 and final_lr_ratio in [0, 1], got {rounds}, {final_lr_ratio}")
    if schedule == "constant":
        return lr
    progress = min(max(round_index, 0), rounds - 1) / rounds
    if schedule == "linear":
        return lr * (1.0 - (1.0 - final_lr_ratio) * progress)
    return lr * (final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
