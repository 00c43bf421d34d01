"""The server half of an upload mode (see :mod:`fwdfleet.modes` for the whole picture).

A :class:`ServerMode` is a stateless object; the round's state lives in
:class:`~fwdfleet.aggregator.rounds.RoundState`, which a mode reads and adds to. The coordinator
calls, in a round's life:

1. :meth:`ServerMode.check_config` / :meth:`ServerMode.check_bundle` once, before any work, so an
   incompatible combination is refused with a message instead of failing rounds later;
2. :meth:`ServerMode.task_fields` for every task it issues (the local-training settings of the
   round, e.g. its learning rate from the server-side schedule) and :meth:`ServerMode.sample_budget`
   (the most samples an honest answer to that task can claim);
3. :meth:`ServerMode.validate`, :meth:`ServerMode.admit` (checks against the round's starting
   weights) then :meth:`ServerMode.accept` for every upload (the coordinator journals the accepted
   :class:`~fwdfleet.task.Upload` before acknowledging it, and counts a refused one in the round's
   metrics under ``rejected``);
4. :meth:`ServerMode.close` when a request closes and :meth:`ServerMode.gradient` when the round's
   update is applied (the server optimizer then steps along it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.aggregator.validation import check_result, check_vector
from fwdfleet.bundle import BundleManifest
from fwdfleet.errors import ConfigError
from fwdfleet.modes import Carries
from fwdfleet.task import Upload

if TYPE_CHECKING:
    from fwdfleet.aggregator.config import AggregatorConfig
    from fwdfleet.aggregator.rounds import RoundState
    from fwdfleet.aggregator.step_rule import RoundStatistics
    from fwdfleet.aggregator.validation import Issued


class ServerMode:
    """Base of every server half; a subclass sets ``name`` and ``carries`` and overrides what differs."""

    name: ClassVar[str]
    carries: ClassVar[Carries]
    paced: ClassVar[bool] = False  # supports variance-controlled pacing (extra perturbation requests)
    per_seed_robust: ClassVar[bool] = False  # supports per-seed robust statistics (trimmed mean, median)
    # supports [step] rules and the halves statistic on the loss differences (close() feeds RoundStatistics)
    step_rules: ClassVar[bool] = False
    vector_name: ClassVar[str] = "vector"  # what the uploaded vector is, in messages

    # ------------------------------------------------------------------ before work starts
    def check_config(self, config: AggregatorConfig) -> None:
        """Raise ``ValueError`` naming the field when ``config`` asks for something this mode cannot do."""
        if config.pacing.enabled and not self.paced:
            raise ValueError(f"pacing.enabled needs a mode with perturbation pacing (e.g. 'scalar'); "
                             f"mode {self.name!r} has none: set pacing.enabled = false")
        if config.robust.method in ("trimmed_mean", "median") and not (self.per_seed_robust and
                                                                       config.perturbation.shared_seeds):
            raise ValueError(f"robust.method {config.robust.method!r} is a per-seed statistic: set "
                             "perturbation.shared_seeds = true (scalar mode), or use 'clip'")
        if (config.step.normalize != "none" or config.step.probe_scaling != "none") and not self.step_rules:
            raise ValueError(f"step: normalize and probe_scaling act on the loss differences of scalar rounds; "
                             f"mode {self.name!r} has none: set mode = 'scalar' or leave [step] at its defaults")

    def check_bundle(self, manifest: BundleManifest) -> None:
        """Raise :class:`~fwdfleet.errors.ConfigError` when this mode cannot train a bundle like ``manifest``."""

    def _need_loss_graph(self, manifest: BundleManifest, *, every_trainable: bool) -> None:
        """Modes that perturb the bundle's ``model`` graph: it must exist, give a loss and take the
        trainables (all of them when ``every_trainable``)."""
        graph = next((g for g in manifest.graphs if g.name == "model"), None)
        if graph is None or "loss" not in {o.name for o in graph.outputs} or not graph.trainables:
            raise ConfigError(f"mode {self.name!r} perturbs a bundle's 'model' graph with a 'loss' output and "
                              f"trainable inputs; a bundle of kind {manifest.kind!r} has none "
                              f"(graphs {[g.name for g in manifest.graphs]}): use mode 'fedavg'")
        if every_trainable and len(graph.trainables) != len(manifest.trainables):
            raise ConfigError(f"mode {self.name!r} uploads a gradient of every trainable, but the 'model' graph of "
                              f"this {manifest.kind!r} bundle takes {len(graph.trainables)} of "
                              f"{len(manifest.trainables)}: use mode 'scalar'")

    # ------------------------------------------------------------------ tasks
    def task_fields(self, config: AggregatorConfig, round_id: int) -> dict[str, Any]:
        """Extra :class:`~fwdfleet.task.RoundTask` fields for round ``round_id`` (local-training settings)."""
        return {}

    def sample_budget(self, config: AggregatorConfig, fields: dict[str, Any]) -> int | None:
        """The most samples an honest answer to a task with ``fields`` can claim (None: only the
        device's declared shard bounds it). Default: one minibatch of ``rounds.batch_size``."""
        return config.rounds.batch_size

    # ------------------------------------------------------------------ uploads
    def validate(self, upload: Upload, issued: Issued, config: AggregatorConfig, n: int, declared: int) -> None:
        """Raise :class:`RejectedError` unless ``upload`` answers ``issued`` within ``config.validation``.

        ``declared`` is the shard size the device declared when it joined (0: none)."""
        if self.carries == "vector" and (upload.vector is None or upload.result.indices):
            raise RejectedError(RejectCode.MALFORMED, f"mode {self.name!r} takes a {self.vector_name} vector "
                                "(SubmitVector), not (index, derivative) pairs")
        if self.carries == "scalars" and upload.vector is not None:
            raise RejectedError(RejectCode.MALFORMED, f"mode {self.name!r} takes (index, derivative) pairs "
                                "(Submit), not a vector")
        check_result(upload.result, issued, config.validation, scalar=self.carries == "scalars")
        if upload.vector is not None:
            check_vector(upload.vector, n, config.validation, self.vector_name)
        self._check_samples(upload, issued, config, declared)

    def _check_samples(self, upload: Upload, issued: Issued, config: AggregatorConfig, declared: int) -> None:
        """Refuse a claimed sample count above what the task and the device's declared shard allow."""
        # no bound from the task nor the device: count it as one minibatch (equal weights)
        bounds = [b for b in (issued.max_samples, declared) if b] or [config.rounds.batch_size]
        claimed = upload.result.num_samples
        if claimed > min(bounds):
            raise RejectedError(RejectCode.TOO_LARGE, f"num_samples={claimed} exceeds what this device could "
                                f"have used ({min(bounds)}: the task's batch size x local steps"
                                f"{' and the shard size declared at join' if declared else ''}); report the "
                                "examples actually used")

    def admit(self, rnd: RoundState, device_id: str, device_index: int, upload: Upload, config: AggregatorConfig,
              start: np.ndarray) -> Upload:
        """After :meth:`validate`, the checks that need the round's starting weights ``start`` (e.g.
        replaying a trajectory); returns what :meth:`accept` receives (default: ``upload`` itself).

        Raises :class:`RejectedError` to refuse the upload; must not change ``rnd`` or ``start``. The
        coordinator calls it again for journaled uploads when it restores a round."""
        return upload

    def accept(self, rnd: RoundState, device_id: str, device_index: int, upload: Upload) -> None:
        """Add a validated upload to the round (the coordinator has already counted its bookkeeping)."""
        raise NotImplementedError

    def close(self, rnd: RoundState, config: AggregatorConfig, stats: RoundStatistics) -> None:
        """A request closes: fold what was kept per device into ``rnd.acc`` (default: nothing kept);
        ``stats`` collects what the step rules read (modes with ``step_rules``)."""

    def gradient(self, rnd: RoundState, params: np.ndarray) -> np.ndarray:
        """The direction the server optimizer steps along (its ``g``): default the accumulator's mean."""
        return rnd.acc.mean()
