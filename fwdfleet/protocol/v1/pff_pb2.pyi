from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "data", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    sha256: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class TaskRecord(_message.Message):
    __slots__ = ("node_id", "layer", "chapter", "start", "end", "wait_seconds", "input_seconds", "train_seconds", "loss", "attempt")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHAPTER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    layer: int
    chapter: int
    start: float
    end: float
    wait_seconds: float
    input_seconds: float
    train_seconds: float
    loss: float
    attempt: int
    def __init__(self, node_id: _Optional[str] = ..., layer: _Optional[int] = ..., chapter: _Optional[int] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., wait_seconds: _Optional[float] = ..., input_seconds: _Optional[float] = ..., train_seconds: _Optional[float] = ..., loss: _Optional[float] = ..., attempt: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("layer", "version", "tensors", "record")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    record: TaskRecord
    def __init__(self, layer: _Optional[int] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., record: _Optional[_Union[TaskRecord, _Mapping]] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("layer", "version", "wait_seconds")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    version: int
    wait_seconds: float
    def __init__(self, layer: _Optional[int] = ..., version: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class FetchReply(_message.Message):
    __slots__ = ("found", "tensors", "record")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    found: bool
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    record: TaskRecord
    def __init__(self, found: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., record: _Optional[_Union[TaskRecord, _Mapping]] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("node_id", "state", "layer", "chapter", "step", "total_steps", "tasks_done", "tasks_total", "time")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHAPTER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: str
    layer: int
    chapter: int
    step: int
    total_steps: int
    tasks_done: int
    tasks_total: int
    time: float
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[str] = ..., layer: _Optional[int] = ..., chapter: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., tasks_done: _Optional[int] = ..., tasks_total: _Optional[int] = ..., time: _Optional[float] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PffStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Published(_message.Message):
    __slots__ = ("layer", "version", "record")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    version: int
    record: TaskRecord
    def __init__(self, layer: _Optional[int] = ..., version: _Optional[int] = ..., record: _Optional[_Union[TaskRecord, _Mapping]] = ...) -> None: ...

class PffStatus(_message.Message):
    __slots__ = ("published", "nodes")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    published: _containers.RepeatedCompositeFieldContainer[Published]
    nodes: _containers.RepeatedCompositeFieldContainer[ProgressReport]
    def __init__(self, published: _Optional[_Iterable[_Union[Published, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[ProgressReport, _Mapping]]] = ...) -> None: ...
