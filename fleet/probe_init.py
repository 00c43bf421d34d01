"""Forward-only, federated initialisation of a classifier's linear head from pooled features.

Zeroth-order training from a random head diverges or does nothing (DESIGN.md, calibration
runs), and the estimator's variance grows with the number of trainable values. So before any
perturbation, the head of a ``seq_cls_lora`` bundle is fitted from statistics the devices
compute by plain inference:

1. **Class statistics** (one upload per device): each device runs the graph's ``features``
   output over its local samples and uploads, for each class it holds, the count and the mean
   pooled feature vector in float16. The server pools them into class means ``mu_c`` around the
   global mean ``g`` and sets the head to the nearest-centroid rule
   ``logits_c = x . (mu_c - g) - 0.5 |mu_c - g|^2 - (mu_c - g) . g``
   (argmax equals the nearest centroid; no covariance is ever uploaded).
2. **Temperature** (one more upload of a few scalars): the centroid rule fixes the argmax but
   not the logit scale, which sets the loss the zeroth-order phase starts from. Each device
   scores a grid of scales on its cached features (a linear head's inference, no new forward of
   the encoder) and uploads the summed cross-entropy per scale; the server keeps the best.

The uplink is counted in bytes as a compact encoding would send it (:func:`stats_wire_bytes`,
:func:`scales_wire_bytes`): a class id, a count and ``hidden`` float16 values per present class;
4 bytes per scale plus a count. :func:`probe_init` returns these per device so a report can add
them to the zeroth-order rounds' uplink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fwdfleet.device_runtime.session import BundleSession

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
DEFAULT_SCALES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
_HEADER_BYTES = 16  # round id, model version, device count fields of an upload


@dataclass(frozen=True)
class ClassStats:
    """One device's upload of step 1: per-class counts and float16 mean features."""

    counts: np.ndarray  # (classes,) int64
    means: np.ndarray  # (classes, hidden) float16; rows of absent classes are zero and not sent

    def __post_init__(self) -> None:
        if self.counts.ndim != 1 or self.means.ndim != 2 or self.means.shape[0] != self.counts.size:
            raise ValueError(f"ClassStats: counts {self.counts.shape} and means {self.means.shape} disagree")
        if (self.counts < 0).any():
            raise ValueError("ClassStats.counts must be non-negative")
        if not np.isfinite(self.means.astype(np.float32)).all():
            raise ValueError("ClassStats.means must be finite; a device with NaN features must not upload")


@dataclass(frozen=True)
class ProbeInit:
    """The head the fleet fitted, and what it cost each device in uplinked bytes."""

    weight: np.ndarray  # (classes, hidden) float32
    bias: np.ndarray  # (classes,) float32
    scale: float
    scale_losses: dict[float, float]
    stats_bytes: list[int]  # per device, step 1
    scale_bytes: list[int]  # per device, step 2
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_device(self) -> float:
        total = sum(self.stats_bytes) + sum(self.scale_bytes)
        return total / max(1, len(self.stats_bytes))

    def trainables(self, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``base`` (a bundle's trainables) with the fitted head in place of its own."""
        out = {k: np.array(v, copy=True) for k, v in base.items()}
        for name, value in ((HEAD_WEIGHT, self.weight), (HEAD_BIAS, self.bias)):
            if name not in out or out[name].shape != value.shape:
                have = out[name].shape if name in out else "missing"
                raise ValueError(f"trainable {name!r} is {have} but the fitted head is {value.shape}; "
                                 "probe_init needs a seq_cls_lora bundle with a linear head")
            out[name] = value.astype(out[name].dtype)
        return out


def extract_features(session: BundleSession, trainables: Mapping[str, np.ndarray],
                     batches: Sequence[Mapping[str, np.ndarray]] | Any) -> tuple[np.ndarray, np.ndarray]:
    """Inference only: the graph's pooled ``features`` and the batches' labels, concatenated."""
    if "features" not in session.output_names:
        raise ValueError(f"graph outputs {session.output_names} have no 'features'; re-export the bundle "
                         "with `fwdfleet export seq-cls` (its graph outputs pooled features)")
    feats, labels = [], []
    for batch in batches:
        feats.append(np.asarray(session.run(trainables, batch, ("features",))["features"], dtype=np.float32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    if not feats:
        raise ValueError("no batches: a device needs at least one labelled sample")
    return np.concatenate(feats), np.concatenate(labels)


def class_stats(features: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassStats:
    """Step 1 on a device: counts and float16 means of its features per class."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features.astype(np.float64))
    means = sums / np.maximum(counts, 1)[:, None]
    return ClassStats(counts=counts, means=means.astype(np.float16))


def stats_wire_bytes(stats: ClassStats) -> int:
    """Header + per present class: 1-byte class id, 4-byte count, float16 mean."""
    present = int((stats.counts > 0).sum())
    return _HEADER_BYTES + present * (1 + 4 + 2 * int(stats.means.shape[1]))


def centroid_head(uploads: Sequence[ClassStats]) -> tuple[np.ndarray, np.ndarray]:
    """Server side of step 1: the nearest-centroid head (unit scale) from the pooled statistics."""
    if not uploads:
        raise ValueError("no class statistics were uploaded")
    counts = np.sum([u.counts for u in uploads], axis=0).astype(np.float64)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"no device holds classes {missing}; the centroid head needs every class")
    sums = np.sum([u.means.astype(np.float64) * u.counts[:, None] for u in uploads], axis=0)
    mu = sums / counts[:, None]
    g = (counts[:, None] * mu).sum(0) / counts.sum()
    centred = mu - g
    # x.(mu_c - g) - 0.5|mu_c - g|^2 - (mu_c - g).g  ==  -0.5|x - mu_c|^2 + terms equal for every class
    weight = centred
    bias = -0.5 * (centred**2).sum(1) - centred @ g
    return weight.astype(np.float32), bias.astype(np.float32)


def scale_losses(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                 scales: Sequence[float]) -> np.ndarray:
    """Step 2 on a device: summed cross-entropy of ``scale * (x W^T + b)`` for each scale."""
    logits = features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    out = np.empty(len(scales), dtype=np.float64)
    for i, s in enumerate(scales):
        z = s * logits
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        out[i] = -log_p[np.arange(labels.size), labels].sum()
    return out


def scales_wire_bytes(num_scales: int) -> int:
    return _HEADER_BYTES + 4 * num_scales + 4


def probe_init(device_features: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int, *,
               scales: Sequence[float] = DEFAULT_SCALES) -> ProbeInit:
    """Run both steps over the devices' ``(features, labels)`` (each from :func:`extract_features`).

    Every device takes part in both steps; a device without samples uploads nothing.
    """
    if not scales or any(not (np.isfinite(s) and s > 0) for s in scales):
        raise ValueError(f"scales must be positive finite numbers, got {list(scales)}")
    uploads, stats_bytes = [], []
    for feats, labels in device_features:
        if labels.size == 0:
            stats_bytes.append(0)
            continue
        st = class_stats(feats, labels, num_classes)
        uploads.append(st)
        stats_bytes.append(stats_wire_bytes(st))
    weight, bias = centroid_head(uploads)
    total = np.zeros(len(scales), dtype=np.float64)
    count = 0
    scale_bytes = []
    for feats, labels in device_features:
        if labels.size == 0:
            scale_bytes.append(0)
            continue
        total += scale_losses(feats, labels, weight, bias, scales).astype(np.float32)  # float32 on the wire
        count += labels.size
        scale_bytes.append(scales_wire_bytes(len(scales)))
    mean = total / max(1, count)
    best = int(np.argmin(mean))
    s = float(scales[best])
    return ProbeInit(weight=(s * weight).astype(np.float32), bias=(s * bias).astype(np.float32), scale=s,
                     scale_losses={float(k): float(v) for k, v in zip(scales, mean, strict=True)},
                     stats_bytes=stats_bytes, scale_bytes=scale_bytes,
                     extras={"devices": len(uploads), "samples": int(count)})
