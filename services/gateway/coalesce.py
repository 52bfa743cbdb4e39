"""Calls made by the searches of one BatchSearch, merged into batched forwards.

The searches of a batch run concurrently, each through the same steps as a single search. Each
Detect, Embed or ExtractLocal call they make is held until no other came for WINDOW_SECONDS (at most CAP_SECONDS
after the first, or until every search of the batch still running has made one: a search that has
finished, a bad image's at once, makes no more calls and is not waited for) and merged with the others of the
same kind and options into one call: the services run one forward over all of their images. A
merged call that fails is made again call by call, so a bad image fails only its own search, with
its own reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from visearch.detection.v1 import detection_pb2
from visearch.embedding.v1 import embedding_pb2

WINDOW_SECONDS = 0.005  # the searches reach each step a few ms apart (their store reads run in threads)
CAP_SECONDS = 0.05


class Coalescer:
    """Merge concurrent calls with the same key: `send(key, requests, timeout)` answers them all,
    in order, with one response per request."""

    def __init__(self, send: Callable[[Hashable, list, float], Awaitable[list]], expected: int,
                 window: float = WINDOW_SECONDS, cap: float = CAP_SECONDS):
        self.send, self.expected, self.window, self.cap = send, expected, window, cap
        self.pending: list[tuple[Hashable, Any, float, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.first = 0.0
        self.merged_calls = 0

    def __call__(self, key: Hashable, request, timeout: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            self.first = loop.time()
        self.pending.append((key, request, timeout, fut))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if len(self.pending) >= self.expected:
            self.flush()
        else:  # wait for the others a little longer, never past the cap
            self.timer = loop.call_later(max(0.0, min(self.window, self.first + self.cap - loop.time())), self.flush)
        return fut

    def leave(self) -> None:
        """One search of the batch has finished and makes no more calls: the others wait for one fewer."""
        self.expected -= 1
        if self.pending and len(self.pending) >= self.expected:
            self.flush()

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        groups: dict[Hashable, list] = {}
        for entry in batch:
            groups.setdefault(entry[0], []).append(entry)
        for key, group in groups.items():
            asyncio.ensure_future(self._run(key, group))

    async def _run(self, key: Hashable, group: list) -> None:
        group = [entry for entry in group if not entry[3].done()]  # a call cancelled meanwhile is not made
        if not group:
            return
        timeout = max(t for _, _, t, _ in group)
        try:
            self.merged_calls += 1
            answers = await self.send(key, [r for _, r, _, _ in group], timeout)
        except Exception as exc:  # noqa: BLE001 - alone, a call's error is its own; merged, find whose
            if len(group) == 1:
                _settle(group[0][3], exc=exc)
                return
            for _, request, t, fut in group:  # again one by one: each search gets its own answer
                if fut.done():
                    continue
                try:
                    _settle(fut, (await self.send(key, [request], t))[0])
                except Exception as one:  # noqa: BLE001
                    _settle(fut, exc=one)
            return
        for (_, _, _, fut), answer in zip(group, answers, strict=True):
            _settle(fut, answer)


def _settle(fut: asyncio.Future, value=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _per_request(requests: list, answers: list, count: Callable[[Any], int], build: Callable[[list], Any]) -> list:
    """A merged call's answers (one per image or item, in order) handed back to the requests merged
    into it: `build` makes each request's response from its `count(request)` answers."""
    out, at = [], 0
    for r in requests:
        n = count(r)
        out.append(build(answers[at:at + n]))
        at += n
    return out


class BatchCalls:
    """The Detect, Embed and ExtractLocal calls of one batch of searches, coalesced; `split` bounds each merged
    call's message size (gateway.split_by_bytes)."""

    def __init__(self, detection, embedding, expected: int, split):
        self.detection, self.embedding, self.split = detection, embedding, split
        self._detect = Coalescer(self._send_detect, expected)
        self._embed = Coalescer(self._send_embed, expected)
        self._local = Coalescer(self._send_local, expected)

    def finished(self) -> None:
        """A search of the batch has its answer or its error (gateway BatchSearch)."""
        for c in (self._detect, self._embed, self._local):
            c.leave()

    @property
    def merged_calls(self) -> int:
        return self._detect.merged_calls + self._embed.merged_calls + self._local.merged_calls

    def detect(self, request: detection_pb2.DetectRequest, timeout: float):
        return self._detect((request.max_detections, request.min_score), request, timeout)

    def embed(self, request: embedding_pb2.EmbedRequest, timeout: float):
        key = (request.regions, request.model_version, request.local_features, request.local_limit,
               request.local_max_side)
        return self._embed(key, request, timeout)

    def extract_local(self, request: embedding_pb2.ExtractLocalRequest, timeout: float):
        return self._local((request.model_version, request.local_limit, request.local_max_side), request, timeout)

    async def _send_local(self, key, requests: list, timeout: float) -> list:
        version, local_limit, local_max_side = key
        items = [it for r in requests for it in r.items]
        feats = []
        for part in self.split(items, lambda it: len(it.image)):
            res = await self.embedding.ExtractLocal(embedding_pb2.ExtractLocalRequest(
                items=part, model_version=version, local_limit=local_limit, local_max_side=local_max_side),
                timeout=timeout)
            feats += res.local_features
        return _per_request(requests, feats, lambda r: len(r.items),
                            lambda part: embedding_pb2.ExtractLocalResponse(local_features=part))

    async def _send_detect(self, key, requests: list, timeout: float) -> list:
        max_detections, min_score = key
        images = [img for r in requests for img in r.images]
        results = []
        for part in self.split(images, len):
            res = await self.detection.Detect(detection_pb2.DetectRequest(images=part, max_detections=max_detections,
                                                                          min_score=min_score), timeout=timeout)
            results += res.results
        return _per_request(requests, results, lambda r: len(r.images),
                            lambda part: detection_pb2.DetectResponse(results=part))

    async def _send_embed(self, key, requests: list, timeout: float) -> list:
        regions, version, local_features, local_limit, local_max_side = key
        items = [it for r in requests for it in r.items]
        embeddings, model = [], None
        for part in self.split(items, lambda it: len(it.image)):
            res = await self.embedding.Embed(embedding_pb2.EmbedRequest(
                items=part, regions=regions, model_version=version, local_features=local_features,
                local_limit=local_limit, local_max_side=local_max_side), timeout=timeout)
            if model is not None and res.model.version != model.version:
                raise RuntimeError("the embedding model changed between the parts of one batch")
            model = res.model
            embeddings += res.embeddings
        return _per_request(requests, embeddings, lambda r: len(r.items),
                            lambda part: embedding_pb2.EmbedResponse(embeddings=part, model=model))
