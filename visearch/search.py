"""The search pipeline's decisions, as plain functions: which views of a query are searched, how many
rows are asked of the store, how rows become candidates. The gateway (services/gateway) runs them
over gRPC and Milvus; the offline mesh-path evaluation (bench/meshpath.py) runs the very same ones
in-process, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

MAX_BATCH_SEARCHES = 64  # searches in one BatchSearch
# How a catalog stores its objects' region descriptors (`--regions`): not at all, float vectors in the
# vector store, or int8 files read by key. Here (stdlib only) so the SDK and the settings share it.
REGION_MODES = ("off", "float", "int8")
# The vector index a catalog is made with (`--index`, docs/CAPACITY.md): HNSW (the default: no
# training step, searchable from the first row, recall@10 0.9995 at 1M), IVF_SQ8 (8-bit codes in
# inverted lists: builds faster, recall capped near 0.98 by the quantisation), FLAT (exact, no index
# to build: for small catalogs).
INDEX_KINDS = ("hnsw", "ivf_sq8", "flat")

Box = tuple[float, float, float, float]
QUERY_POLICIES = ("best", "full", "both")
MAX_SEARCH_ROWS = 16_384  # Milvus's top-k limit


class Row(Protocol):
    item_id: str
    object_id: str
    score: float


def query_views(policy: str, detections: Sequence[Box], full: Box) -> list[Box]:
    """The parts of the query photo searched: the detector's best box ("best"; the full frame when it
    finds nothing), the full frame ("full"), or both ("both": the best box first)."""
    best = detections[0] if detections and policy != "full" else None
    if best is None:
        return [full]
    return [best] if policy == "best" else [best, full]


def first_rows(top_k: int, rerank_candidates: int) -> int:
    """Rows asked of the store per view at first: twice the candidates (an item may be several objects)."""
    return min(2 * max(top_k, rerank_candidates), MAX_SEARCH_ROWS)


def object_number(object_id: str) -> int:
    """n of an object id `<item>#<n>`: 0 is the full frame under the default ingest policy."""
    return int(object_id.rsplit("#", 1)[1])


def best_per_item(results: Sequence[Sequence[Row]], view_margins: Sequence[float] | None = None,
                  crop_margin: float = 0.0) -> dict[str, tuple[float, Row]]:
    """Each item's (score, best object) over every view's rows, best first. A row's score counts less by its
    view's margin (`view_margins[i]`: a crop of the query) and by `crop_margin` when it is a detected
    object of the catalog image rather than its full frame (object number > 0): a crop wins an item
    only when it beats the full frames clearly (a shelf photo holds other products than the one
    it shows)."""
    margins = view_margins or [0.0] * len(results)
    scored = []
    for found, m in zip(results, margins, strict=True):
        for o in found:
            scored.append((o.score - m - (crop_margin if object_number(o.object_id) > 0 else 0.0), o))
    best: dict[str, tuple[float, Row]] = {}
    for score, obj in sorted(scored, key=lambda t: -t[0]):
        best.setdefault(obj.item_id, (score, obj))
    return best


def view_margins(views: Sequence[Box], full: Box, margin: float) -> list[float]:
    """The margin of each view: `margin` for a crop of the query, 0 for its full frame."""
    return [0.0 if v == full else margin for v in views]


def enough_rows(best: dict, results: Sequence[Sequence[Row]], rows: int, top_k: int) -> bool:
    """Whether the rows hold enough items, or asking for more would find none."""
    return len(best) >= top_k or all(len(r) < rows for r in results) or rows >= MAX_SEARCH_ROWS


def more_rows(rows: int) -> int:
    return min(4 * rows, MAX_SEARCH_ROWS)


def candidates(best: dict[str, tuple[float, Row]], top_k: int, rerank_candidates: int) -> list[tuple[float, Row]]:
    """The items handed to re-ranking, (score, object) best first."""
    return list(best.values())[:max(top_k, rerank_candidates)]


def lead_view(results: Sequence[Sequence[Row]]) -> int:
    """The view whose best row scored highest: its vector (and regions) lead re-ranking."""
    return max(range(len(results)), key=lambda i: results[i][0].score if results[i] else -1.0)
