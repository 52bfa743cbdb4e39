from visearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedItem(_message.Message):
    __slots__ = ("image", "box")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    box: _common_pb2.BoundingBox
    def __init__(self, image: _Optional[bytes] = ..., box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("items", "regions", "model_version", "local_features", "local_limit", "local_max_side")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EmbedItem]
    regions: bool
    model_version: str
    local_features: bool
    local_limit: int
    local_max_side: int
    def __init__(self, items: _Optional[_Iterable[_Union[EmbedItem, _Mapping]]] = ..., regions: _Optional[bool] = ..., model_version: _Optional[str] = ..., local_features: _Optional[bool] = ..., local_limit: _Optional[int] = ..., local_max_side: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "regions", "local_features")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    regions: _common_pb2.RegionSet
    local_features: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., regions: _Optional[_Union[_common_pb2.RegionSet, _Mapping]] = ..., local_features: _Optional[bytes] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model: _common_pb2.ModelInfo
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ExtractLocalRequest(_message.Message):
    __slots__ = ("items", "local_limit", "local_max_side", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EmbedItem]
    local_limit: int
    local_max_side: int
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[EmbedItem, _Mapping]]] = ..., local_limit: _Optional[int] = ..., local_max_side: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class ExtractLocalResponse(_message.Message):
    __slots__ = ("local_features",)
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    local_features: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, local_features: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
