"""Near-duplicate pictures: the same photo re-encoded, resized or cropped a little.

The global descriptor cannot tell a copy from another shot of the same product (a JPEG q40 copy
and a product's nearest other photo score alike: docs/DUPLICATES.md), so it only proposes
candidates. A candidate pair is then checked on pixels:

1. the two images' stored local features (the compact RootSIFT records that verification reads,
   visearch.local) give one similarity transform (scale, rotation, shift: what resizing and
   cropping do) by RANSAC;
2. the second image, warped into the first's frame by it, must cover most of each image
   (`min_overlap`: a crop "a little"), and over that overlap the two grey images, both at
   SIDE px and lightly blurred, must agree pixel for pixel: normalised cross-correlation
   >= `min_ncc`. Another shot of the same product moves its background, its lighting, its
   perspective: its correlation after the best similarity falls well below a copy's.

Pairs that pass are joined into groups (union-find): a group is items that show one picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from visearch import local

SIDE = 160  # px on the longer side of the grey images compared
BLUR = 1.0  # Gaussian sigma (px at SIDE) before comparing: JPEG blocks and resampling differ


@dataclass(frozen=True)
class DuplicateParams:
    """The rule's settings; the defaults were chosen on the grocery train photos (docs/DUPLICATES.md)."""

    min_cosine: float = 0.75  # global similarity of a candidate pair
    candidates: int = 10  # nearest items checked per item
    min_inliers: int = 12  # local features agreeing with one similarity transform
    min_overlap: float = 0.70  # share of each image the other covers once aligned
    min_ncc: float = 0.98  # pixel agreement over the overlap
    max_residual: float = 0.25  # median inlier distance from the transform, px at SIDE


@dataclass
class Picture:
    """What the check needs of one image: its size, local features (original pixels) and a grey
    image at SIDE px on its longer side."""

    width: int
    height: int
    features: local.Features
    gray: np.ndarray

    @property
    def scale(self) -> float:  # original px -> `gray` px
        return self.gray.shape[1] / self.width


@dataclass(frozen=True)
class Evidence:
    inliers: int
    overlap: float  # the smaller of the two coverages
    ncc: float
    residual: float = float("inf")  # median distance of the inliers from the transform, px at SIDE

    def same(self, p: DuplicateParams) -> bool:
        return (self.inliers >= p.min_inliers and self.overlap >= p.min_overlap and self.ncc >= p.min_ncc
                and self.residual <= p.max_residual)


NONE = Evidence(0, 0.0, 0.0)


def small_gray(rgb: np.ndarray) -> np.ndarray:
    """The image as float32 grey at SIDE px on its longer side."""
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    h, w = g.shape
    s = SIDE / max(h, w)
    g = cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(g.astype(np.float32), (0, 0), BLUR)


def picture(rgb: np.ndarray, features: local.Features | None = None) -> Picture:
    """A Picture of an RGB image (its local features extracted as at ingestion when not given)."""
    h, w = rgb.shape[:2]
    if features is None:
        features = local.RootSift()(rgb).inside((0, 0, w, h), local.capacity("rootsift", 32))
    return Picture(w, h, features, small_gray(rgb))


def compare(a: Picture, b: Picture, params: DuplicateParams = DuplicateParams()) -> Evidence:
    """How strongly b is the same picture as a (symmetric up to RANSAC's draws)."""
    pairs = local.tentative(a.features, b.features, ratio=0.8)
    if len(pairs) < params.min_inliers:
        return NONE
    src = b.features.xy[pairs[:, 1]].astype(np.float32)
    dst = a.features.xy[pairs[:, 0]].astype(np.float32)
    m, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0, maxIters=1000,
                                          confidence=0.995)
    inliers = int(mask.sum()) if mask is not None else 0
    if m is None or inliers < params.min_inliers:
        return Evidence(inliers, 0.0, 0.0)
    keep = mask.ravel().astype(bool)
    moved = src[keep] @ m[:, :2].T + m[:, 2]
    residual = float(np.median(np.linalg.norm(moved - dst[keep], axis=1))) * a.scale
    # b's small image -> a's small image: (a's scale) . m . (b's scale)^-1
    sa, sb = a.scale, b.scale
    t = np.array([[sa, 0, 0], [0, sa, 0], [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]]) @ np.array(
        [[1 / sb, 0, 0], [0, 1 / sb, 0], [0, 0, 1]])
    ha, wa = a.gray.shape
    warped = cv2.warpAffine(b.gray, t[:2], (wa, ha), flags=cv2.INTER_LINEAR, borderValue=0)
    valid = cv2.warpAffine(np.ones_like(b.gray), t[:2], (wa, ha), flags=cv2.INTER_NEAREST, borderValue=0) > 0.5
    valid = cv2.erode(valid.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # edges blend the border
    area = float(valid.sum())
    det = abs(np.linalg.det(t[:2, :2])) or 1e-9
    overlap = min(area / (wa * ha), area / det / b.gray.size)
    if area < 64:
        return Evidence(inliers, overlap, 0.0, residual)
    x, y = a.gray[valid], warped[valid]
    x, y = x - x.mean(), y - y.mean()
    ncc = float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-6))
    return Evidence(inliers, overlap, ncc, residual)


def groups(pairs: list[tuple[str, str]]) -> list[list[str]]:
    """Connected groups of the items joined by `pairs`, each sorted, largest first."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    out: dict[str, list[str]] = {}
    for x in parent:
        out.setdefault(root(x), []).append(x)
    return sorted((sorted(g) for g in out.values()), key=lambda g: (-len(g), g[0]))


@dataclass
class Scan:
    """What `find` returns: the groups, and what it looked at."""

    groups: list[list[str]]
    min_ncc: list[float]  # per group: the lowest pixel agreement of the pairs that joined it
    items: int
    pairs_checked: int
    unreadable: list[str]  # items whose image could not be read again (not checked)
    evidence: dict[tuple[str, str], Evidence]


def box_area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def full_frames(store, gen) -> dict[str, dict]:
    """item id -> its largest stored object (the full frame under the default ingest policy): id,
    vector, box, source."""
    out: dict[str, dict] = {}
    for rows in store.scan(gen, ["object_id", "item_id", "vector", "box", "source"]):
        for r in rows:
            area = box_area(r.get("box") or (0, 0, 0, 0))
            if r["item_id"] not in out or area > out[r["item_id"]]["area"]:
                out[r["item_id"]] = {**r, "area": area}
    return out


def nearest(store, gen, vectors: dict[str, np.ndarray], params: DuplicateParams, chunk: int = 256
            ) -> dict[str, list[str]]:
    """item -> the other items, nearest first, among its vector's nearest objects in the index with a
    global similarity of at least min_cosine."""
    items = list(vectors)
    out: dict[str, list[str]] = {}
    for i in range(0, len(items), chunk):
        part = items[i:i + chunk]
        found = store.search_many(gen, [vectors[it] for it in part], params.candidates + 1, fields=("item_id",))
        for it, hits in zip(part, found, strict=True):
            out[it] = list(dict.fromkeys(h.item_id for h in hits if h.item_id != it and h.score >= params.min_cosine))
    return out


def candidate_pairs(store, gen, frames: dict[str, dict], params: DuplicateParams) -> set[tuple[str, str]]:
    """Pairs of items (sorted) whose full frames are among each other's nearest (`nearest`)."""
    near = nearest(store, gen, {it: frames[it]["vector"] for it in sorted(frames)}, params)
    return {tuple(sorted((it, other))) for it, others in near.items() for other in others if other in frames}


def picture_from(data: bytes | None, stored: bytes | None) -> Picture | None:
    """A Picture of encoded image bytes with their stored local features (extracted when none are
    stored); None when there are no bytes or they do not decode."""
    from visearch import imaging

    if not data:
        return None
    try:
        rgb = np.asarray(imaging.decode_image(data))
    except imaging.ImageError:
        return None
    return picture(rgb, local.Features.from_bytes(stored) if stored else None)


def find(store, gen, read_image, params: DuplicateParams = DuplicateParams(), progress=None) -> Scan:
    """Groups of a generation's items that show the same picture: candidates from the vector index,
    each checked on pixels (`read_image(source)`: the image's bytes, or None when it cannot be read)."""
    frames = full_frames(store, gen)
    pairs = sorted(candidate_pairs(store, gen, frames, params))
    pictures: dict[str, Picture | None] = {}

    def picture_of(item: str) -> Picture | None:
        if item not in pictures:
            f = frames[item]
            pictures[item] = picture_from(read_image(f["source"]),
                                          store.get_local(gen, [f["object_id"]]).get(f["object_id"]))
        return pictures[item]

    same, evidence = [], {}
    for n, (a, b) in enumerate(pairs):
        pa, pb = picture_of(a), picture_of(b)
        if pa is not None and pb is not None:
            ev = compare(pa, pb, params)
            evidence[(a, b)] = ev
            if ev.same(params):
                same.append((a, b))
        if progress and (n + 1) % 500 == 0:
            progress(n + 1, len(pairs))
    found = groups(same)
    member = {item: g for g, items in enumerate(found) for item in items}
    low = [1.0] * len(found)
    for a, b in same:
        low[member[a]] = min(low[member[a]], evidence[(a, b)].ncc)
    return Scan(found, low, len(frames), len(evidence), sorted(i for i, p in pictures.items() if p is None), evidence)
