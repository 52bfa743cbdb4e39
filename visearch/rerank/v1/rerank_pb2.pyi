from visearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Candidate(_message.Message):
    __slots__ = ("item_id", "object_id", "score", "box")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    object_id: str
    score: float
    box: _common_pb2.BoundingBox
    def __init__(self, item_id: _Optional[str] = ..., object_id: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("catalog", "query_embedding", "candidates", "method", "top_k", "query_region", "generation", "consistency", "query_local", "correspondences", "query_width", "query_height")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    QUERY_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    QUERY_REGION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    QUERY_LOCAL_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    QUERY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    QUERY_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    query_embedding: _containers.RepeatedScalarFieldContainer[float]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    method: str
    top_k: int
    query_region: _containers.RepeatedScalarFieldContainer[float]
    generation: int
    consistency: str
    query_local: bytes
    correspondences: bool
    query_width: int
    query_height: int
    def __init__(self, catalog: _Optional[str] = ..., query_embedding: _Optional[_Iterable[float]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., method: _Optional[str] = ..., top_k: _Optional[int] = ..., query_region: _Optional[_Iterable[float]] = ..., generation: _Optional[int] = ..., consistency: _Optional[str] = ..., query_local: _Optional[bytes] = ..., correspondences: _Optional[bool] = ..., query_width: _Optional[int] = ..., query_height: _Optional[int] = ...) -> None: ...

class RerankedHit(_message.Message):
    __slots__ = ("item_id", "object_id", "score", "region", "match", "inliers", "correspondences")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    object_id: str
    score: float
    region: _common_pb2.BoundingBox
    match: bool
    inliers: int
    correspondences: _containers.RepeatedCompositeFieldContainer[_common_pb2.Correspondence]
    def __init__(self, item_id: _Optional[str] = ..., object_id: _Optional[str] = ..., score: _Optional[float] = ..., region: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., match: _Optional[bool] = ..., inliers: _Optional[int] = ..., correspondences: _Optional[_Iterable[_Union[_common_pb2.Correspondence, _Mapping]]] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("hits", "method")
    HITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[RerankedHit]
    method: str
    def __init__(self, hits: _Optional[_Iterable[_Union[RerankedHit, _Mapping]]] = ..., method: _Optional[str] = ...) -> None: ...
