"""Backprop baselines for the forward-only experiments: FedAvg with torch, and a frozen linear probe.

Needs the export extra (torch). The device runtime and aggregator never import this module.

``fedavg_backprop(bundle, train, test, shards, rounds, local_steps, lr, **options) -> BackpropRun``
    FedAvg (McMahan et al.) with local backprop on the bundle's **torch twin**
    (:func:`export.rebuild.torch_twin_from_bundle`): the same model, the same trainable tensors
    (LoRA + head for ``seq_cls_lora``, every weight for ``mlp``, the layer-local objective's
    weights end to end for ``ff_mlp``; ``causal_lm_lora`` works too, reporting loss only).

    * ``bundle``: a :class:`fwdfleet.bundle.Bundle`; its trainable values are the start point
      unless ``init`` (a name -> array mapping) is given.
    * ``train`` / ``test``: :class:`device_runtime.data.RawData` (as :func:`fleet.datasets.load_split`
      gives), fitted to the graph by :func:`device_runtime.data.dataset_for_bundle` (so text is
      tokenized by the bundle's own tokenizer). ``test=None`` skips evaluation.
    * ``shards``: one index array into ``train`` per device (:func:`fleet.partition.partition`).
    * ``rounds``; ``local_steps`` minibatch steps per selected device per round; ``lr``.
    * options: ``devices_per_round`` (default all; drawn per round with ``seed``), ``batch_size``
      (16), ``optimizer`` ("adamw" or "sgd"; fresh state on every device every round),
      ``eval_every`` (1; 0 = only the last round), ``eval_batch`` (256), ``eval_limit`` (0: the
      whole test set), ``threads`` (torch intra-op threads, default 1), ``profiles`` (one
      :class:`fleet.profiles.EmulatedProfile` per device: adds a simulated fleet clock),
      ``on_round`` (callback per :class:`BackpropRound`).

    Evaluation runs the bundle's onnxruntime graph with the twin's current values
    (:func:`device_runtime.train.evaluate`), the same evaluator the forward-only runs use.
    Uplink is what FedAvg sends: every trainable value as float32, per device per round.

``linear_probe(train_x, train_y, test_x, test_y, c=1.0) -> float``
    Accuracy of a logistic regression (scikit-learn) on frozen features: the floor a
    forward-only fine-tuning result must beat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import RawData, dataset_for_bundle
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.train import evaluate

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class BackpropRound:
    round_id: int
    participants: int
    steps: int  # local steps summed over this round's devices
    loss: float | None
    accuracy: float | None
    train_loss: float  # mean local minibatch loss of the round
    bytes_up_per_device: int
    bytes_down_per_device: int
    device_compute_s: float  # mean measured local training time per device
    sim_time_s: float | None  # simulated fleet clock at the end of the round (with profiles)
    wall_time_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackpropRun:
    rounds: list[BackpropRound] = field(default_factory=list)
    trainables: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        return next((r.accuracy for r in reversed(self.rounds) if r.accuracy is not None), None)


def _named_trainables(twin: Any, names: Sequence[str]) -> dict[str, Any]:
    """Map each bundle trainable name to the twin's parameter (twins may prefix names, e.g. ``model.``)."""
    params = dict(twin.named_parameters())
    out = {}
    for name in names:
        hits = [p for n, p in params.items() if n == name or n.endswith("." + name)]
        if len(hits) != 1:
            raise ValueError(f"the torch twin has {len(hits)} parameters named like {name!r}; "
                             "rebuild the twin with export.rebuild.torch_twin_from_bundle")
        out[name] = hits[0]
    return out


def fedavg_backprop(
    bundle: Bundle,
    train: RawData,
    test: RawData | None,
    shards: Sequence[np.ndarray],
    rounds: int,
    local_steps: int,
    lr: float,
    *,
    devices_per_round: int | None = None,
    batch_size: int = 16,
    optimizer: str = "adamw",
    seed: int = 0,
    eval_every: int = 1,
    eval_batch: int = 256,
    eval_limit: int = 0,
    threads: int | None = 1,
    init: Mapping[str, np.ndarray] | None = None,
    profiles: Sequence[Any] | None = None,
    on_round: Callable[[BackpropRound], None] | None = None,
) -> BackpropRun:
    """FedAvg with local torch backprop on the bundle's twin; see the module docstring."""
    import torch

    from fwdfleet.export.rebuild import torch_twin_from_bundle

    if rounds < 1 or local_steps < 1 or batch_size < 1:
        raise ValueError(f"rounds, local_steps and batch_size must be >= 1, got {rounds}, {local_steps}, {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not shards or any(len(s) == 0 for s in shards):
        raise ValueError("every device needs a non-empty shard; drop empty shards or use partition min_samples")
    if profiles is not None and len(profiles) != len(shards):
        raise ValueError(f"{len(profiles)} profiles for {len(shards)} shards")
    per_round = len(shards) if devices_per_round is None else devices_per_round
    if not 1 <= per_round <= len(shards):
        raise ValueError(f"devices_per_round must be in [1, {len(shards)}], got {devices_per_round}")
    if threads:
        torch.set_num_threads(threads)

    start = time.perf_counter()
    specs = bundle.manifest.trainables
    names = [t.name for t in specs]
    twin = torch_twin_from_bundle(bundle)
    params = _named_trainables(twin, names)
    for p in twin.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    global_w = {n: np.array((init or bundle.load_trainables())[n], dtype=np.float32, copy=True) for n in names}
    data = dataset_for_bundle(train, bundle)
    evaluator = _Evaluator(bundle, test, eval_batch, eval_limit) if test is not None else None
    rng = np.random.default_rng(seed)
    bytes_model = 4 * bundle.manifest.num_trainable
    sim_clock = 0.0 if profiles is not None else None
    run = BackpropRun()
    twin.train()
    for r in range(rounds):
        chosen = np.sort(rng.choice(len(shards), size=per_round, replace=False))
        acc_w = {n: np.zeros_like(v, dtype=np.float64) for n, v in global_w.items()}
        weight_sum, losses, compute = 0.0, [], []
        for dev in chosen:
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(torch.from_numpy(global_w[n]))
            opt = (torch.optim.AdamW(list(params.values()), lr=lr) if optimizer == "adamw"
                   else torch.optim.SGD(list(params.values()), lr=lr))
            shard = np.asarray(shards[dev])
            for _ in range(local_steps):
                pick = rng.choice(shard.size, size=batch_size, replace=batch_size > shard.size)
                batch = data.take(shard[np.sort(pick)])
                loss = twin(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            w = float(shard.size)
            for n, p in params.items():
                acc_w[n] += w * p.detach().numpy().astype(np.float64)
            weight_sum += w
            compute.append(time.perf_counter() - t0)
        global_w = {n: (v / weight_sum).astype(np.float32) for n, v in acc_w.items()}
        if sim_clock is not None and profiles is not None:
            sim_clock += max(profiles[d].round_seconds(c, bytes_model, bytes_model) for d, c in zip(chosen, compute))
        last = r == rounds - 1
        loss_ev = acc_ev = None
        if evaluator is not None and (last or (eval_every and (r + 1) % eval_every == 0)):
            loss_ev, acc_ev = evaluator(global_w)
        rec = BackpropRound(round_id=r, participants=int(per_round), steps=int(per_round * local_steps),
                            loss=loss_ev, accuracy=acc_ev, train_loss=float(np.mean(losses)),
                            bytes_up_per_device=bytes_model, bytes_down_per_device=bytes_model,
                            device_compute_s=float(np.mean(compute)), sim_time_s=sim_clock,
                            wall_time_s=time.perf_counter() - start)
        run.rounds.append(rec)
        if on_round is not None:
            on_round(rec)
    run.trainables = global_w
    run.seconds = time.perf_counter() - start
    return run


class _Evaluator:
    def __init__(self, bundle: Bundle, test: RawData, batch: int, limit: int) -> None:
        self.session = BundleSession(bundle, SessionOptions(intra_op_threads=0))
        self.data = dataset_for_bundle(test, bundle)
        self.batch, self.limit = batch, limit or None
        self.dtypes = {t.name: t.dtype for t in bundle.manifest.trainables}

    def __call__(self, trainables: Mapping[str, np.ndarray]) -> tuple[float, float | None]:
        values = {n: np.asarray(v, dtype=self.dtypes[n]) for n, v in trainables.items()}
        ev = evaluate(self.session, values, self.data.batches(self.batch, self.limit))
        return ev.loss, (None if math.isnan(ev.accuracy) else ev.accuracy)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c: float = 1.0) -> float:
    """Test accuracy of a logistic regression fitted on frozen features (the forward-only floor)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000, C=c).fit(train_x, train_y)
    return float(model.score(test_x, test_y))
