"""The device's side of the protocol: join, download, poll, train, submit; survive lost connections.

:class:`DeviceClient` runs the loop a phone or a Raspberry Pi runs:

1. **join** the aggregator with a device id and profile (a bearer token in the metadata);
2. **download the bundle** when it is missing or its sha256 differs from what the aggregator
   serves (resumed from the last byte after a broken stream, verified before use);
3. **long-poll for a task**; download the trainable tensors whenever the model version changed;
4. **estimate** with :func:`device_runtime.estimator.estimate` on a minibatch of its
   :class:`~device_runtime.data.LocalDataset` (the guide for discriminative sampling is the
   difference of the last two model versions, computed locally);
5. **submit** the result.

The aggregator's mode (told with every task) decides what step 4 computes and step 5 sends:
``scalar``: the ``(k, d_k)`` pairs with ``Submit``; ``dense``: FwdLLM's dense forward gradient
``mean_k d_k z_k`` (:func:`~device_runtime.estimator.dense_gradient`) with ``SubmitVector``;
``fedavg``: weights trained locally from the current ones (``ff_mlp`` bundles with FF layers:
:func:`~device_runtime.ff_train.train_ff` with the device's ``ff_train`` config; other bundles:
:func:`~device_runtime.train.train_local`, perturbed-inference SGD with the device's
``local_train`` steps and lr and the task's K, eps, batch size and seed) with ``SubmitVector``.

Transient failures (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, a stream broken mid-download) are
retried with jittered exponential backoff (:func:`backoff_delay`, the one such helper). When the
aggregator forgot the device (it restarted), the client joins again and resubmits the same
result: submissions are idempotent on the server, so a retry is never counted twice. A refused
result (stale round, invalid value) is dropped with a log line and the loop goes on; a refused
token stops the client with an error saying so. :meth:`DeviceClient.stop` ends the loop from
another thread at the next safe point.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from fwdfleet import __version__
from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.device_runtime.data import LocalDataset
from fwdfleet.device_runtime.downloads import (
    CorruptDownload,
    UnsafeBundle,
    extract_bundle,
    read_trainables,
    resume_download,
)
from fwdfleet.device_runtime.estimator import EstimatorWorkspace, dense_gradient, estimate
from fwdfleet.device_runtime.ff_train import FFTrainConfig, train_ff
from fwdfleet.device_runtime.sampling import guide_from_versions
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.device_runtime.train import LocalTrainConfig, train_local
from fwdfleet.errors import FwdfleetError
from fwdfleet.perturbation import F32Array
from fwdfleet.protocol import bearer_metadata, rpc, serde
from fwdfleet.task import DeviceResult, RoundTask

log = logging.getLogger("fwdfleet.device")
T = TypeVar("T")

# Transient: the server is away, slow, or restarting (a stopping server cancels running calls; this
# client never cancels its own, so CANCELLED means the other side went away).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.CANCELLED})
_DROP_RESULT = frozenset(
    {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}
)


class ClientError(FwdfleetError):
    """The device cannot go on (refused token, protocol mismatch, corrupt download, gave up retrying)."""


# fedavg on non-FF bundles: a few local steps per round unless the device says otherwise.
DEFAULT_LOCAL_TRAIN = LocalTrainConfig(steps=10, eval_every=0)


class _Stopped(Exception):
    pass


@dataclass(frozen=True)
class DeviceClientConfig:
    """How a device reaches its aggregator. Validated on construction; errors name the field."""

    address: str  # host:port
    device_id: str
    token: str | None = None
    root_cert: str | None = None  # PEM of the CA that signed the server's certificate (None: system roots)
    insecure: bool = False  # plaintext, local development only
    server_name: str | None = None  # TLS name to verify when the address is not the certificate's name
    long_poll_s: float = 20.0
    rpc_timeout_s: float = 30.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each delay that is random
    max_retries: int = 0  # consecutive failed attempts before giving up; 0: retry until stopped
    platform: str = field(default_factory=lambda: f"{platform.system().lower()}-{platform.machine().lower()}")
    ram_mb: int = 0
    compute_speed: float = 1.0

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"DeviceClientConfig.address must be host:port, got {self.address!r}")
        if not self.device_id or len(self.device_id) > 256:
            raise ValueError("DeviceClientConfig.device_id must be 1..256 characters")
        if self.insecure and self.root_cert:
            raise ValueError("DeviceClientConfig.root_cert and insecure are exclusive: TLS or plaintext")
        for name in ("long_poll_s", "initial_backoff_s", "backoff_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"DeviceClientConfig.{name} must be a finite number >= 0, got {value}")
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"DeviceClientConfig.rpc_timeout_s must be > 0, got {self.rpc_timeout_s}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ValueError("DeviceClientConfig.max_backoff_s must be >= initial_backoff_s")
        if self.backoff_multiplier < 1:
            raise ValueError("DeviceClientConfig.backoff_multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"DeviceClientConfig.jitter must be in [0, 1], got {self.jitter}")
        if self.max_retries < 0:
            raise ValueError("DeviceClientConfig.max_retries must be >= 0 (0: retry until stopped)")
        if self.ram_mb < 0 or not self.compute_speed > 0:
            raise ValueError("DeviceClientConfig.ram_mb must be >= 0 and compute_speed > 0")


def backoff_delay(attempt: int, config: DeviceClientConfig, rng: random.Random) -> float:
    """Jittered exponential backoff: ``min(max, initial * multiplier**attempt)``, minus up to ``jitter`` of it."""
    base = min(config.max_backoff_s, config.initial_backoff_s * config.backoff_multiplier ** min(attempt, 64))
    return base * (1.0 - config.jitter * rng.random())


@dataclass
class ClientStats:
    rounds: int = 0  # results the aggregator accepted (or had already accepted)
    dropped: int = 0  # results it refused (stale, invalid)
    retries: int = 0
    joins: int = 0
    bundle_downloads: int = 0
    trainable_downloads: int = 0
    uplink_bytes: int = 0


def _channel(config: DeviceClientConfig) -> grpc.Channel:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 8 << 20)]
    if config.insecure:
        return grpc.insecure_channel(config.address, options=options)
    root = Path(config.root_cert).read_bytes() if config.root_cert else None
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    return grpc.secure_channel(config.address, grpc.ssl_channel_credentials(root_certificates=root), options=options)


class DeviceClient:
    """A device taking part in federated rounds (see the module docstring)."""

    def __init__(
        self,
        config: DeviceClientConfig,
        bundle_dir: str | Path,
        dataset: LocalDataset | Callable[[Bundle], LocalDataset],
        *,
        session_options: SessionOptions | None = None,
        seed: int | None = None,
        local_train: LocalTrainConfig | None = None,
        ff_train: FFTrainConfig | None = None,
    ) -> None:
        self.config = config
        # fedavg mode only: how to train locally (the task supplies K, eps, batch size and seed)
        self.local_train = local_train or DEFAULT_LOCAL_TRAIN
        self.ff_train = ff_train or FFTrainConfig()
        self._mode: serde.UploadMode = "scalar"
        self.bundle_dir = Path(bundle_dir)
        # A dataset, or a factory building it from the downloaded bundle (a tokenizer ships in it).
        self._dataset_factory = None if hasattr(dataset, "batch") else dataset
        self.dataset: LocalDataset | None = dataset if hasattr(dataset, "batch") else None  # type: ignore[assignment]
        self.session_options = session_options or SessionOptions()
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._metadata = bearer_metadata(config.token) if config.token else ()
        self._channel: grpc.Channel | None = None
        self._joined: serde.Joined | None = None
        self._bundle: Bundle | None = None
        self._session: BundleSession | None = None
        self._workspace: EstimatorWorkspace | None = None
        self._version = -1
        self._trainables: dict[str, npt.NDArray[Any]] = {}
        self._previous: tuple[int, dict[str, npt.NDArray[Any]]] | None = None

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to return at the next safe point (safe from any thread)."""
        self._stop.set()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def run(self, rounds: int | None = None) -> ClientStats:
        """Take part until ``rounds`` results were accepted (None: until :meth:`stop`)."""
        try:
            while not self._stop.is_set() and (rounds is None or self.stats.rounds < rounds):
                self._ensure_joined()
                task = self._next_task()
                if task is None:
                    continue
                result, vector = self._train(task)
                self._submit(result, vector)
        except _Stopped:
            pass
        finally:
            self.close()
        return self.stats

    # ------------------------------------------------------------------ steps

    def _ensure_joined(self) -> None:
        if self._joined is not None:
            return
        profile = serde.DeviceProfile(
            platform=self.config.platform, ram_mb=self.config.ram_mb, compute_speed=self.config.compute_speed
        )
        request = serde.join_request(self.config.device_id, profile, __version__)
        joined = self._retry("join", lambda: serde.joined_from_bytes(self._unary("Join", request)))
        self.stats.joins += 1
        log.info("joined as device index %d (model version %d)", joined.device_index, joined.model_version)
        self._joined = joined
        self._ensure_bundle(joined.bundle_sha256)

    def _next_task(self) -> RoundTask | None:
        request = serde.get_task_request(self.config.device_id, self.config.long_poll_s)
        poll = self._retry(
            "get a task",
            lambda: serde.task_poll_from_bytes(
                self._unary("GetTask", request, timeout=self.config.long_poll_s + self.config.rpc_timeout_s)
            ),
        )
        self._mode = poll.mode
        if poll.task is None:
            if poll.retry_after_seconds > 0:
                self._sleep(poll.retry_after_seconds)
            return None
        if poll.task.model_version != self._version:
            self._download_trainables(poll.task.model_version)
            if poll.task.model_version != self._version:
                return None  # the model moved on while downloading: ask again
        return poll.task

    def _train(self, task: RoundTask) -> tuple[DeviceResult, F32Array | None]:
        """The result to upload and, in dense and fedavg mode, its flat vector (manifest order)."""
        session, bundle, dataset = self._session, self._bundle, self.dataset
        if session is None or bundle is None or dataset is None:
            raise ClientError("no session: the bundle was not loaded")  # unreachable after join
        if self._mode == "fedavg":
            return self._train_local(task, session, bundle, dataset)
        guide = None
        if task.candidate_ratio > 1 and self._previous is not None and self._previous[0] == self._version - 1:
            guide = guide_from_versions(self._trainables, self._previous[1], session.trainable_specs)
        batch = dataset.batch(task.data_seed, task.batch_size)
        result = estimate(session, self._trainables, batch, task, guide, workspace=self._workspace)
        if self._mode == "scalar":
            return result, None
        n = bundle.manifest.num_trainable
        if sum(t.size for t in session.trainable_specs) != n:
            raise ClientError("dense mode needs a graph that takes every trainable of the bundle")
        gradient = dense_gradient(result, task, n)  # zeros when every perturbation was skipped
        return replace(result, indices=(), derivatives=()), gradient

    def _train_local(
        self, task: RoundTask, session: BundleSession, bundle: Bundle, dataset: LocalDataset
    ) -> tuple[DeviceResult, F32Array]:
        """FedAvg: train from the current trainables on local data, return the new ones flattened."""
        start = time.perf_counter()
        if bundle.manifest.kind == "ff_mlp":
            data = dataset.batch(task.data_seed, len(dataset))  # every local example, in order
            if "x" not in data or "labels" not in data:
                raise ClientError(f"an ff_mlp bundle trains on inputs 'x' and 'labels'; the dataset has {sorted(data)}")
            config = replace(self.ff_train, seed=task.data_seed & 0xFFFFFFFF)
            ff = train_ff(bundle, data["x"], data["labels"], config, trainables=self._trainables)
            losses = [v for k, v in ff.metrics.items() if k.startswith("loss_layer_")]
            trained, samples, loss = ff.trainables, int(ff.metrics["samples"]), float(np.mean(losses))
        else:
            if not hasattr(dataset, "batches"):
                raise ClientError("fedavg local training needs an ArrayDataset or TextDataset (with batches())")
            config_l = replace(self.local_train, num_perturbations=task.num_perturbations, eps=task.eps,
                               batch_size=task.batch_size, seed=task.data_seed, distribution=task.distribution,
                               difference=task.difference, candidate_ratio=1,
                               eval_examples=min(self.local_train.eval_examples, task.batch_size))
            report = train_local(session, dataset, config_l, trainables=self._trainables,  # type: ignore[arg-type]
                                 progress=False)
            finite = [v for v in report.train_losses if math.isfinite(v)]
            trained, samples = report.trainables, report.steps_done * task.batch_size
            loss = float(np.mean(finite)) if finite else math.nan
        flat = np.concatenate(
            [np.asarray(trained[t.name], dtype=np.float32).reshape(-1) for t in bundle.manifest.trainables]
        )
        result = DeviceResult(round_id=task.round_id, model_version=task.model_version, indices=(), derivatives=(),
                              num_samples=samples, loss_mean=loss, compute_seconds=time.perf_counter() - start)
        return result, flat

    def _submit(self, result: DeviceResult, vector: F32Array | None = None) -> None:
        result = result.for_upload()
        if vector is None:
            method, request = "Submit", serde.submit_request(self.config.device_id, result)
        else:
            request = serde.submit_vector_request(self.config.device_id, result, self._mode, vector)
            method = "SubmitVector"
        self.stats.uplink_bytes += len(request)
        try:
            ack = self._retry("submit", lambda: serde.submit_ack_from_bytes(self._unary(method, request)))
        except grpc.RpcError as e:
            if e.code() in _DROP_RESULT:
                self.stats.dropped += 1
                log.warning("result for round %d refused (%s): %s", result.round_id, e.code().name, e.details())
                return
            raise
        self.stats.rounds += 1
        log.info("round %d submitted%s", result.round_id, " (already accepted)" if ack.duplicate else "")

    # ------------------------------------------------------------------ downloads

    def _ensure_bundle(self, sha256: str) -> None:
        target = self.bundle_dir / f"bundle-{sha256[:16]}"
        if self._bundle is not None and self._bundle.path == target:
            return
        if not (target / "manifest.json").is_file():
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
            part = self.bundle_dir / "bundle.zip.part"

            def chunks_from(offset: int) -> Iterator[serde.DownloadChunk]:
                return self._stream("DownloadBundle", serde.download_request(self.config.device_id, offset))

            self._retry("download the bundle", lambda: resume_download(part, sha256, chunks_from))
            self.stats.bundle_downloads += 1
            try:
                extract_bundle(part, target)
            except UnsafeBundle as e:
                raise ClientError(str(e)) from e
            part.unlink()
        bundle = load_bundle(target)
        self._bundle = bundle
        self._session = BundleSession(bundle, self.session_options)
        self._workspace = EstimatorWorkspace(self._session.trainable_specs)
        if self._dataset_factory is not None:
            self.dataset = self._dataset_factory(bundle)
        self._version = -1  # fetch the aggregator's current tensors, not the bundle's initial ones

    def _download_trainables(self, wanted: int) -> None:
        def fetch() -> tuple[int, dict[str, np.ndarray]]:
            return read_trainables(self._stream("DownloadTrainables", serde.download_request(self.config.device_id)))

        version, tensors = self._retry("download the trainables", fetch)
        self.stats.trainable_downloads += 1
        session = self._session
        if session is None:
            raise ClientError("no session: the bundle was not loaded")
        session.check_trainables(tensors)
        if self._version >= 0:
            self._previous = (self._version, self._trainables)
        self._trainables, self._version = tensors, version
        if version != wanted:
            log.info("asked for model version %d, the aggregator now has %d", wanted, version)

    # ------------------------------------------------------------------ transport

    def _connection(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = _channel(self.config)
        return self._channel

    def _unary(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        call = rpc.unary_call(self._connection(), method)
        reply: bytes = call(request, timeout=timeout or self.config.rpc_timeout_s, metadata=self._metadata)
        return reply

    def _stream(self, method: str, request: bytes) -> Iterator[serde.DownloadChunk]:
        call = rpc.stream_call(self._connection(), method)
        for data in call(request, timeout=max(self.config.rpc_timeout_s, 600.0), metadata=self._metadata):
            yield serde.chunk_from_bytes(data)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying transient failures with backoff; re-join if the server forgot us."""
        attempt = 0
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and "UNKNOWN_DEVICE" in (e.details() or ""):
                    log.info("the aggregator does not know this device (restarted?); joining again")
                    self._joined = None
                    self._ensure_joined()
                elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise ClientError(f"the aggregator refused this device's token: {e.details()}") from e
                elif code not in RETRYABLE:
                    raise
                log.info("could not %s (%s: %s); retrying", what, code.name, e.details())
            except CorruptDownload as e:
                log.warning("could not %s: %s", what, e)
            attempt += 1
            self.stats.retries += 1
            if self.config.max_retries and attempt >= self.config.max_retries:
                raise ClientError(f"could not {what} after {attempt} attempts; is the aggregator reachable?")
            self._sleep(backoff_delay(attempt - 1, self.config, self._rng))

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped


def describe(stats: ClientStats) -> str:
    return ", ".join(f"{k} {v}" for k, v in vars(stats).items())


__all__: Sequence[str] = ("ClientError", "ClientStats", "DeviceClient", "DeviceClientConfig", "backoff_delay")
