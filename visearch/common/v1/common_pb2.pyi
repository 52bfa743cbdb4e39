from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BoundingBox(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "dim", "metric", "architecture", "pooling", "input_size", "weights_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    dim: int
    metric: str
    architecture: str
    pooling: str
    input_size: int
    weights_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., architecture: _Optional[str] = ..., pooling: _Optional[str] = ..., input_size: _Optional[int] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class RegionSet(_message.Message):
    __slots__ = ("dim", "features", "boxes", "query")
    DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    dim: int
    features: _containers.RepeatedScalarFieldContainer[float]
    boxes: _containers.RepeatedCompositeFieldContainer[BoundingBox]
    query: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, dim: _Optional[int] = ..., features: _Optional[_Iterable[float]] = ..., boxes: _Optional[_Iterable[_Union[BoundingBox, _Mapping]]] = ..., query: _Optional[_Iterable[float]] = ...) -> None: ...

class Correspondence(_message.Message):
    __slots__ = ("query_x", "query_y", "x", "y")
    QUERY_X_FIELD_NUMBER: _ClassVar[int]
    QUERY_Y_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    query_x: float
    query_y: float
    x: float
    y: float
    def __init__(self, query_x: _Optional[float] = ..., query_y: _Optional[float] = ..., x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...
