"""Server optimizers over the flat trainable vector: SGD, momentum, Adam, with a schedule.

An optimizer updates a flat float32 parameter vector in place from a flat gradient estimate.
Its state is a dict of numpy arrays (:meth:`Optimizer.state_arrays`) so a checkpoint stores it
in an ``.npz`` without pickle, and :meth:`Optimizer.load_state_arrays` restores it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fwdfleet.aggregator.config import OptimizerConfig

F32 = npt.NDArray[np.float32]


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int | None = None) -> float:
    """The learning rate of update number ``step`` (0-based).

    ``constant``: ``lr``. ``linear`` (FwdLLM): ramps ``lr * (step + 1) / warmup_steps`` during the
    warm-up, then decays linearly to ``final_lr_ratio * lr`` at ``total_steps`` and stays there.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.total_steps or (total_steps or 0)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if total <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (total - cfg.warmup_steps))
    return cfg.lr * (1.0 - (1.0 - cfg.final_lr_ratio) * progress)


class Optimizer:
    """Applies ``params -= update(grad)`` in place; ``step`` counts applied updates."""

    def __init__(self, cfg: OptimizerConfig, size: int, *, total_steps: int | None = None) -> None:
        self.cfg = cfg
        self.size = size
        self.total_steps = total_steps
        self.step = 0
        self._state: dict[str, F32] = {}
        if cfg.name == "momentum":
            self._state["velocity"] = np.zeros(size, dtype=np.float32)
        elif cfg.name == "adam":
            self._state["m"] = np.zeros(size, dtype=np.float32)
            self._state["v"] = np.zeros(size, dtype=np.float32)

    def current_lr(self) -> float:
        return learning_rate(self.cfg, self.step, self.total_steps)

    def apply(self, params: F32, grad: npt.NDArray[np.floating]) -> float:
        """Update ``params`` in place from ``grad``; returns the learning rate used."""
        if params.shape != (self.size,) or grad.shape != (self.size,):
            raise ValueError(f"optimizer expects vectors of shape ({self.size},), got {params.shape}, {grad.shape}")
        cfg = self.cfg
        lr = self.current_lr()
        g = np.asarray(grad, dtype=np.float32)
        if cfg.weight_decay:
            g = g + np.float32(cfg.weight_decay) * params
        if cfg.name == "sgd":
            params -= np.float32(lr) * g
        elif cfg.name == "momentum":
            vel = self._state["velocity"]
            vel *= np.float32(cfg.momentum)
            vel += g
            params -= np.float32(lr) * vel
        else:
            m, v = self._state["m"], self._state["v"]
            m *= np.float32(cfg.beta1)
            m += np.float32(1 - cfg.beta1) * g
            v *= np.float32(cfg.beta2)
            v += np.float32(1 - cfg.beta2) * (g * g)
            t = self.step + 1
            m_hat_scale = np.float32(lr / (1 - cfg.beta1**t))
            v_hat_scale = np.float32(1 / (1 - cfg.beta2**t))
            params -= m_hat_scale * m / (np.sqrt(v * v_hat_scale) + np.float32(cfg.adam_eps))
        self.step += 1
        return lr

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to resume exactly: copies, safe to store."""
        out: dict[str, np.ndarray] = {k: v.copy() for k, v in self._state.items()}
        out["step"] = np.array(self.step, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        expected = set(self._state) | {"step"}
        if set(arrays) != expected:
            raise ValueError(
                f"optimizer state holds {sorted(arrays)} but a {self.cfg.name!r} optimizer needs {sorted(expected)};"
                " resume with the optimizer the checkpoint was written with"
            )
        for k in self._state:
            a = np.asarray(arrays[k], dtype=np.float32)
            if a.shape != (self.size,):
                raise ValueError(f"optimizer state {k!r} has shape {a.shape}, expected ({self.size},)")
            self._state[k] = a.copy()
        self.step = int(arrays["step"])
