"""The search pipeline (visearch/searching.py) in-process: a real in-memory vector store (numpy, inner
product, metadata filters), fakes only for the remote detect / embed / re-rank calls."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from visearch.errors import FailedPrecondition, InvalidArgument, NotFound
from visearch.inference import ModelMeta
from visearch.searching import (
    Detected,
    Detection,
    EmbedAnswer,
    Embedded,
    LocalCall,
    Ranked,
    Reranked,
    SearchConfig,
    SearchPipeline,
    SearchPorts,
    SearchQuery,
)
from visearch.store import Generation, StoredObject

DIM = 4
META = ModelMeta(name="embedder", version="1", input_name="", output_name="", input_size=32, dim=DIM)
GEN = Generation("shop", 1, META.tag, DIM, regions="float")
W, H = 64, 48
FULL = (0.0, 0.0, float(W), float(H))
BOX = (8.0, 8.0, 24.0, 24.0)
BOX2 = (30.0, 10.0, 60.0, 40.0)


def unit(*v) -> np.ndarray:
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


def png(w: int = W, h: int = H) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(out, "PNG")
    return out.getvalue()


class NumpyStore:
    """The SearchStore protocol over a list of objects and their vectors."""

    def __init__(self):
        self.objects: list[StoredObject] = []
        self.vectors: list[np.ndarray] = []
        self.local: dict[str, bytes] = {}
        self.searches: list[int] = []  # rows asked per search_many call

    def add(self, item_id: str, vectors: list, boxes: list | None = None, metadata: dict | None = None):
        for n, v in enumerate(vectors):
            box = (boxes or [FULL] * len(vectors))[n]
            self.objects.append(StoredObject(object_id=f"{item_id}#{n}", item_id=item_id, box=box,
                                             metadata=dict(metadata or {})))
            self.vectors.append(unit(*v))

    def read_level(self, gen):
        return "Bounded"

    def check_model(self, gen, meta):
        if gen.model_tag != meta.tag or gen.dim != meta.dim:
            raise FailedPrecondition(f"catalog holds {gen.model_tag}, the model used is {meta.tag}")

    def get_item(self, gen, item_id):
        found = [o for o in self.objects if o.item_id == item_id]
        if not found:
            raise NotFound(f"item {item_id!r} is not in catalog {gen.catalog!r}")
        return found

    def get_vectors(self, gen, object_ids, level="Strong"):
        return {o.object_id: v for o, v in zip(self.objects, self.vectors, strict=True) if o.object_id in object_ids}

    def get_local(self, gen, object_ids):
        return {o: self.local[o] for o in object_ids if o in self.local}

    def search_many(self, gen, vectors, limit, filters=None, *, level=None):
        self.searches.append(limit)
        out = []
        for q in vectors:
            q = np.asarray(q, np.float32)
            rows = [(float(v @ q), o) for o, v in zip(self.objects, self.vectors, strict=True)
                    if all(o.metadata.get(k) == val for k, val in (filters or {}).items())]
            rows.sort(key=lambda t: -t[0])
            out.append([StoredObject(o.object_id, o.item_id, o.box, o.metadata, score=s) for s, o in rows[:limit]])
        return out


class Remote:
    """Fake detection / embedding / re-rank services: boxes map to fixed vectors."""

    def __init__(self, detections=(), vectors=None, meta=META, method_used=None):
        self.detections = list(detections)
        self.vectors = vectors or {}
        self.meta = meta
        self.method_used = method_used
        self.detect_calls = 0
        self.detected = False  # the detector has answered
        self.embed_calls = []
        self.rerank_calls = []
        self.local_calls = []  # (the call, whether the detector had answered when it was made)

    async def detect(self, image, max_detections):
        self.detect_calls += 1
        self.detected = True
        return Detected(W, H, self.detections[:max_detections])

    async def embed(self, c):
        self.embed_calls.append(c)
        embs = [Embedded(values=unit(*self.vectors[box if box is not None else FULL]).tolist(),
                         regions_query=[0.5] * 3) for box in c.boxes]
        return EmbedAnswer(embs, self.meta, model=f"model {self.meta.tag}")

    async def local(self, c):
        self.local_calls.append((c, self.detected))
        return b"local of " + repr(c.box).encode()

    async def rerank(self, c):
        # "none": the candidates as they come, cut to top_k
        self.rerank_calls.append(c)
        return Reranked([Ranked(o.item_id, s, detail=c.method) for s, o in c.candidates[:c.top_k]],
                        self.method_used or c.method)

    def ports(self):
        return SearchPorts(detect=self.detect, embed=self.embed, rerank=self.rerank, local=self.local)


def run(store, remote, query, gen=GEN, **cfg):
    config = SearchConfig(**{"query_objects": "both", "rerank_default": "none", "rerank_candidates": 10, **cfg})
    return asyncio.run(SearchPipeline(store, config).search(query, gen, remote.ports()))


@pytest.fixture
def store():
    s = NumpyStore()
    s.add("red", [(1, 0, 0, 0)], metadata={"shelf": "a"})
    s.add("green", [(0, 1, 0, 0), (0.9, 0.1, 0, 0)], boxes=[FULL, BOX], metadata={"shelf": "b"})
    s.add("blue", [(0, 0, 1, 0)], metadata={"shelf": "a"})
    s.add("mixed", [(0.7, 0.7, 0, 0)], metadata={"shelf": "b"})
    return s


def ids(hits):
    return [h.item_id for h in hits]


def test_full_policy_searches_the_full_frame_without_detection(store):
    remote = Remote(vectors={FULL: (1, 0, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=3), query_objects="full")
    assert remote.detect_calls == 0
    assert res.query_box == FULL and res.method == "none" and res.model == "model embedder:1"
    # dedup by item: green's crop (0.9, 0.1) scores above mixed but green appears once, at its best object
    assert ids(res.hits) == ["red", "green", "mixed"]
    assert res.hits[1].object.object_id == "green#1" and res.hits[1].object.box == BOX
    assert res.hits[0].score == pytest.approx(1.0)
    assert [c.boxes for c in remote.embed_calls] == [[None]]


def test_full_frame_flag_forces_full(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "x")], vectors={FULL: (0, 0, 1, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=1, full_frame=True), query_objects="best")
    assert remote.detect_calls == 0 and ids(res.hits) == ["blue"]


def test_best_policy_searches_the_best_box(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "bottle"), Detection(BOX2, 0.5, "can")],
                    vectors={BOX: (0, 0, 1, 0), BOX2: (0, 1, 0, 0), FULL: (1, 0, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=2), query_objects="best")
    assert res.query_box == BOX and ids(res.hits)[0] == "blue"
    assert [c.boxes for c in remote.embed_calls] == [[BOX]]


def test_best_policy_without_detections_is_the_full_frame(store):
    remote = Remote(vectors={FULL: (0, 1, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=1), query_objects="best")
    assert res.query_box == FULL and ids(res.hits) == ["green"]
    assert [c.boxes for c in remote.embed_calls] == [[None]]


def test_both_policy_keeps_each_items_best_view_and_the_lead(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "bottle")], vectors={BOX: (0, 0, 1, 0), FULL: (0.9, 0.1, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=4), query_objects="both")
    # the full frame is embedded on its own (while the detector runs), then the best box
    assert [c.boxes for c in remote.embed_calls] == [[None], [BOX]]
    # blue matches the box exactly (1.0) and leads; red and green's crop match the full frame
    assert res.query_box == BOX and ids(res.hits)[0] == "blue"
    assert set(ids(res.hits)) == {"blue", "red", "green", "mixed"} and len(res.hits) == 4
    assert remote.rerank_calls[0].vector == pytest.approx(unit(0, 0, 1, 0).tolist())


def test_both_policy_query_crop_margin_favours_the_full_frame(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "bottle")], vectors={BOX: (0, 0, 1, 0), FULL: (1, 0, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=2), query_crop_margin=0.5)
    scores = {h.item_id: h.score for h in res.hits}
    assert ids(res.hits) == ["red", "green"]  # blue's 1.0 counts 0.5 through the crop
    assert scores["red"] == pytest.approx(1.0)


def test_catalog_crop_margin_counts_detected_objects_less(store):
    remote = Remote(vectors={FULL: (0.5, 0.5, 0, 0)})
    for margin, best in ((0.0, "green#1"), (0.3, "green#0")):  # the crop loses its lead by the margin
        res = run(store, remote, SearchQuery(image=png(), top_k=4), query_objects="full", catalog_crop_margin=margin)
        assert next(h for h in res.hits if h.item_id == "green").object.object_id == best


def test_top_k_and_filters(store):
    remote = Remote(vectors={FULL: (1, 0, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=1), query_objects="full")
    assert ids(res.hits) == ["red"]
    res = run(store, remote, SearchQuery(image=png(), top_k=10, filters={"shelf": "b"}), query_objects="full")
    assert ids(res.hits) == ["green", "mixed"]
    assert all(h.object.metadata["shelf"] == "b" for h in res.hits)


def test_more_rows_are_asked_while_items_are_short():
    store = NumpyStore()
    store.add("many", [(1, 0, 0, 0)] * 8, boxes=[(float(i), 0.0, 10.0, 10.0) for i in range(8)])
    store.add("other", [(0.5, 0.5, 0, 0)])
    remote = Remote(vectors={FULL: (1, 0, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=2), query_objects="full", rerank_candidates=1)
    assert store.searches == [4, 16]  # first_rows(2, 1) = 4 rows held one item: 4x more
    assert ids(res.hits) == ["many", "other"]


def test_per_object_searches_each_detection(store):
    dets = [Detection(BOX, 0.9, "bottle"), Detection(BOX2, 0.4, "can")]
    remote = Remote(detections=dets, vectors={BOX: (0, 0, 1, 0), BOX2: (0, 1, 0, 0), FULL: (1, 0, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=1, per_object=True), query_objects="full")
    assert remote.detect_calls == 1
    assert res.query_box == FULL and ids(res.hits) == ["red"]
    assert [(o.detection.label, ids(o.hits)) for o in res.objects] == [("bottle", ["blue"]), ("can", ["green"])]


def test_search_by_item_leaves_the_item_out(store):
    remote = Remote()
    res = run(store, remote, SearchQuery(item_id="green", top_k=2), query_objects="full", rerank_default="qe")
    assert remote.embed_calls == [] and remote.detect_calls == 0
    assert res.model is None and res.method == "qe" and res.query_box == FULL
    assert "green" not in ids(res.hits) and ids(res.hits)[0] == "mixed"


def test_search_by_item_verify_uses_its_stored_local_features(store):
    store.local["green#0"] = b"feats"
    remote = Remote()
    run(store, remote, SearchQuery(item_id="green", top_k=2, correspondences=True), query_objects="full",
        rerank_default="verify")
    local = remote.rerank_calls[0].local
    assert local.features == b"feats" and (local.width, local.height) == (W, H) and local.correspondences


def test_verify_takes_the_full_frames_local_features_once_the_detector_has_answered(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "bottle")], vectors={BOX: (0, 0, 1, 0), FULL: (1, 0, 0, 0)})
    run(store, remote, SearchQuery(image=png(), top_k=2, rerank="verify"))
    # One extraction, of the full frame, asked when the detector has answered (beside the box's forward)
    assert remote.local_calls == [(LocalCall(png(), None, "1"), True)]
    assert remote.rerank_calls[0].local.features == b"local of None"
    assert (remote.rerank_calls[0].local.width, remote.rerank_calls[0].local.height) == (W, H)


def test_verify_without_the_full_frame_takes_the_lead_views_features(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "bottle")], vectors={BOX: (0, 0, 1, 0), FULL: (1, 0, 0, 0)})
    run(store, remote, SearchQuery(image=png(), top_k=2, rerank="verify"), query_objects="best")
    assert remote.local_calls == [(LocalCall(png(), BOX, "1"), True)]
    local = remote.rerank_calls[0].local
    assert local.features == b"local of " + repr(BOX).encode() and (local.width, local.height) == (16.0, 16.0)


def test_verify_of_a_full_frame_query_extracts_beside_its_only_forward(store):
    remote = Remote(vectors={FULL: (1, 0, 0, 0)})
    run(store, remote, SearchQuery(image=png(), top_k=2, rerank="verify", full_frame=True))
    assert remote.detect_calls == 0 and remote.local_calls == [(LocalCall(png(), None, "1"), False)]
    assert [c.boxes for c in remote.embed_calls] == [[None]]


def test_other_methods_extract_no_local_features(store):
    remote = Remote(detections=[Detection(BOX, 0.9, "bottle")], vectors={BOX: (0, 0, 1, 0), FULL: (1, 0, 0, 0)})
    run(store, remote, SearchQuery(image=png(), top_k=2, rerank="qe"))
    assert remote.local_calls == [] and remote.rerank_calls[0].local.features == b""


def test_region_methods_fetch_regions_and_need_stored_ones(store):
    remote = Remote(vectors={FULL: (1, 0, 0, 0)})
    run(store, remote, SearchQuery(image=png(), top_k=1, rerank="regions"), query_objects="full")
    assert remote.embed_calls[0].regions and remote.rerank_calls[0].query_region == [0.5] * 3
    off = Generation("shop", 1, META.tag, DIM, regions="off")
    with pytest.raises(FailedPrecondition, match="stores no regions"):
        run(store, remote, SearchQuery(image=png(), rerank="regions"), gen=off)
    with pytest.raises(FailedPrecondition, match="item_id"):
        run(store, remote, SearchQuery(item_id="red", rerank="regions"))


def test_unknown_method_fails_before_any_call(store):
    remote = Remote(vectors={FULL: (1, 0, 0, 0)})
    with pytest.raises(InvalidArgument, match="not available"):
        run(store, remote, SearchQuery(image=png(), rerank="magic"))
    assert remote.detect_calls == 0 and remote.embed_calls == []


def test_another_model_is_refused(store):
    other = ModelMeta(name="embedder", version="2", input_name="", output_name="", input_size=32, dim=DIM)
    remote = Remote(vectors={FULL: (1, 0, 0, 0)}, meta=other)
    with pytest.raises(FailedPrecondition, match="embedder:2"):
        run(store, remote, SearchQuery(image=png()), query_objects="full")
    assert remote.embed_calls[0].model_version == "1"  # asked of the generation's model version


def test_detection_failure_cancels_the_full_frame():
    class Down(Remote):
        async def detect(self, image, max_detections):
            await asyncio.sleep(0)
            raise RuntimeError("detection down")

    remote = Down(vectors={FULL: (1, 0, 0, 0)})
    with pytest.raises(RuntimeError, match="detection down"):
        run(NumpyStore(), remote, SearchQuery(image=png()), query_objects="both")


def test_the_boxes_and_the_local_features_go_out_while_the_full_frame_still_runs(store):
    # The full frame's call answers only once the box's call and the extraction have been made: a
    # pipeline that waited for the full frame before either would time out.
    class Slow(Remote):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.box_called = asyncio.Event()
            self.local_called = asyncio.Event()

        async def embed(self, c):
            if c.boxes == [None]:
                await asyncio.wait_for(self.box_called.wait(), 5.0)
                await asyncio.wait_for(self.local_called.wait(), 5.0)
            else:
                self.box_called.set()
            return await super().embed(c)

        async def local(self, c):
            self.local_called.set()
            return await super().local(c)

    remote = Slow([Detection(BOX, 0.9, "carton")], {BOX: (0.9, 0.1, 0, 0), FULL: (0, 0, 1, 0)})
    res = run(store, remote, SearchQuery(image=png()), rerank_default="verify")
    # (the full frame's call is recorded last: it answered last)
    assert [c.boxes for c in remote.embed_calls] == [[BOX], [None]]
    assert remote.rerank_calls[0].local.features == b"local of None"
    assert res.hits


def test_the_full_frame_is_searched_while_the_box_is_embedded(store):
    # The box's forward answers only once the full frame's rows have been asked for: a pipeline that
    # searched the views together, after both forwards, would time out. The answer is the same.
    class Watched(NumpyStore):
        def __init__(self):
            super().__init__()
            self.views: list[int] = []  # vectors per search_many call
            self.searched = threading.Event()

        def search_many(self, gen, vectors, limit, filters=None, *, level=None):
            self.views.append(len(vectors))
            self.searched.set()
            return super().search_many(gen, vectors, limit, filters, level=level)

    class SlowBox(Remote):
        async def embed(self, c):
            if c.boxes == [BOX]:
                for _ in range(500):
                    if watched.searched.is_set():
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise TimeoutError("the full frame was not searched before the box's forward answered")
            return await super().embed(c)

    watched = Watched()
    watched.objects, watched.vectors = store.objects, store.vectors
    vectors = {BOX: (0, 0, 1, 0), FULL: (0.9, 0.1, 0, 0)}
    res = run(watched, SlowBox([Detection(BOX, 0.9, "bottle")], vectors), SearchQuery(image=png(), top_k=4))
    assert watched.views == [1, 1] and watched.searches == [20, 20]  # the full frame's rows, then the box's
    together = run(store, Remote([Detection(BOX, 0.9, "bottle")], vectors), SearchQuery(image=png(), top_k=4))
    assert [(h.item_id, h.score) for h in res.hits] == [(h.item_id, h.score) for h in together.hits]
    assert res.query_box == together.query_box == BOX


def test_a_second_round_asks_for_every_views_rows():
    store = NumpyStore()
    store.add("many", [(1, 0, 0, 0)] * 8, boxes=[(float(i), 0.0, 10.0, 10.0) for i in range(8)])
    store.add("other", [(0.5, 0.5, 0, 0)])
    remote = Remote([Detection(BOX, 0.9, "bottle")], {BOX: (1, 0, 0, 0), FULL: (1, 0.1, 0, 0)})
    res = run(store, remote, SearchQuery(image=png(), top_k=2), rerank_candidates=1)
    assert store.searches == [4, 4, 16]  # the full frame's first rows, the box's, then both views at 4x
    assert ids(res.hits) == ["many", "other"]
    store.searches.clear()
    late = run(store, remote, SearchQuery(image=png(), top_k=2), rerank_candidates=1, early_full_frame_search=False)
    assert store.searches == [4, 16]  # off: one call for both views, after both forwards
    assert [(h.item_id, h.score) for h in late.hits] == [(h.item_id, h.score) for h in res.hits]


def test_a_failing_extraction_cancels_the_forwards(store):
    class Failing(Remote):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.cancelled = 0

        async def embed(self, c):
            try:
                await asyncio.sleep(5.0)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        async def local(self, c):
            raise RuntimeError("extraction failed")

    remote = Failing([Detection(BOX, 0.9, "carton")], {})
    config = SearchConfig(query_objects="both", rerank_default="verify", rerank_candidates=10)

    async def search_then_look() -> None:
        with pytest.raises(RuntimeError, match="extraction failed"):
            await asyncio.wait_for(SearchPipeline(store, config).search(SearchQuery(image=png()), GEN, remote.ports()),
                                   4.0)
        await asyncio.sleep(0)
        assert remote.cancelled == 2  # the full frame's forward and the box's
        assert asyncio.all_tasks() == {asyncio.current_task()}, "no call left running"

    asyncio.run(search_then_look())


def test_a_failing_full_frame_cancels_the_boxes_call(store):
    class Failing(Remote):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.box_cancelled = False

        async def embed(self, c):
            self.embed_calls.append(c)
            if c.boxes == [None]:
                await asyncio.sleep(0.01)
                raise RuntimeError("embedding down")
            try:
                await asyncio.sleep(5.0)
            except asyncio.CancelledError:
                self.box_cancelled = True
                raise

    remote = Failing([Detection(BOX, 0.9, "carton")], {})
    config = SearchConfig(query_objects="both", rerank_default="none", rerank_candidates=10)

    async def search_then_look() -> None:
        with pytest.raises(RuntimeError, match="embedding down"):
            await SearchPipeline(store, config).search(SearchQuery(image=png()), GEN, remote.ports())
        await asyncio.sleep(0)  # the cancelled call runs its handler (asyncio.run would cancel it only at its end)
        assert remote.box_cancelled
        assert asyncio.all_tasks() == {asyncio.current_task()}, "no call left running"

    asyncio.run(search_then_look())


def test_undecodable_image_under_full_policy():
    with pytest.raises(InvalidArgument, match="query image"):
        run(NumpyStore(), Remote(), SearchQuery(image=b"not an image"), query_objects="full")


def test_conversions_to_protobuf():
    from visearch import convert
    from visearch.common.v1 import common_pb2
    from visearch.rerank.v1 import rerank_pb2
    from visearch.searching import Hit, ObjectResult, SearchResult

    info = common_pb2.ModelInfo(name="embedder", version="3", input_size=320, dim=8, metric="ip", pooling="gem")
    meta = convert.model_meta(info)
    assert (meta.tag, meta.dim, meta.input_size, meta.pooling) == ("embedder:3", 8, 320, "gem")
    assert convert.model_info_of_tag("embedder:3", 8) == common_pb2.ModelInfo(name="embedder", version="3", dim=8)
    assert convert.box_of(convert.pb_box(BOX)) == BOX

    obj = StoredObject("a#1", "a", BOX, {"shelf": 2}, score=0.5)
    detail = rerank_pb2.RerankedHit(item_id="a", score=0.9, region=convert.pb_box(BOX2), match=True, inliers=12)
    result = SearchResult(hits=[Hit("a", 0.9, obj, detail), Hit("b", 0.4, obj)], query_box=FULL, method="verify",
                          objects=[ObjectResult(Detection(BOX2, 0.75, "can"), [Hit("a", 0.3, obj)])])
    res = convert.search_response(result, info)
    assert res.rerank == "verify" and res.model == info and convert.box_of(res.query_box) == FULL
    first = res.hits[0]
    assert (first.item_id, first.match, first.inliers, dict(first.metadata)) == ("a", True, 12, {"shelf": "2"})
    assert convert.box_of(first.region) == BOX2 and convert.box_of(first.box) == BOX
    assert not res.hits[1].HasField("region") and res.hits[1].score == pytest.approx(0.4)
    assert [(o.label, o.detection_score, [h.item_id for h in o.hits]) for o in res.objects] == [("can", 0.75, ["a"])]


def test_batch_calls_stop_waiting_for_a_finished_search():
    """A BatchSearch's merged calls wait for every search still running, not for one that has
    finished (a bad image fails before it calls anything): with a window far longer than the test,
    the two live searches' calls still go out at once, as one merged call."""
    from services.gateway.coalesce import Coalescer

    sent = []

    async def send(key, requests, timeout):
        sent.append(list(requests))
        return [f"answer {r}" for r in requests]

    async def run():
        co = Coalescer(send, expected=3, window=30.0, cap=30.0)
        first = co("k", "a", 1.0)
        await asyncio.sleep(0.01)
        co.leave()  # the third search failed: the two others are all there is to wait for
        answers = await asyncio.wait_for(asyncio.gather(first, co("k", "b", 1.0)), 5)
        # Once one search leaves with a call pending from every live search, it goes out at once.
        lone = Coalescer(send, expected=2, window=30.0, cap=30.0)
        pending = lone("k", "c", 1.0)
        await asyncio.sleep(0.01)
        lone.leave()
        return answers, await asyncio.wait_for(pending, 5)

    answers, lone = asyncio.run(run())
    assert answers == ["answer a", "answer b"] and lone == "answer c"
    assert sent == [["a", "b"], ["c"]]


def test_a_call_cancelled_before_its_merge_is_not_made():
    """A search that stops waiting for a call (its other call failed) leaves it in the batch: it is
    not sent, merged or one by one."""
    from services.gateway.coalesce import Coalescer

    sent = []

    async def send(key, requests, timeout):
        sent.append(list(requests))
        if len(requests) > 1:
            raise RuntimeError("one of them is bad")
        return [f"answer {r}" for r in requests]

    async def run():
        co = Coalescer(send, expected=3, window=30.0, cap=30.0)
        gone = co("k", "gone", 1.0)
        gone.cancel()
        return await asyncio.wait_for(asyncio.gather(co("k", "a", 1.0), co("k", "b", 1.0)), 5)

    assert asyncio.run(run()) == ["answer a", "answer b"]
    assert sent == [["a", "b"], ["a"], ["b"]]  # merged, failed, then one by one: never "gone"
