from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_MODE_UNSPECIFIED: _ClassVar[UploadMode]
    UPLOAD_MODE_SCALAR: _ClassVar[UploadMode]
    UPLOAD_MODE_DENSE: _ClassVar[UploadMode]
    UPLOAD_MODE_FEDAVG: _ClassVar[UploadMode]

class Distribution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTION_UNSPECIFIED: _ClassVar[Distribution]
    DISTRIBUTION_RADEMACHER: _ClassVar[Distribution]
    DISTRIBUTION_GAUSSIAN: _ClassVar[Distribution]

class Difference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIFFERENCE_UNSPECIFIED: _ClassVar[Difference]
    DIFFERENCE_CENTRAL: _ClassVar[Difference]
    DIFFERENCE_FORWARD: _ClassVar[Difference]
UPLOAD_MODE_UNSPECIFIED: UploadMode
UPLOAD_MODE_SCALAR: UploadMode
UPLOAD_MODE_DENSE: UploadMode
UPLOAD_MODE_FEDAVG: UploadMode
DISTRIBUTION_UNSPECIFIED: Distribution
DISTRIBUTION_RADEMACHER: Distribution
DISTRIBUTION_GAUSSIAN: Distribution
DIFFERENCE_UNSPECIFIED: Difference
DIFFERENCE_CENTRAL: Difference
DIFFERENCE_FORWARD: Difference

class DeviceProfile(_message.Message):
    __slots__ = ("platform", "ram_mb", "compute_speed", "labels", "num_samples")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    RAM_MB_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SPEED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    platform: str
    ram_mb: int
    compute_speed: float
    labels: _containers.ScalarMap[str, str]
    num_samples: int
    def __init__(self, platform: _Optional[str] = ..., ram_mb: _Optional[int] = ..., compute_speed: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., num_samples: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("device_id", "profile", "protocol_version", "client_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    profile: DeviceProfile
    protocol_version: int
    client_version: str
    def __init__(self, device_id: _Optional[str] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., protocol_version: _Optional[int] = ..., client_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("device_index", "model_version", "round_id", "bundle_sha256", "bundle_size", "protocol_version", "heartbeat_interval_seconds", "mode", "mode_name")
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODE_NAME_FIELD_NUMBER: _ClassVar[int]
    device_index: int
    model_version: int
    round_id: int
    bundle_sha256: str
    bundle_size: int
    protocol_version: int
    heartbeat_interval_seconds: float
    mode: UploadMode
    mode_name: str
    def __init__(self, device_index: _Optional[int] = ..., model_version: _Optional[int] = ..., round_id: _Optional[int] = ..., bundle_sha256: _Optional[str] = ..., bundle_size: _Optional[int] = ..., protocol_version: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[float] = ..., mode: _Optional[_Union[UploadMode, str]] = ..., mode_name: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("device_id", "wait_seconds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    wait_seconds: float
    def __init__(self, device_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class RoundTask(_message.Message):
    __slots__ = ("round_id", "model_version", "round_seed", "device_index", "num_perturbations", "eps", "k_start", "distribution", "difference", "candidate_ratio", "batch_size", "data_seed", "deadline_unix", "upload_mode", "lr", "local_steps", "local_epochs", "objective", "local_mode")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    K_START_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MODE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MODE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    model_version: int
    round_seed: int
    device_index: int
    num_perturbations: int
    eps: float
    k_start: int
    distribution: Distribution
    difference: Difference
    candidate_ratio: int
    batch_size: int
    data_seed: int
    deadline_unix: float
    upload_mode: str
    lr: float
    local_steps: int
    local_epochs: int
    objective: str
    local_mode: str
    def __init__(self, round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., round_seed: _Optional[int] = ..., device_index: _Optional[int] = ..., num_perturbations: _Optional[int] = ..., eps: _Optional[float] = ..., k_start: _Optional[int] = ..., distribution: _Optional[_Union[Distribution, str]] = ..., difference: _Optional[_Union[Difference, str]] = ..., candidate_ratio: _Optional[int] = ..., batch_size: _Optional[int] = ..., data_seed: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., upload_mode: _Optional[str] = ..., lr: _Optional[float] = ..., local_steps: _Optional[int] = ..., local_epochs: _Optional[int] = ..., objective: _Optional[str] = ..., local_mode: _Optional[str] = ...) -> None: ...

class NoTask(_message.Message):
    __slots__ = ("retry_after_seconds", "reason")
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_seconds: float
    reason: str
    def __init__(self, retry_after_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class GetTaskReply(_message.Message):
    __slots__ = ("task", "no_task", "model_version", "mode", "mode_name")
    TASK_FIELD_NUMBER: _ClassVar[int]
    NO_TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODE_NAME_FIELD_NUMBER: _ClassVar[int]
    task: RoundTask
    no_task: NoTask
    model_version: int
    mode: UploadMode
    mode_name: str
    def __init__(self, task: _Optional[_Union[RoundTask, _Mapping]] = ..., no_task: _Optional[_Union[NoTask, _Mapping]] = ..., model_version: _Optional[int] = ..., mode: _Optional[_Union[UploadMode, str]] = ..., mode_name: _Optional[str] = ...) -> None: ...

class DeviceResult(_message.Message):
    __slots__ = ("round_id", "model_version", "indices", "derivatives", "num_samples", "loss_mean", "loss_std", "skipped", "compute_seconds", "extras")
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    DERIVATIVES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_MEAN_FIELD_NUMBER: _ClassVar[int]
    LOSS_STD_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    model_version: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    derivatives: _containers.RepeatedScalarFieldContainer[float]
    num_samples: int
    loss_mean: float
    loss_std: float
    skipped: _containers.RepeatedScalarFieldContainer[int]
    compute_seconds: float
    extras: _containers.ScalarMap[str, float]
    def __init__(self, round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., derivatives: _Optional[_Iterable[float]] = ..., num_samples: _Optional[int] = ..., loss_mean: _Optional[float] = ..., loss_std: _Optional[float] = ..., skipped: _Optional[_Iterable[int]] = ..., compute_seconds: _Optional[float] = ..., extras: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("device_id", "result")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    result: DeviceResult
    def __init__(self, device_id: _Optional[str] = ..., result: _Optional[_Union[DeviceResult, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "duplicate", "round_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    round_id: int
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round_id: _Optional[int] = ...) -> None: ...

class SubmitVectorRequest(_message.Message):
    __slots__ = ("device_id", "result", "mode", "values", "num_values", "sha256", "mode_name")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODE_NAME_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    result: DeviceResult
    mode: UploadMode
    values: bytes
    num_values: int
    sha256: str
    mode_name: str
    def __init__(self, device_id: _Optional[str] = ..., result: _Optional[_Union[DeviceResult, _Mapping]] = ..., mode: _Optional[_Union[UploadMode, str]] = ..., values: _Optional[bytes] = ..., num_values: _Optional[int] = ..., sha256: _Optional[str] = ..., mode_name: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("model_version", "round_id")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    round_id: int
    def __init__(self, model_version: _Optional[int] = ..., round_id: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("device_id", "offset", "model_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    offset: int
    model_version: int
    def __init__(self, device_id: _Optional[str] = ..., offset: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256", "model_version")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    model_version: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("protocol_version", "server_version", "round_id", "model_version", "uptime_seconds", "status_json")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server_version: str
    round_id: int
    model_version: int
    uptime_seconds: float
    status_json: str
    def __init__(self, protocol_version: _Optional[int] = ..., server_version: _Optional[str] = ..., round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., status_json: _Optional[str] = ...) -> None: ...
