"""FedAvg with torch backprop on a plain MLP: the baseline FedFwd and BAFFLE are measured against.

Same data, same partition (index arrays from :func:`fleet.partition.partition`), same number of
rounds as the forward-only run. Every round each device starts from the global weights, trains
``local_epochs`` epochs (or ``local_steps`` minibatches) with a fresh optimizer, and the server
replaces the weights by the sample-weighted mean (FedAvg). The model is ``sizes[0] - ... -
sizes[-1]`` with ``relu`` (FedFwd's MLP) or ``tanh`` (``export/mlp.py``, BAFFLE's model) hidden
units; ``rms_norm=True`` adds the FF bundle's input normalisation (``x / rms(x)``) before each
linear layer so that the backprop net matches the FF net layer for layer. Initial values can be
given as bundle trainables (``layers.{i}.weight`` / ``layers.{i}.bias``) so both sides start
from the same point.

Bytes: a device uploads its float32 weights, ``4 * num_parameters`` per round (what a FedAvg
client sends, before any protocol framing).

Written here because ``benchmarks/baselines.py`` (the shared baseline module) did not exist yet
when these experiments ran.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fwdfleet.lr_schedule import LR_SCHEDULES, LrSchedule, round_lr


@dataclass(frozen=True)
class BackpropSettings:
    rounds: int = 20
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many minibatches per round instead of local_epochs
    batch_size: int = 64
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    eval_every: int = 1
    seed: int = 0
    threads: int = 1  # torch intra-op threads (0: leave torch's setting alone)
    lr_schedule: LrSchedule = "constant"  # per-round local lr, as FedFwd's (fwdfleet.lr_schedule.round_lr)
    final_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"BackpropSettings.rounds must be >= 1, got {self.rounds}")
        if self.local_epochs < 1 or self.local_steps < 0:
            raise ValueError("BackpropSettings.local_epochs must be >= 1 and local_steps >= 0")
        if self.batch_size < 1:
            raise ValueError(f"BackpropSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"BackpropSettings.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"BackpropSettings.lr must be > 0, got {self.lr}")
        if self.eval_every < 0:
            raise ValueError("BackpropSettings.eval_every must be >= 0 (0: only the last round)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"BackpropSettings.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"BackpropSettings.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")


class MLP(nn.Module):
    """Linear layers with relu/tanh between them, optional RMS normalisation of each layer's input."""

    def __init__(self, sizes: tuple[int, ...], activation: str = "relu", rms_norm: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        self.act = torch.relu if activation == "relu" else torch.tanh
        self.rms_norm, self.norm_eps = rms_norm, norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            if self.rms_norm:
                h = h / torch.sqrt((h * h).mean(dim=1, keepdim=True) + self.norm_eps)
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h

    def load_trainables(self, values: Mapping[str, np.ndarray]) -> None:
        """Copy ``layers.{i}.weight``/``bias`` values in (names as in the bundles)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in values:
                    p.copy_(torch.from_numpy(np.asarray(values[name], dtype=np.float32)))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _assign(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``x``, ``y``."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            logits = model(x[s : s + batch])
            correct += int((logits.argmax(dim=1) == y[s : s + batch]).sum())
            loss += float(nn.functional.cross_entropy(logits, y[s : s + batch], reduction="sum"))
    n = max(1, x.shape[0])
    return correct / n, loss / n


def _local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: BackpropSettings,
                 gen: torch.Generator, lr: float) -> None:
    opt: torch.optim.Optimizer
    if settings.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = x.shape[0]
    per_epoch = max(1, -(-n // settings.batch_size))
    total = settings.local_steps or per_epoch * settings.local_epochs
    order = torch.randperm(n, generator=gen)
    for step in range(total):
        pos = step % per_epoch
        if step and pos == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[pos * settings.batch_size : (pos + 1) * settings.batch_size]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
        opt.step()


@dataclass
class BackpropRecord:
    round_id: int
    accuracy: float | None
    loss: float | None
    bytes_up: int  # all devices this round
    bytes_up_per_device: int
    wall_time_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fedavg_backprop(
    model: MLP,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shards: list[np.ndarray],
    settings: BackpropSettings,
    *,
    on_round: Callable[[BackpropRecord], None] | None = None,
) -> list[BackpropRecord]:
    """Run FedAvg with backprop; ``model`` holds the initial weights and ends with the final ones."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    xtr = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    ytr = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    xte = torch.from_numpy(np.asarray(test_x, dtype=np.float32))
    yte = torch.from_numpy(np.asarray(test_y, dtype=np.int64))
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    records = []
    for r in range(settings.rounds):
        global_w = _flat(model).clone()
        total = torch.zeros_like(global_w)
        weight = 0
        lr = round_lr(settings.lr, r, settings.rounds, settings.lr_schedule, settings.final_lr_ratio)
        for shard in shards:
            if shard.size == 0:
                continue
            _assign(model, global_w)
            idx = torch.from_numpy(np.asarray(shard, dtype=np.int64))
            _local_train(model, xtr[idx], ytr[idx], settings, gen, lr)
            total += _flat(model) * int(shard.size)
            weight += int(shard.size)
        _assign(model, total / weight)
        last = r == settings.rounds - 1
        acc = loss = None
        if last or (settings.eval_every and (r + 1) % settings.eval_every == 0):
            acc, loss = accuracy(model, xte, yte)
        devices = sum(1 for s in shards if s.size)
        rec = BackpropRecord(r, acc, loss, 4 * n_params * devices, 4 * n_params, time.perf_counter() - start)
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    return records


def centralised_backprop(model: MLP, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         test_y: np.ndarray, settings: BackpropSettings) -> float:
    """One device holding all the data, ``settings.rounds`` epochs: the ceiling, for reference."""
    one = [np.arange(len(train_y))]
    return fedavg_backprop(model, train_x, train_y, test_x, test_y, one, settings)[-1].accuracy or 0.0
