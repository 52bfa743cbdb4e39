from visearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DONE: JobState

class SearchRequest(_message.Message):
    __slots__ = ("catalog", "image", "top_k", "filters", "rerank", "full_frame", "per_object", "correspondences", "item_id")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    FULL_FRAME_FIELD_NUMBER: _ClassVar[int]
    PER_OBJECT_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    image: bytes
    top_k: int
    filters: _containers.ScalarMap[str, str]
    rerank: str
    full_frame: bool
    per_object: bool
    correspondences: bool
    item_id: str
    def __init__(self, catalog: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Mapping[str, str]] = ..., rerank: _Optional[str] = ..., full_frame: _Optional[bool] = ..., per_object: _Optional[bool] = ..., correspondences: _Optional[bool] = ..., item_id: _Optional[str] = ...) -> None: ...

class BatchSearchRequest(_message.Message):
    __slots__ = ("searches",)
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    searches: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, searches: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class SearchError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class BatchSearchResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: SearchResponse
    error: SearchError
    def __init__(self, response: _Optional[_Union[SearchResponse, _Mapping]] = ..., error: _Optional[_Union[SearchError, _Mapping]] = ...) -> None: ...

class BatchSearchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchSearchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchSearchResult, _Mapping]]] = ...) -> None: ...

class ObjectHits(_message.Message):
    __slots__ = ("query_box", "detection_score", "label", "hits")
    QUERY_BOX_FIELD_NUMBER: _ClassVar[int]
    DETECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    query_box: _common_pb2.BoundingBox
    detection_score: float
    label: str
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, query_box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., detection_score: _Optional[float] = ..., label: _Optional[str] = ..., hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("item_id", "score", "box", "metadata", "region", "match", "inliers", "correspondences")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    CORRESPONDENCES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    box: _common_pb2.BoundingBox
    metadata: _containers.ScalarMap[str, str]
    region: _common_pb2.BoundingBox
    match: bool
    inliers: int
    correspondences: _containers.RepeatedCompositeFieldContainer[_common_pb2.Correspondence]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., region: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., match: _Optional[bool] = ..., inliers: _Optional[int] = ..., correspondences: _Optional[_Iterable[_Union[_common_pb2.Correspondence, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "query_box", "model", "rerank", "objects")
    HITS_FIELD_NUMBER: _ClassVar[int]
    QUERY_BOX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    query_box: _common_pb2.BoundingBox
    model: _common_pb2.ModelInfo
    rerank: str
    objects: _containers.RepeatedCompositeFieldContainer[ObjectHits]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., query_box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., rerank: _Optional[str] = ..., objects: _Optional[_Iterable[_Union[ObjectHits, _Mapping]]] = ...) -> None: ...

class IngestItem(_message.Message):
    __slots__ = ("item_id", "image", "uri", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    image: bytes
    uri: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, item_id: _Optional[str] = ..., image: _Optional[bytes] = ..., uri: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IngestItemsRequest(_message.Message):
    __slots__ = ("catalog", "items", "job_id", "duplicates", "storage")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    items: _containers.RepeatedCompositeFieldContainer[IngestItem]
    job_id: str
    duplicates: str
    storage: CatalogStorage
    def __init__(self, catalog: _Optional[str] = ..., items: _Optional[_Iterable[_Union[IngestItem, _Mapping]]] = ..., job_id: _Optional[str] = ..., duplicates: _Optional[str] = ..., storage: _Optional[_Union[CatalogStorage, _Mapping]] = ...) -> None: ...

class CatalogStorage(_message.Message):
    __slots__ = ("regions", "index")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    regions: str
    index: str
    def __init__(self, regions: _Optional[str] = ..., index: _Optional[str] = ...) -> None: ...

class IngestItemsResponse(_message.Message):
    __slots__ = ("job_id", "accepted")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    accepted: int
    def __init__(self, job_id: _Optional[str] = ..., accepted: _Optional[int] = ...) -> None: ...

class GetIngestJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class FailedItem(_message.Message):
    __slots__ = ("item_id", "reason")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    reason: str
    def __init__(self, item_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class IngestJob(_message.Message):
    __slots__ = ("job_id", "catalog", "state", "submitted", "done", "failed", "pending", "failures", "created_at", "updated_at", "kind", "phase", "message", "duplicates")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    catalog: str
    state: JobState
    submitted: int
    done: int
    failed: int
    pending: int
    failures: _containers.RepeatedCompositeFieldContainer[FailedItem]
    created_at: float
    updated_at: float
    kind: str
    phase: str
    message: str
    duplicates: _containers.RepeatedCompositeFieldContainer[DuplicateItem]
    def __init__(self, job_id: _Optional[str] = ..., catalog: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., submitted: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ..., pending: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[FailedItem, _Mapping]]] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., kind: _Optional[str] = ..., phase: _Optional[str] = ..., message: _Optional[str] = ..., duplicates: _Optional[_Iterable[_Union[DuplicateItem, _Mapping]]] = ...) -> None: ...

class DuplicateItem(_message.Message):
    __slots__ = ("item_id", "of_item_id", "skipped")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    OF_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    of_item_id: str
    skipped: bool
    def __init__(self, item_id: _Optional[str] = ..., of_item_id: _Optional[str] = ..., skipped: _Optional[bool] = ...) -> None: ...

class GetIngestJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: IngestJob
    def __init__(self, job: _Optional[_Union[IngestJob, _Mapping]] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("catalog", "item_ids")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, catalog: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("catalog", "item_id")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    item_id: str
    def __init__(self, catalog: _Optional[str] = ..., item_id: _Optional[str] = ...) -> None: ...

class StoredObject(_message.Message):
    __slots__ = ("object_id", "box")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    box: _common_pb2.BoundingBox
    def __init__(self, object_id: _Optional[str] = ..., box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "catalog", "metadata", "objects", "model_version")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    catalog: str
    metadata: _containers.ScalarMap[str, str]
    objects: _containers.RepeatedCompositeFieldContainer[StoredObject]
    model_version: str
    def __init__(self, item_id: _Optional[str] = ..., catalog: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., objects: _Optional[_Iterable[_Union[StoredObject, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: Item
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("catalog", "page_size", "page_token")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    page_size: int
    page_token: str
    def __init__(self, catalog: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token", "total_items")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    next_page_token: str
    total_items: int
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_items: _Optional[int] = ...) -> None: ...

class ListCatalogsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Catalog(_message.Message):
    __slots__ = ("name", "objects", "model", "generation", "building_generation", "building_model", "building_objects", "storage", "memory_bytes_per_object", "bytes_per_object")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUILDING_GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUILDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    BUILDING_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_PER_OBJECT_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_OBJECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    objects: int
    model: _common_pb2.ModelInfo
    generation: int
    building_generation: int
    building_model: _common_pb2.ModelInfo
    building_objects: int
    storage: CatalogStorage
    memory_bytes_per_object: int
    bytes_per_object: int
    def __init__(self, name: _Optional[str] = ..., objects: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., generation: _Optional[int] = ..., building_generation: _Optional[int] = ..., building_model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., building_objects: _Optional[int] = ..., storage: _Optional[_Union[CatalogStorage, _Mapping]] = ..., memory_bytes_per_object: _Optional[int] = ..., bytes_per_object: _Optional[int] = ...) -> None: ...

class ReembedCatalogRequest(_message.Message):
    __slots__ = ("catalog", "model_version")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    model_version: str
    def __init__(self, catalog: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class AdaptCatalogRequest(_message.Message):
    __slots__ = ("catalog", "views", "max_objects")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    MAX_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    views: int
    max_objects: int
    def __init__(self, catalog: _Optional[str] = ..., views: _Optional[int] = ..., max_objects: _Optional[int] = ...) -> None: ...

class AdaptCatalogResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ReembedCatalogResponse(_message.Message):
    __slots__ = ("job_id", "generation", "model")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    model: _common_pb2.ModelInfo
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class ListCatalogsResponse(_message.Message):
    __slots__ = ("catalogs",)
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[Catalog]
    def __init__(self, catalogs: _Optional[_Iterable[_Union[Catalog, _Mapping]]] = ...) -> None: ...

class ListIngestJobsRequest(_message.Message):
    __slots__ = ("catalog", "limit")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    limit: int
    def __init__(self, catalog: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListIngestJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[IngestJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[IngestJob, _Mapping]]] = ...) -> None: ...

class GetItemImageRequest(_message.Message):
    __slots__ = ("catalog", "item_id", "max_side")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    item_id: str
    max_side: int
    def __init__(self, catalog: _Optional[str] = ..., item_id: _Optional[str] = ..., max_side: _Optional[int] = ...) -> None: ...

class GetItemImageResponse(_message.Message):
    __slots__ = ("image", "content_type", "width", "height", "sent_width", "sent_height")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SENT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    content_type: str
    width: int
    height: int
    sent_width: int
    sent_height: int
    def __init__(self, image: _Optional[bytes] = ..., content_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., sent_width: _Optional[int] = ..., sent_height: _Optional[int] = ...) -> None: ...

class ExportCatalogRequest(_message.Message):
    __slots__ = ("catalog", "batch_size")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    batch_size: int
    def __init__(self, catalog: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...

class CatalogHeader(_message.Message):
    __slots__ = ("catalog", "model", "storage", "objects", "generation", "exported_at", "format")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    model: _common_pb2.ModelInfo
    storage: CatalogStorage
    objects: int
    generation: int
    exported_at: float
    format: str
    def __init__(self, catalog: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., storage: _Optional[_Union[CatalogStorage, _Mapping]] = ..., objects: _Optional[int] = ..., generation: _Optional[int] = ..., exported_at: _Optional[float] = ..., format: _Optional[str] = ...) -> None: ...

class ObjectRecord(_message.Message):
    __slots__ = ("object_id", "item_id", "vector", "box", "metadata", "source", "stamp", "local_features", "region_features", "region_boxes", "region_count")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REGION_FEATURES_FIELD_NUMBER: _ClassVar[int]
    REGION_BOXES_FIELD_NUMBER: _ClassVar[int]
    REGION_COUNT_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    item_id: str
    vector: bytes
    box: _common_pb2.BoundingBox
    metadata: _containers.ScalarMap[str, str]
    source: str
    stamp: int
    local_features: bytes
    region_features: bytes
    region_boxes: bytes
    region_count: int
    def __init__(self, object_id: _Optional[str] = ..., item_id: _Optional[str] = ..., vector: _Optional[bytes] = ..., box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., source: _Optional[str] = ..., stamp: _Optional[int] = ..., local_features: _Optional[bytes] = ..., region_features: _Optional[bytes] = ..., region_boxes: _Optional[bytes] = ..., region_count: _Optional[int] = ...) -> None: ...

class ObjectBatch(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[ObjectRecord]
    def __init__(self, objects: _Optional[_Iterable[_Union[ObjectRecord, _Mapping]]] = ...) -> None: ...

class CatalogTrailer(_message.Message):
    __slots__ = ("objects", "items")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    objects: int
    items: int
    def __init__(self, objects: _Optional[int] = ..., items: _Optional[int] = ...) -> None: ...

class CatalogRecord(_message.Message):
    __slots__ = ("header", "batch", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: CatalogHeader
    batch: ObjectBatch
    trailer: CatalogTrailer
    def __init__(self, header: _Optional[_Union[CatalogHeader, _Mapping]] = ..., batch: _Optional[_Union[ObjectBatch, _Mapping]] = ..., trailer: _Optional[_Union[CatalogTrailer, _Mapping]] = ...) -> None: ...

class ImportCatalogResponse(_message.Message):
    __slots__ = ("catalog", "objects", "items", "generation", "model")
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    objects: int
    items: int
    generation: int
    model: _common_pb2.ModelInfo
    def __init__(self, catalog: _Optional[str] = ..., objects: _Optional[int] = ..., items: _Optional[int] = ..., generation: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class FindDuplicatesRequest(_message.Message):
    __slots__ = ("catalog",)
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    catalog: str
    def __init__(self, catalog: _Optional[str] = ...) -> None: ...

class DuplicateGroup(_message.Message):
    __slots__ = ("item_ids", "min_ncc")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_NCC_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    min_ncc: float
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., min_ncc: _Optional[float] = ...) -> None: ...

class FindDuplicatesResponse(_message.Message):
    __slots__ = ("groups", "items", "pairs_checked", "unreadable")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[DuplicateGroup]
    items: int
    pairs_checked: int
    unreadable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, groups: _Optional[_Iterable[_Union[DuplicateGroup, _Mapping]]] = ..., items: _Optional[int] = ..., pairs_checked: _Optional[int] = ..., unreadable: _Optional[_Iterable[str]] = ...) -> None: ...
