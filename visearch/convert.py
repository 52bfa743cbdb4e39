"""Protobuf <-> domain conversions of the gateway and the workers, each written once: boxes, model
records (common.v1.ModelInfo <-> visearch.inference.ModelMeta), job records, stored items and
search results (visearch.searching)."""

from __future__ import annotations

from visearch.common.v1 import common_pb2
from visearch.gateway.v1 import gateway_pb2
from visearch.inference import ModelMeta
from visearch.search import Box
from visearch.searching import Detected, Detection, Embedded, Hit, SearchResult
from visearch.store import StoredObject


def box_of(b: common_pb2.BoundingBox) -> Box:
    return (b.x1, b.y1, b.x2, b.y2)


def pb_box(box) -> common_pb2.BoundingBox:
    return common_pb2.BoundingBox(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def model_meta(info: common_pb2.ModelInfo) -> ModelMeta:
    """The model record a service answered, as the store and the inference layer know it."""
    return ModelMeta(name=info.name, version=info.version, input_name="", output_name="", input_size=info.input_size,
                     dim=info.dim, metric=info.metric, architecture=info.architecture, pooling=info.pooling,
                     weights_sha256=info.weights_sha256)


def model_info_of_tag(tag: str, dim: int) -> common_pb2.ModelInfo:
    """The short record of a model known only by its tag ("name:version", as a generation keeps it)."""
    name, _, version = tag.partition(":")
    return common_pb2.ModelInfo(name=name, version=version, dim=dim)


def metadata_pb(metadata: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in metadata.items()}


def job_pb(st) -> gateway_pb2.IngestJob:
    state = gateway_pb2.JOB_STATE_DONE if st.finished else gateway_pb2.JOB_STATE_RUNNING
    return gateway_pb2.IngestJob(
        job_id=st.job_id, catalog=st.catalog, state=state, submitted=st.submitted, done=st.done, failed=st.failed,
        pending=st.pending, created_at=st.created_at, updated_at=st.updated_at, kind=st.kind, phase=st.phase,
        message=st.message, failures=[gateway_pb2.FailedItem(item_id=k, reason=v) for k, v in sorted(st.failures.items())],
        duplicates=[gateway_pb2.DuplicateItem(item_id=k, of_item_id=of, skipped=skipped)
                    for k, (of, skipped) in sorted(st.duplicates.items())])


def item_pb(item_id: str, catalog: str, model_tag: str, objs: list[StoredObject]) -> gateway_pb2.Item:
    return gateway_pb2.Item(item_id=item_id, catalog=catalog, model_version=model_tag,
                            metadata=metadata_pb(objs[0].metadata),
                            objects=[gateway_pb2.StoredObject(object_id=o.object_id, box=pb_box(o.box)) for o in objs])


# ---- search ---------------------------------------------------------------------------------
def detected_of(result) -> Detected:
    """A detection.v1 DetectResult."""
    return Detected(float(result.width), float(result.height),
                    [Detection(box_of(d.box), d.score, d.label) for d in result.detections])


def embedded_of(e) -> Embedded:
    """An embedding.v1 Embedding (its values kept as the message's own sequence)."""
    return Embedded(values=e.values, regions_query=e.regions.query)


def hit_pb(hit: Hit) -> gateway_pb2.SearchHit:
    """A search hit: the re-ranker's answer for the item (`detail`: a rerank.v1 hit) on its best object."""
    out = gateway_pb2.SearchHit(item_id=hit.item_id, score=hit.score, box=pb_box(hit.object.box),
                                metadata=metadata_pb(hit.object.metadata))
    h = hit.detail
    if h is not None:
        if h.HasField("region"):
            out.region.CopyFrom(h.region)
        out.match, out.inliers = h.match, h.inliers
        out.correspondences.extend(h.correspondences)
    return out


def search_response(result: SearchResult, model: common_pb2.ModelInfo) -> gateway_pb2.SearchResponse:
    response = gateway_pb2.SearchResponse(hits=[hit_pb(h) for h in result.hits], query_box=pb_box(result.query_box),
                                          model=model, rerank=result.method)
    for o in result.objects:
        response.objects.append(gateway_pb2.ObjectHits(query_box=pb_box(o.detection.box),
                                                       detection_score=o.detection.score, label=o.detection.label,
                                                       hits=[hit_pb(h) for h in o.hits]))
    return response
