"""Local features and geometric verification: does a candidate show the same object as the query?

A global descriptor says two pictures look alike; local features matched under one geometric
transform say the same physical thing is in both (the printed label of this carton, not
another carton of milk). Torch-free (OpenCV + numpy): the embedding service extracts, the
re-rank service verifies.

Extractors (`EXTRACTORS`), each storing at most `BUDGET` bytes per object:
- "rootsift": SIFT keypoints, RootSIFT descriptors (Arandjelovic & Zisserman, CVPR 2012:
  L1-normalise, square root) projected to 32 dims (PCA fitted on train photos, shipped in
  the extractor's parameters) and quantised to int8;
- "orb": ORB keypoints and their 256-bit binary descriptors (Hamming distance);
- "cnn": DELF-style, from the embedder's own last conv map (`region_map`, one 256-d
  feature per cell of the map): the strongest cells by feature norm, their centres as
  keypoints.
A keypoint's position is kept in pixels of the original image (two uint16 at half-pixel
resolution), so features of the full frame serve every object box inside it.

Verification (`verify`): mutual nearest neighbours passing Lowe's ratio test, then a
geometric model fitted by OpenCV's USAC (MAGSAC++ scoring): a homography for planar
labels, or a similarity transform when few matches are left. The number of inliers, the
share of the candidate's box their convex hull covers, and the inlier correspondences (for
display) are the outcome.

Re-ranking (`verify_top`, then `fuse`: the re-rank service's "verify" method): the top `top` candidates
by global score are verified against the query; a candidate is *verified* when it has at
least `min_inliers` inliers whose hull covers at least `min_coverage` of its box (a shared
logo on a sibling product matches in a small patch; the same product matches across its
label). Spatially verified query expansion (Chum et al., ICCV 2007) then adds the verified
candidates' global vectors to the query, every candidate is scored again with it, and a
verified candidate's score gains `weight * min(inliers, cap) / cap`: the fused score, which
orders the hits. A hit is a *match* when it is verified and its match score is at least the
model's threshold (`VerifyParams.threshold`, chosen on a train hold-out for precision >= 0.95,
recorded next to the model as `verify.json`: docs/VERIFY.md). The match score
(`VerifyParams.match_on`) is the hit's own global similarity to the query, before the
expansion: the expansion lifts a verified sibling product as much as the right one, so the
fused score (the rule before) cannot tell them apart.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

BUDGET = 8192  # bytes per object
EXTRACTORS = ("rootsift", "orb", "cnn")
MAX_SIDE = 640  # images are resized so their longer side is at most this before extraction


@dataclass
class Features:
    """Local features of one image or object: keypoints [n, 2] (pixels of the original image) and
    descriptors [n, d] (int8 for float descriptors, uint8 bytes for binary ones)."""

    kind: str
    xy: np.ndarray
    desc: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)

    def inside(self, box, limit: int) -> Features:
        """The features inside a box (x1, y1, x2, y2), at most `limit` of them (the first ones: the
        extractors order features by strength)."""
        x1, y1, x2, y2 = box
        keep = (self.xy[:, 0] >= x1) & (self.xy[:, 0] <= x2) & (self.xy[:, 1] >= y1) & (self.xy[:, 1] <= y2)
        idx = np.flatnonzero(keep)[:limit]
        return Features(self.kind, self.xy[idx], self.desc[idx])

    def to_bytes(self) -> bytes:
        """Compact form: a 4-byte header (kind index, descriptor width), then per feature two uint16
        coordinates (half pixels) and the descriptor bytes."""
        n = len(self.desc)
        d = self.desc.shape[1] * self.desc.itemsize if self.desc.ndim == 2 else 0
        head = np.array([EXTRACTORS.index(self.kind), d], np.uint16).tobytes()
        xy = np.clip(np.round(np.asarray(self.xy, np.float32).reshape(n, 2) * 2), 0, 65535).astype("<u2")
        body = np.concatenate([xy.view(np.uint8).reshape(n, 4), np.ascontiguousarray(self.desc).view(np.uint8).reshape(n, d)],
                              axis=1)
        return head + body.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Features:
        kind_i, d = np.frombuffer(data[:4], np.uint16)
        kind = EXTRACTORS[int(kind_i)]
        rows = np.frombuffer(data[4:], np.uint8).reshape(-1, 4 + int(d))
        xy = rows[:, :4].copy().view("<u2").astype(np.float32).reshape(-1, 2) / 2.0
        desc = rows[:, 4:].copy()
        if kind != "orb":
            desc = desc.view(np.int8)
        return cls(kind, xy, desc)


def per_feature_bytes(kind: str, dim: int) -> int:
    return 4 + dim


def capacity(kind: str, dim: int) -> int:
    """How many features of this kind fit in BUDGET bytes."""
    return (BUDGET - 4) // per_feature_bytes(kind, dim)


def _gray(image: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """Grey uint8 image at most `max_side` on its longer side, and the factor back to original pixels."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    h, w = image.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return image, 1.0 / scale


PCA_FILE = Path(__file__).parent / "data" / "rootsift-pca32.npz"
# sha256 of PCA_FILE; retrain: python -m bench.verify_eval fit-pca (RootSIFT of the grocery train
# photos of the TH database, every 4th photo, 300 strongest keypoints each).
PCA_SHA256 = "f03718778d564456ebf822fa8279602839eda357cfb4319f89b6d7a36dd678ca"
QUERY_FEATURES = 1000  # keypoints extracted from a query photo (not stored: no budget)
# A query photo's features are extracted at most this many px on its longer side: on TH (the
# selection protocol) as good as 640 (verify mAP@20 0.996 against 0.997) at 60 % of the extraction
# time (python -m bench.verify_eval --query-side 256; docs/VERIFY.md).
QUERY_SIDE = 256
MIN_SIDE = 64


@functools.lru_cache(maxsize=4)
def load_pca(path: Path = PCA_FILE) -> tuple[np.ndarray, np.ndarray]:
    """The projection's mean and directions, read once per file (an extractor is made per request);
    read-only, as they are shared."""
    data = np.load(path)
    mean, w = data["mean"].astype(np.float32), data["w"].astype(np.float32)
    mean.flags.writeable = w.flags.writeable = False
    return mean, w


class RootSift:
    """SIFT keypoints with RootSIFT descriptors projected by PCA to `dim` dims (the packaged
    projection by default), as int8."""

    kind = "rootsift"

    def __init__(self, pca_mean: np.ndarray | None = None, pca_w: np.ndarray | None = None, n_features: int = 1000,
                 packaged: bool = True, max_side: int = MAX_SIDE):
        self.max_side = max_side
        if pca_w is None and packaged:
            pca_mean, pca_w = load_pca()
        self.mean, self.w = pca_mean, pca_w
        self.dim = 128 if pca_w is None else pca_w.shape[1]
        self.sift = cv2.SIFT_create(nfeatures=n_features)

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints [n, 2] original pixels, RootSIFT [n, 128] float32), strongest first."""
        gray, back = _gray(image, self.max_side)
        kps, desc = self.sift.detectAndCompute(gray, None)
        if desc is None or not kps:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
        order = np.argsort([-k.response for k in kps], kind="stable")
        xy = np.array([kps[i].pt for i in order], np.float32) * back
        d = desc[order].astype(np.float32)
        d /= np.abs(d).sum(axis=1, keepdims=True) + 1e-7
        return xy, np.sqrt(d)

    def __call__(self, image: np.ndarray) -> Features:
        xy, d = self.raw(image)
        if self.w is not None:
            d = (d - self.mean) @ self.w
            d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-7
        return Features(self.kind, xy, np.clip(np.round(d * 127), -127, 127).astype(np.int8))


class Orb:
    kind = "orb"
    dim = 32

    def __init__(self, n_features: int = 1000):
        self.orb = cv2.ORB_create(nfeatures=n_features, scoreType=cv2.ORB_HARRIS_SCORE, fastThreshold=10)

    def __call__(self, image: np.ndarray) -> Features:
        gray, back = _gray(image)
        kps, desc = self.orb.detectAndCompute(gray, None)
        if desc is None or not kps:
            return Features(self.kind, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
        order = np.argsort([-k.response for k in kps], kind="stable")
        xy = np.array([kps[i].pt for i in order], np.float32) * back
        return Features(self.kind, xy, desc[order])


def cnn_features(region_map: np.ndarray, width: int, height: int, dim: int = 64, limit: int = 100) -> Features:
    """DELF-style features from the embedder's conv map [h, w, C] of an image of width x height:
    the `limit` cells of largest feature norm, their centres in original pixels, the first `dim`
    (PCA-ordered) channels L2-normalised and quantised to int8."""
    h, w, c = region_map.shape
    feats = region_map.reshape(h * w, c)[:, :dim].astype(np.float32)
    norms = np.linalg.norm(region_map.reshape(h * w, c), axis=1)
    order = np.argsort(-norms, kind="stable")[:limit]
    ys, xs = np.divmod(order, w)
    xy = np.stack([(xs + 0.5) * width / w, (ys + 0.5) * height / h], axis=1).astype(np.float32)
    d = feats[order]
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-7
    return Features("cnn", xy, np.clip(np.round(d * 127), -127, 127).astype(np.int8))


@dataclass
class Verification:
    inliers: int
    matches: int
    # Inlier correspondences [k, 4]: query x, y, candidate x, y (pixels of each original image).
    pairs: np.ndarray
    # Area of the inliers' convex hulls in the candidate image and in the query (pixels).
    hull_area: float = 0.0
    query_hull_area: float = 0.0


NONE = Verification(0, 0, np.zeros((0, 4), np.float32))


_MATCHERS = {"orb": cv2.NORM_HAMMING}


def tentative(q: Features, c: Features, ratio: float = 0.9) -> np.ndarray:
    """Mutual nearest neighbours passing Lowe's ratio test: pairs [m, 2] of (query index, candidate
    index). Binary descriptors through OpenCV's brute-force matcher (SIMD popcounts); float ones from
    one matrix product (the squared L2 distances, BLAS), which gives the same pairs as the matcher
    without a Python object per match (a tenth of the time). The second nearest distance is the
    row's minimum once its nearest is masked (two passes over the rows instead of a partition: half
    the time of a pair, the same pairs; `python -m bench.verify_cost`). Both descriptors must have
    the same width: `check_comparable`."""
    if len(q) < 2 or len(c) < 2:
        return np.zeros((0, 2), np.int64)
    if q.kind in _MATCHERS:
        bf = cv2.BFMatcher(_MATCHERS[q.kind])
        fwd = bf.knnMatch(q.desc, c.desc, k=2)
        back = {m.queryIdx: m.trainIdx for m in bf.match(c.desc, q.desc)}
        out = [(m[0].queryIdx, m[0].trainIdx) for m in fwd
               if len(m) == 2 and m[0].distance <= ratio * m[1].distance and back.get(m[0].trainIdx) == m[0].queryIdx]
        return np.asarray(out, np.int64).reshape(-1, 2)
    a, b = q.desc.astype(np.float32), c.desc.astype(np.float32)
    # In place: |a|^2 + |b|^2 - 2 a.b. Features hold int8 descriptors, so every term is an integer
    # below 2^24, exact in float32: no distance rounds below zero, and no clip is needed (a pass
    # over the matrix, a fifth of the matcher's time).
    d2 = a @ b.T
    d2 *= -2.0
    d2 += (a * a).sum(1)[:, None]
    d2 += (b * b).sum(1)[None, :]
    rows = np.arange(len(a))
    best = d2.argmin(axis=1)
    mutual = d2.argmin(axis=0)[best] == rows
    first = d2[rows, best]
    d2[rows, best] = np.inf
    second = d2.min(axis=1)
    keep = (first <= ratio * ratio * second) & mutual
    return np.stack([rows[keep], best[keep]], axis=1).astype(np.int64)


def check_comparable(q: Features, c: Features) -> None:
    """ValueError unless q's descriptors can be matched against c's (the same kind and width)."""
    qd, cd = q.desc.shape[1:], c.desc.shape[1:]
    if q.kind != c.kind or qd != cd:
        raise ValueError(f"{q.kind} features of width {qd[0] if qd else 0} cannot be matched against {c.kind} "
                         f"features of width {cd[0] if cd else 0}")


def verify(q: Features, c: Features, ratio: float = 0.9, threshold: float = 6.0, min_matches: int = 5,
           pairs: np.ndarray | None = None) -> Verification:
    """Match q against c (or take their tentative `pairs`) and fit one geometric transform
    (homography, else similarity) with USAC MAGSAC++; threshold: the reprojection error in pixels
    of the candidate image."""
    if pairs is None:
        pairs = tentative(q, c, ratio)
    if len(pairs) < min_matches:
        return Verification(0, len(pairs), np.zeros((0, 4), np.float32))
    src = q.xy[pairs[:, 0]].astype(np.float32)
    dst = c.xy[pairs[:, 1]].astype(np.float32)
    mask = None
    if len(pairs) >= 8:
        _, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, threshold, maxIters=500, confidence=0.99)
    if mask is None or int(mask.sum()) < min_matches:
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                              maxIters=500, confidence=0.99)
    if mask is None:
        return Verification(0, len(pairs), np.zeros((0, 4), np.float32))
    m = mask.ravel().astype(bool)
    kept = np.concatenate([src[m], dst[m]], axis=1)
    if m.sum() < 3:
        return Verification(int(m.sum()), len(pairs), kept)
    return Verification(int(m.sum()), len(pairs), kept, float(cv2.contourArea(cv2.convexHull(dst[m]))),
                        float(cv2.contourArea(cv2.convexHull(src[m]))))


def coverage(v: Verification, box, query_area: float) -> float:
    """How much of the object the inliers span: their hull's share of the candidate's box or of the
    query photo, whichever is larger (an object small in a catalog scene is large in a product
    photo, and the other way round); a logo shared by sibling products is small in both."""
    x1, y1, x2, y2 = box
    return max(v.hull_area / max(1.0, (x2 - x1) * (y2 - y1)), v.query_hull_area / max(1.0, query_area))


@dataclass(frozen=True)
class VerifyParams:
    """The "verify" re-rank and the match decision (module docstring). The defaults are what
    `python -m bench.verify_eval --selection-model runs/ots-repo` chose on TH for the default recipe
    and, for the match decision, `python -m bench.match_eval` on TH ingested as the mesh does
    (docs/VERIFY.md); a model's own choice, when recorded beside it as verify.json, overrides them."""

    top: int = 20  # candidates verified, by global score
    min_inliers: int = 8
    min_coverage: float = 0.03  # `coverage` of the inliers
    cap: int = 40  # inliers counted at most (the bonus saturates)
    weight: float = 0.1
    # A match: a verified hit whose global similarity is at least this. Chosen for the served
    # production model by stop 37's `python -m bench.match_eval` (0.73304 rounded up): the top hits of
    # TH-mesh and of TH-absent (their product left out of the catalog) are right >= 95 % above it.
    # Until stop 37 the rule was the fused score >= 0.9781, chosen on whole-image TH pairs; it
    # matched the top hit of 21 % of TH-absent queries, a sibling product every time.
    threshold: float = 0.7331
    match_on: str = "similarity"  # the score the threshold applies to: `match_scores`
    extractor: str = "rootsift-pca32@640 query@256"
    selected_on: str = "TH-mesh + TH-absent (bench.match_eval)"
    curve: list = field(default_factory=list)  # precision/recall points of the threshold, for the record

    @classmethod
    def load(cls, path: Path) -> VerifyParams:
        """The parameters recorded next to a model (`<version>/verify.json`), or the defaults."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return cls()
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        if "threshold" in known and "match_on" not in known:  # recorded before there was a choice
            known["match_on"] = "fused"
        return cls(**known)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass
class Ranked:
    """The outcome of `fuse`: candidate order, fused scores, and per candidate its verification."""

    order: np.ndarray  # indexes into the candidates, best first
    scores: np.ndarray  # fused scores, in `order`
    checks: dict[int, Verification]  # candidate index -> its verification (the ones verified)
    verified: set[int]
    matched: set[int]


def verify_top(query_features: Features | None, candidate_features: dict[int, Features], top: int
               ) -> dict[int, Verification]:
    """Candidate index -> its verification against the query, for the first `top` candidates that
    have features stored. (One pair at a time: two threads, or all candidates' distances in one
    matrix product, were both slower on 2 cores.)"""
    if query_features is None or len(query_features) < 2:
        return {}
    return {i: verify(query_features, f) for i in range(top)
            if (f := candidate_features.get(i)) is not None and len(f) >= 2}


def fuse(query: np.ndarray, vectors: np.ndarray, scores: np.ndarray, checks: dict[int, Verification],
         boxes: dict[int, tuple], query_area: float, params: VerifyParams) -> Ranked:
    """Expand and fuse (module docstring): `vectors` [n, d] and `scores` [n] of the candidates in
    global order, `checks` from `verify_top`, `boxes`: index -> the candidate object's box,
    `query_area`: the query photo's area in pixels."""
    n = len(scores)
    evidence = np.zeros(n, np.float32)
    for i, v in checks.items():
        if v.inliers >= params.min_inliers and coverage(v, boxes.get(i, (0, 0, 0, 0)), query_area) >= params.min_coverage:
            evidence[i] = min(v.inliers, params.cap) / params.cap
    verified = set(np.flatnonzero(evidence > 0).tolist())
    similarity = np.asarray(scores, np.float32)
    g = similarity
    if verified:
        idx = sorted(verified)
        q = np.asarray(query, np.float32) + (evidence[idx, None] * vectors[idx]).sum(0)
        q /= max(float(np.linalg.norm(q)), 1e-12)
        g = vectors @ q
    fused = g + params.weight * evidence
    order = np.argsort(-fused, kind="stable")
    score = match_scores(similarity, fused, evidence, params)
    matched = {i for i in verified if score[i] >= params.threshold}
    return Ranked(order, fused[order], checks, verified, matched)


def match_scores(similarity: np.ndarray, fused: np.ndarray, evidence: np.ndarray, params: VerifyParams) -> np.ndarray:
    """The score a match is decided on (`params.match_on`): "evidence", each candidate's global
    similarity plus its verification bonus; "fused", the fused score (after the expansion);
    "similarity", the global similarity alone."""
    if params.match_on == "evidence":
        return similarity + params.weight * evidence
    if params.match_on == "fused":
        return fused
    if params.match_on == "similarity":
        return similarity
    raise ValueError(f"unknown match score {params.match_on!r}: evidence, fused or similarity")
