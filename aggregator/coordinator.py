"""The coordinator: rounds, selection, deadlines, validation, reconstruction, pacing, updates.

Plain Python, no transport: the gRPC servicer (``aggregator/servicer.py``) and the in-process
fleet emulation call the same methods. Every public method takes the lock, reads the injected
clock and first processes what time alone decides (a round's deadline, opening a round once
enough devices are live), so a server only has to call :meth:`Coordinator.advance` now and then.

A round's life:

1. **Open** once ``rounds.min_devices`` devices are live (seen within
   ``rounds.heartbeat_timeout_s``): select devices deterministically from the master seed, the
   round id and the attempt; the round seed derives from the same, so a restarted server issues
   the same seeds.
2. **Collect** uploads until ``target`` results arrived, or the deadline passed with at least
   ``rounds.min_results`` (else extend the deadline, then restart the round with a new
   selection). Stragglers' late uploads get ``STALE_ROUND``; they never hold a round up.
3. **Pace** (scalar mode): reconstruct the partial sums, measure the noise, and either apply or
   ask the devices that answered for more perturbations (a new request, new ``k_start``).
4. **Apply** the server optimizer, write a checkpoint, append a metrics line, open the next round.

What a device uploads and how a round's uploads become an update is the upload mode's
(``config.mode``, looked up in the registry :mod:`fwdfleet.aggregator.modes`: ``scalar``, ``dense``,
``fedavg``, ...); the coordinator never branches on a mode's name. Every upload arrives through
:meth:`submit_upload` (:meth:`submit`, :meth:`submit_dense` and :meth:`submit_weights` are
shorthands); the mode validates it (including the sample count it claims, bounded by the task and
the device's declared shard), the coordinator journals it, the mode adds it to the round.

Reads never change state: :meth:`status` and :meth:`current_trainables` report what is; only
:meth:`advance` (and the calls that bring news: join, heartbeat, task_for, submit) process time.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.aggregator.checkpoint import (
    DEVICES,
    RECEIPTS,
    ROUND_JOURNAL,
    CheckpointError,
    CheckpointState,
    Journal,
    drop_uploads,
    load_checkpoint,
    load_upload,
    save_checkpoint,
    save_upload,
)
from fwdfleet.aggregator.config import AggregatorConfig
from fwdfleet.aggregator.errors import RejectCode, RejectedError
from fwdfleet.aggregator.modes import server_mode
from fwdfleet.aggregator.optim import Optimizer
from fwdfleet.aggregator.pacing import Pacer
from fwdfleet.aggregator.reconstruct import Accumulator
from fwdfleet.aggregator.records import (
    CoordinatorStatus,
    DeviceProfile,
    JoinInfo,
    RoundEvent,
    SubmitReceipt,
    derive_seed,
)
from fwdfleet.aggregator.rounds import RoundState, select
from fwdfleet.aggregator.step_rule import RoundStatistics, StepRule
from fwdfleet.aggregator.validation import Ledger, check_profile, check_round, fingerprint
from fwdfleet.bundle import Bundle
from fwdfleet.perturbation import flatten, split
from fwdfleet.task import DeviceResult, RoundTask, Upload

__all__ = ["Coordinator", "CoordinatorStatus", "DeviceProfile", "JoinInfo", "RoundEvent", "SubmitReceipt"]

Evaluate = Callable[[int, Mapping[str, np.ndarray]], Mapping[str, float]]


@dataclass
class _Device:
    device_id: str
    index: int
    profile: DeviceProfile
    last_seen: float
    owner: str | None = None  # who registered it (a fleet-wide token's name): registrations are capped per owner


class Coordinator:
    """See the module docstring; the API is the one ``notes/INTERFACES.md`` agrees on."""

    def __init__(self, config: AggregatorConfig, bundle: Bundle, *, checkpoint_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.time, evaluate: Evaluate | None = None) -> None:
        self.config = config
        self.bundle = bundle
        self.mode = server_mode(config.mode)
        self.mode.check_bundle(bundle.manifest)  # an incompatible model kind is refused before any round
        self._specs = bundle.manifest.trainables
        self._n = bundle.manifest.num_trainable
        self._clock = clock
        self._evaluate = evaluate
        self._lock = threading.RLock()
        self._params = flatten(bundle.load_trainables(), self._specs)
        self._optimizer = Optimizer(config.optimizer, self._n, total_steps=config.rounds.num_rounds or None)
        self._pacer = Pacer(config.pacing, config.perturbation.k)
        self._step = StepRule(config, self._n)
        # measured in every round of a mode with step rules (scalar; pacing on or off) so noise_ratio means
        # the same in every metrics log; costs one more accumulation of half the round's contributions
        self._halves = self.mode.step_rules and config.pacing.statistic == "halves"
        self._stats = RoundStatistics(self._n, halves=self._halves)
        self._round_id = 0
        self._version = 0
        self._attempt = 0
        self._devices: dict[str, _Device] = {}
        self._owned: dict[str | None, int] = {}  # devices registered per owner
        self._device_lines = 0  # records in devices.jsonl (compacted when far more than devices)
        self._round: RoundState | None = None
        self._ledger = Ledger()
        self._events: list[RoundEvent] = []
        ckdir = checkpoint_dir if checkpoint_dir is not None else config.checkpoint.dir
        self._ckdir = Path(ckdir) if ckdir is not None else None
        self._journal = Journal(self._ckdir / DEVICES) if self._ckdir else None
        self._round_log = (Journal(self._ckdir / ROUND_JOURNAL, fsync=config.checkpoint.fsync_journal)
                           if self._ckdir else None)
        self._receipts = Journal(self._ckdir / RECEIPTS, fsync=config.checkpoint.fsync_journal) if self._ckdir else None
        self._receipt_lines = 0
        self._replaying = False
        if self._ckdir:
            self._restore(self._clock())
        self._ledger.start_round(self._round_id)
        with self._lock:
            self._tick(self._clock())

    # ----------------------------------------------------------------------------- public API
    def join(self, device_id: str, profile: DeviceProfile, *, owner: str | None = None,
             owner_limit: int = 0) -> JoinInfo:
        """Register (or re-register) a device. ``owner``: who registers it; a new device is refused
        (``TOO_MANY_DEVICES``) once ``owner`` registered ``owner_limit`` of them (0: no limit)."""
        if not device_id:
            raise RejectedError(RejectCode.MALFORMED, "device_id must not be empty")
        check_profile(profile)
        with self._lock:
            now = self._clock()
            dev = self._devices.get(device_id)
            if dev is None:
                if owner_limit and self._owned.get(owner, 0) >= owner_limit:
                    raise RejectedError(RejectCode.TOO_MANY_DEVICES, f"this token already registered {owner_limit} "
                                        "devices (server.max_devices_per_token); reuse a device id or ask the "
                                        "operator for a limit raise")
                dev = _Device(device_id, len(self._devices) + 1, profile, now, owner)  # index 0: the shared stream
                self._devices[device_id] = dev
                self._owned[owner] = self._owned.get(owner, 0) + 1
                self._journal_device(dev, profile)
            elif profile != dev.profile:
                self._journal_device(dev, profile)
            dev.profile, dev.last_seen = profile, now
            self._tick(now)
            return JoinInfo(dev.index, self._version, self._round_id)

    def _journal_device(self, dev: _Device, profile: DeviceProfile) -> None:
        if self._journal is None:
            return
        self._journal.append({"device_id": dev.device_id, "index": dev.index, "profile": asdict(profile),
                              "owner": dev.owner})
        self._device_lines += 1
        self._compact_devices()

    def _compact_devices(self) -> None:
        """Rewrite devices.jsonl with one record per device once it holds many more (profile updates)."""
        if self._journal is not None and self._device_lines > 2 * len(self._devices) + 64:
            self._device_lines = self._journal.rewrite(
                {"device_id": d.device_id, "index": d.index, "profile": asdict(d.profile), "owner": d.owner}
                for d in sorted(self._devices.values(), key=lambda d: d.index))

    def heartbeat(self, device_id: str) -> None:
        with self._lock:
            now = self._clock()
            self._touch(device_id, now)
            self._tick(now)

    def task_for(self, device_id: str) -> RoundTask | None:
        """This device's outstanding task, or None (nothing for it now: poll again)."""
        with self._lock:
            now = self._clock()
            dev = self._touch(device_id, now)
            self._tick(now)
            rnd = self._round
            if rnd is None or device_id not in rnd.issued or device_id in rnd.answered:
                return None
            iss = rnd.issued[device_id]
            p = self.config.perturbation
            return RoundTask(
                round_id=rnd.round_id, model_version=rnd.model_version, round_seed=rnd.seed,
                device_index=0 if p.shared_seeds else dev.index, num_perturbations=iss.num_perturbations,
                eps=p.eps, k_start=iss.k_start, distribution=p.distribution,  # type: ignore[arg-type]
                difference=p.difference, candidate_ratio=iss.candidate_ratio,  # type: ignore[arg-type]
                batch_size=self.config.rounds.batch_size,
                data_seed=derive_seed(self.config.master_seed, "data", rnd.round_id, rnd.attempt, dev.index)
                & 0x7FFFFFFF,
                deadline_unix=rnd.deadline, upload_mode=self.mode.name,
                **self.mode.task_fields(self.config, rnd.round_id),
            )

    def submit_upload(self, device_id: str, upload: Upload, *, mode: str | None = None) -> SubmitReceipt:
        """Accept an upload for this device's outstanding request; :class:`RejectedError` says why not.

        ``mode``: the mode the device says it uploads for (the wire carries it); refused unless it is
        this aggregator's."""
        if mode is not None and mode != self.mode.name:
            raise RejectedError(RejectCode.MALFORMED, f"this aggregator runs mode {self.mode.name!r}; "
                                f"a {mode!r} upload does not apply (check the device's configuration)")
        return self._submit(device_id, upload)

    def submit(self, device_id: str, result: DeviceResult) -> SubmitReceipt:
        """An upload of ``(k, d_k)`` pairs (modes that carry scalars)."""
        return self.submit_upload(device_id, Upload(result))

    def submit_dense(self, device_id: str, result: DeviceResult, gradient: np.ndarray) -> SubmitReceipt:
        """A flat vector upload (e.g. ``dense``'s gradient estimate); ``result`` has no indices."""
        return self.submit_upload(device_id, Upload(result, np.asarray(gradient)))

    def submit_weights(self, device_id: str, result: DeviceResult,
                       trainables: Mapping[str, np.ndarray]) -> SubmitReceipt:
        """Trainables by name (e.g. ``fedavg``'s locally trained weights), flattened in manifest order."""
        try:
            flat = np.concatenate([np.asarray(trainables[t.name], dtype=np.float32).reshape(-1)
                                   for t in self._specs])
        except KeyError as e:
            raise RejectedError(RejectCode.MALFORMED, f"trainable {e} missing from the upload; send all of "
                                f"{[t.name for t in self._specs]}") from e
        except ValueError as e:
            raise RejectedError(RejectCode.MALFORMED, f"trainables cannot be flattened: {e}") from e
        return self.submit_upload(device_id, Upload(result, flat))

    def current_trainables(self) -> tuple[int, dict[str, np.ndarray]]:
        with self._lock:
            views = split(self._params.copy(), self._specs)
            return self._version, {t.name: views[t.name].astype(t.dtype) for t in self._specs}

    def status(self) -> CoordinatorStatus:
        """The current state, read only: a deadline that passed is processed by :meth:`advance`, not here."""
        with self._lock:
            now = self._clock()
            rnd = self._round
            state = "finished" if self._finished() else ("open" if rnd else "waiting")
            return CoordinatorStatus(
                state=state, round_id=self._round_id, model_version=self._version, attempt=self._attempt,
                request=rnd.request if rnd else 0, mode=self.config.mode, k=rnd.k if rnd else self._pacer.k,
                devices_registered=len(self._devices), devices_available=len(self._available(now)),
                selected=len(rnd.selected) if rnd else 0, target=rnd.target if rnd else 0,
                results=len(rnd.contributors) if rnd else 0, deadline=rnd.deadline if rnd else None,
                rounds_completed=self._version,
            )

    def advance(self, now: float | None = None) -> list[RoundEvent]:
        """Process deadlines and open rounds; returns the events since the last call."""
        with self._lock:
            self._tick(self._clock() if now is None else now)
            events, self._events = self._events, []
            return events

    # ------------------------------------------------------------------------------ internals
    def _finished(self) -> bool:
        return 0 < self.config.rounds.num_rounds <= self._round_id

    def _touch(self, device_id: str, now: float) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            raise RejectedError(RejectCode.UNKNOWN_DEVICE, f"device {device_id!r} has not joined; call join first")
        dev.last_seen = now
        return dev

    def _available(self, now: float) -> list[_Device]:
        limit = self.config.rounds.heartbeat_timeout_s
        return [d for d in self._devices.values() if now - d.last_seen <= limit]

    def _event(self, kind: str, now: float, **detail: Any) -> None:
        self._events.append(RoundEvent(kind, self._round_id, now, detail))
        if len(self._events) > 10_000:  # nobody is reading: keep the newest
            del self._events[:5_000]

    def _log(self, record: dict[str, Any]) -> None:
        if self._round_log is not None and not self._replaying:
            self._round_log.append({"round_id": self._round_id, **record})

    def _tick(self, now: float) -> None:
        rnd = self._round
        if rnd is not None and now >= rnd.deadline:
            self._log({"e": "deadline", "now": now})
            self._on_deadline(rnd, now)
        if self._round is None and not self._finished():
            self._try_open(now)

    def _try_open(self, now: float) -> None:
        rc = self.config.rounds
        if len(self._devices) < max(rc.min_devices, rc.min_available):
            return  # cannot open yet: skip scanning the registry (joins stay O(1) while a fleet arrives)
        picked = select([d.device_id for d in self._available(now)], self.config.rounds,
                        self.config.master_seed, self._round_id, self._attempt)
        if picked is not None:
            self._open(*picked, now)

    def _open(self, selected: list[str], target: int, now: float) -> None:
        self._log({"e": "open", "attempt": self._attempt, "selected": selected, "target": target, "now": now})
        k = self._pacer.k
        rnd = RoundState(round_id=self._round_id, attempt=self._attempt,
                         seed=derive_seed(self.config.master_seed, "round", self._round_id, self._attempt),
                         model_version=self._version, k=k, opened_at=now,
                         deadline=now + self.config.rounds.deadline_s, selected=selected, target=target,
                         acc=Accumulator(self._n))
        rnd.issue_first(self.config.perturbation.candidate_ratio, self._n, self._sample_budget(self._round_id))
        self._round = rnd
        self._stats = RoundStatistics(self._n, halves=self._halves)
        self._event("round_opened", now, attempt=self._attempt, selected=len(selected), target=target, k=k)

    def _sample_budget(self, round_id: int) -> int | None:
        return self.mode.sample_budget(self.config, self.mode.task_fields(self.config, round_id))

    def _on_deadline(self, rnd: RoundState, now: float) -> None:
        rc = self.config.rounds
        if rnd.request > 0 or len(rnd.answered) >= rc.min_results:
            self._close_request(rnd, now, reason="deadline")
        elif rnd.extensions < rc.max_extensions:
            rnd.extensions += 1
            rnd.deadline = now + rc.deadline_s
            self._event("deadline_extended", now, results=len(rnd.answered), min_results=rc.min_results,
                        extensions=rnd.extensions, deadline=rnd.deadline)
        else:
            self._event("round_restarted", now, results=len(rnd.answered), min_results=rc.min_results,
                        attempt=self._attempt + 1)
            self._round = None
            self._attempt += 1

    def _submit(self, device_id: str, upload: Upload) -> SubmitReceipt:
        result, vector = upload.result, upload.vector
        with self._lock:
            now = self._clock()
            dev = self._touch(device_id, now)
            self._tick(now)
            fp = fingerprint(result, b"" if vector is None else vector.astype(np.float32).tobytes())
            if self._ledger.is_duplicate(device_id, result.round_id, fp):
                return SubmitReceipt(accepted=True, duplicate=True, round_id=result.round_id)
            rnd = self._round
            check_round(result, rnd.round_id if rnd else None, rnd.model_version if rnd else self._version)
            assert rnd is not None
            iss = rnd.issued.get(device_id)
            if iss is None and device_id in rnd.selected:
                raise RejectedError(RejectCode.STALE_ROUND, f"round {rnd.round_id} stopped collecting this "
                                    "request before the upload arrived (enough results were in); poll for a task")
            if iss is None:
                raise RejectedError(RejectCode.NOT_SELECTED, f"device {device_id!r} was not selected for round "
                                    f"{rnd.round_id}; poll for a task instead of uploading")
            if device_id in rnd.answered:
                raise RejectedError(RejectCode.ALREADY_SUBMITTED, f"device {device_id!r} already uploaded a "
                                    "different result for this request; only its first upload counts")
            try:
                self.mode.validate(upload, iss, self.config, self._n, dev.profile.num_samples)
                kept = self.mode.admit(rnd, device_id, dev.index, upload, self.config, self._params)
            except RejectedError as e:
                rnd.rejected[e.code.value] = rnd.rejected.get(e.code.value, 0) + 1  # the round's metrics
                raise
            # journaled before it is acknowledged: a restarted server keeps what it accepted
            record: dict[str, Any] = {"e": "submit", "device_id": device_id, "now": now, "fp": fp,
                                      "result": asdict(result)}
            if vector is not None and self._round_log is not None and not self._replaying:
                record["vector_file"] = save_upload(self._round_log.path.parent, rnd.round_id, fp[:16], vector)
            self._log(record)
            self._record(rnd, device_id, upload, fp, now, kept)
            return SubmitReceipt(accepted=True, duplicate=False, round_id=rnd.round_id)

    def _record(self, rnd: RoundState, device_id: str, upload: Upload, fp: str, now: float, kept: Upload) -> None:
        """Count ``upload`` (what the device sent) and give the mode ``kept`` (what its admit() returned)."""
        request = rnd.issued[device_id].request
        rnd.count(device_id, upload.result, 0 if upload.vector is None else upload.vector.size)
        self.mode.accept(rnd, device_id, self._devices[device_id].index, kept)
        self._ledger.record(device_id, rnd.round_id, request, fp)
        if rnd.complete:
            self._close_request(rnd, now, reason="all results in")

    def _close_request(self, rnd: RoundState, now: float, reason: str) -> None:
        p = self.config.perturbation
        self.mode.close(rnd, self.config, self._stats)
        noise = rnd.acc.noise()
        if self._halves:
            noise = replace(noise, ratio=self._stats.halves_ratio(rnd.acc))
        decision = self._pacer.decide(rnd.round_id, noise, rnd.request)
        rnd.decisions.append(decision)
        answered = sorted(rnd.answered, key=lambda d: self._devices[d].index)
        if decision.action == "request_more" and answered:
            rnd.issue_more(answered, decision.extra_k, p.shared_seeds, now + self.config.rounds.deadline_s,
                           self._sample_budget(rnd.round_id))
            self._event("extra_requested", now, request=rnd.request, devices=len(answered), extra_k=decision.extra_k,
                        noise_ratio=decision.noise_ratio, reason=reason)
            return
        self._apply(rnd, now, noise, reason)

    def _apply(self, rnd: RoundState, now: float, noise: Any, reason: str) -> None:
        grad = self.mode.gradient(rnd, self._params)
        step_info: dict[str, Any] = {"noise_ratio_spread": rnd.acc.noise().ratio} if self._halves else {}
        if self.mode.step_rules and self._step.active:
            step = self._step.scale(grad, rnd.acc.pairs, self._stats)
            grad = step.direction
            step_info.update(step.info)
        lr = self._optimizer.apply(self._params, grad)
        adapt = self._pacer.adapt(rnd.round_id, noise, rnd.request, len(rnd.contributors))
        rnd.decisions.append(adapt)
        self._version += 1
        self._round_id += 1
        self._attempt = 0
        self._round = None
        self._ledger.start_round(self._round_id)
        if self._ckdir:
            self._save()
            self._keep_receipts(rnd.round_id)
            if self._round_log is not None and not self._replaying:
                self._round_log.reset()
                drop_uploads(self._round_log.path.parent)
        samples = sum(s for s, _ in rnd.contributors.values())
        loss = sum(s * lo for s, lo in rnd.contributors.values()) / samples if samples else math.nan
        metrics: dict[str, Any] = {
            "round_id": rnd.round_id, "model_version": self._version, "attempt": rnd.attempt, "time": now,
            "duration_s": now - rnd.opened_at, "close_reason": reason, "mode": self.config.mode,
            "selected": len(rnd.selected), "target": rnd.target, "participants": len(rnd.contributors),
            "loss_mean": loss, "k": rnd.k, "next_k": self._pacer.k, "pairs": noise.pairs,
            "extra_requests": rnd.request, "noise_ratio": noise.ratio, "spread_sq": noise.spread_sq,
            "mean_sqnorm": noise.mean_sqnorm, "lr": lr, "update_norm": float(np.linalg.norm(grad)) * lr,
            "bytes_up": rnd.bytes_up, "bytes_down": rnd.bytes_down, "rejected": dict(sorted(rnd.rejected.items())),
            "pacing": [d.to_json() for d in rnd.decisions], **step_info,
        }
        if self._evaluate is not None:
            metrics["eval"] = dict(self._evaluate(self._version, self.current_trainables()[1]))
        self._write_metrics(metrics)
        self._event("update_applied", now, **{k: metrics[k] for k in ("round_id", "model_version", "participants",
                                                                       "loss_mean", "noise_ratio", "next_k")})
        if self._finished():
            self._event("finished", now, rounds=self._round_id)

    def _write_metrics(self, metrics: dict[str, Any]) -> None:
        path = self.config.metrics_path
        if not path:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")

    # --------------------------------------------------------------------------- durability
    def _meta(self) -> dict[str, Any]:
        c = self.config
        return {"master_seed": c.master_seed, "mode": c.mode, "shared_seeds": c.perturbation.shared_seeds,
                "distribution": c.perturbation.distribution, "num_trainable": self._n,
                "optimizer": c.optimizer.name, "config": c.to_dict()}

    def _save(self) -> None:
        assert self._ckdir is not None
        save_checkpoint(self._ckdir, CheckpointState(
            round_id=self._round_id, model_version=self._version, trainables=self._params,
            optimizer=self._optimizer.state_arrays(), pacing=self._pacer.state_json(), meta=self._meta()))

    def _keep_receipts(self, round_id: int) -> None:
        """Make the receipts of a checkpointed round durable before its journal is emptied (compacting
        the receipts journal once it holds far more lines than the ledger keeps)."""
        if self._receipts is None or self._replaying:
            return
        self._receipt_lines += self._receipts.extend(
            {"d": d, "fp": fp} for d, fp in self._ledger.round_receipts(round_id))
        kept = self._ledger.receipts()
        if self._receipt_lines > 4 * len(kept) + 1024:
            self._receipt_lines = self._receipts.rewrite({"d": d, "fp": fp} for d, fp in kept)

    def _restore(self, now: float) -> None:
        assert self._ckdir is not None and self._journal is not None
        for rec in self._journal.records():
            self._device_lines += 1
            prof = DeviceProfile(**rec.get("profile", {}))
            known = self._devices.get(rec["device_id"])
            if known is not None:  # a later profile of the same device
                known.profile = prof
                continue
            owner = rec.get("owner")
            # not live until heard from: a restart must not make every device ever seen selectable
            self._devices[rec["device_id"]] = _Device(rec["device_id"], int(rec["index"]), prof, -math.inf, owner)
            self._owned[owner] = self._owned.get(owner, 0) + 1
        self._compact_devices()
        if self._receipts is not None:
            for rec in self._receipts.records():
                self._ledger.remember(str(rec["d"]), str(rec["fp"]))
                self._receipt_lines += 1
        state = load_checkpoint(self._ckdir)
        if state is not None:
            self._load_state(state)
        self._ledger.start_round(self._round_id)
        self._replay()

    def _load_state(self, state: CheckpointState) -> None:
        meta, mine = state.meta, self._meta()
        for key in ("master_seed", "mode", "shared_seeds", "distribution", "num_trainable", "optimizer"):
            if meta.get(key) != mine[key]:
                raise CheckpointError(
                    f"checkpoint in {self._ckdir} was written with {key}={meta.get(key)!r} but this config has "
                    f"{mine[key]!r}; resume with the same configuration or use a new checkpoint folder")
        self._params = state.trainables.copy()
        self._optimizer.load_state_arrays(state.optimizer)
        self._pacer.load_state_json(dict(state.pacing))
        self._round_id, self._version = state.round_id, state.model_version

    def _replay(self) -> None:
        """Re-run the journaled decisions and accepted uploads of the round in progress."""
        assert self._round_log is not None
        self._replaying = True
        try:
            for rec in self._round_log.records():
                if rec.get("round_id") != self._round_id:
                    if rec["e"] == "submit" and "fp" in rec:  # a crash before its receipts were kept
                        self._ledger.remember(str(rec["device_id"]), str(rec["fp"]))
                    continue  # an older round, already in the checkpoint
                now = float(rec["now"])
                if rec["e"] == "open":
                    self._attempt = int(rec["attempt"])
                    self._open([str(d) for d in rec["selected"]], int(rec["target"]), now)
                elif rec["e"] == "deadline" and self._round is not None:
                    self._on_deadline(self._round, now)
                elif rec["e"] == "submit" and self._round is not None:
                    r = dict(rec["result"])
                    result = DeviceResult(**{**r, "indices": tuple(r["indices"]),
                                             "derivatives": tuple(r["derivatives"]), "skipped": tuple(r["skipped"])})
                    name = rec.get("vector_file")
                    vector = None if name is None else load_upload(self._round_log.path.parent, str(name))
                    fp = fingerprint(result, b"" if vector is None else vector.tobytes())
                    device_id, upload = str(rec["device_id"]), Upload(result, vector)
                    kept = self.mode.admit(self._round, device_id, self._devices[device_id].index, upload,
                                           self.config, self._params)
                    self._record(self._round, device_id, upload, fp, now, kept)
        finally:
            self._replaying = False
