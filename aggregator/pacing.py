"""FwdLLM's variance-controlled pacing: apply an update only once its estimate is reliable.

After a round's results (or an extra request's) the coordinator hands the round's
:class:`~aggregator.reconstruct.NoiseStats` to :meth:`Pacer.decide`. The noise ratio is the
squared relative standard error of the averaged estimate. By default (``pacing.statistic =
"halves"``) it comes from the agreement of the even- and odd-indexed devices' estimates,
``(|g|**2 - <a, b>) / <a, b>`` (:func:`aggregator.step_rule.halves_ratio`), which falls like
``1 / probes``; ``"spread"`` uses ``spread**2 / (n_eff * |mean|**2)`` (see
:class:`~aggregator.reconstruct.NoiseStats`), which sits near 1 whenever the round's probes are
far fewer than the trainables because ``|mean|**2`` is then mostly noise itself. Both come from
running sums, never from a stored per-device vector. Above ``threshold`` the coordinator keeps its partial sums and asks
the devices that answered for more perturbations (new indices, same round and model), sized so
that the ratio is expected to fall under the threshold (it shrinks like ``1 / pairs``). Once
the update is applied, :meth:`Pacer.adapt` sets K for the next round: up when extra requests
were needed, down when the estimate was far below the threshold. Every decision is returned as
a :class:`PacingDecision` for the metrics log.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fwdfleet.aggregator.config import PacingConfig
from fwdfleet.aggregator.reconstruct import NoiseStats


@dataclass(frozen=True)
class PacingDecision:
    round_id: int
    action: str  # "apply" | "request_more" | "adapt_k"
    reason: str
    noise_ratio: float
    threshold: float
    extra_requests: int  # extra requests made so far in this round
    k: int  # K the round was issued with
    extra_k: int = 0  # perturbations per device in the extra request (request_more)
    next_k: int = 0  # K of the next round (adapt_k)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise_ratio"] = None if math.isnan(self.noise_ratio) else self.noise_ratio
        return d


class Pacer:
    """Decides whether to apply or ask for more, and adapts K between rounds."""

    def __init__(self, cfg: PacingConfig, k: int) -> None:
        self.cfg = cfg
        self.k = k

    def decide(self, round_id: int, noise: NoiseStats, extra_requests: int) -> PacingDecision:
        cfg, ratio = self.cfg, noise.ratio

        def make(action: str, reason: str, extra_k: int = 0) -> PacingDecision:
            return PacingDecision(round_id, action, reason, ratio, cfg.threshold, extra_requests, self.k, extra_k)

        if not cfg.enabled:
            return make("apply", "pacing disabled")
        if math.isnan(ratio):
            return make("apply", "fewer than two contributions: noise not measurable")
        if ratio <= cfg.threshold:
            return make("apply", "noise ratio within threshold")
        if extra_requests >= cfg.max_extra_requests:
            return make("apply", "noise above threshold but max_extra_requests reached")
        # The ratio shrinks like 1 / pairs: ask for enough to bring it under the threshold.
        factor = ratio / cfg.threshold if math.isfinite(ratio) else 2.0
        return make("request_more", "noise ratio above threshold",
                    max(1, min(cfg.k_max, math.ceil(self.k * (factor - 1.0)))))

    def adapt(self, round_id: int, noise: NoiseStats, extra_requests: int, devices: int) -> PacingDecision:
        """After an applied update from ``devices`` devices: choose K for the next round."""
        cfg, old = self.cfg, self.k
        if not cfg.enabled:
            return PacingDecision(round_id, "adapt_k", "pacing disabled", noise.ratio, cfg.threshold,
                                  extra_requests, old, next_k=old)
        if extra_requests > 0:
            # The round needed about (pairs per device) perturbations: start there next time.
            new = max(old + 1, math.ceil(noise.pairs / max(1, devices)))
            reason = "extra requests were needed: raise K"
        elif not math.isnan(noise.ratio) and noise.ratio < cfg.shrink_below * cfg.threshold:
            new, reason = old // 2, "noise far below threshold: lower K"
        else:
            new, reason = old, "keep K"
        self.k = max(cfg.k_min, min(cfg.k_max, new))
        return PacingDecision(round_id, "adapt_k", reason, noise.ratio, cfg.threshold, extra_requests, old,
                              next_k=self.k)

    def state_json(self) -> dict[str, Any]:
        return {"k": self.k}

    def load_state_json(self, state: dict[str, Any]) -> None:
        """Resume the adapted K; without pacing K is the configured one, whatever was saved."""
        if self.cfg.enabled:
            self.k = max(self.cfg.k_min, min(self.cfg.k_max, int(state["k"])))
