"""Retrieval protocols on the Grocery Store dataset (its DATA.md), plus a held-out split of TRAIN for model selection.

- P1: queries = val photos of packaged products (fine ids 28..58); database = all
  2,640 train photos (products are the positives, fruit and vegetables distractors).
- P3: same queries; database = the 81 iconic (studio) images; one positive.
- CD: class-disjoint. Models for it learn only from products 28..43 (and the
  fruit/vegetable classes); queries = val photos of products 44..58; database =
  all train photos except those of products 28..43 (the unseen products plus the
  fruit/vegetable distractors).
- G / GR: generic instance search on registry photos (visearch/evaluation/generic.py), a held-out
  check that a model fine-tuned on grocery products still finds other kinds of instances; GS, its
  twin on other photos (OpenCV's samples), to select on.
- TH / TH-CD: a held-out split of TRAIN (never val) to select hyper-parameters on:
  per product class the last ~20% of its train photos (file order; consecutive
  photos are near-duplicates, so a tail block is a fairer hold-out than every 5th)
  are queries, the other train photos the database. TH-CD uses only products
  28..43 as queries and drops products 44..58 from the database, so it is legal
  for selecting the models reported on CD as well as on P1 and P3.

Every protocol also names `fit`: the train photos that learned parts (PCA,
whitening, codebooks) may be fitted on when the protocol is reported. Val photos
are never in any `fit` nor in any train-side database.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from visearch.datasets import PRODUCT_FINE_IDS, Photo, grocery_iconic, grocery_split

CD_TRAIN_IDS = range(28, 44)
CD_TEST_IDS = range(44, 59)
PROTOCOL_NAMES = ("P1", "P3", "CD", "TH", "TH-CD", "G", "GR", "GS")
GENERIC_CACHE = Path(__file__).resolve().parents[2] / ".data" / "generic"
HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True, eq=False)
class Protocol:
    name: str
    queries: list[Photo]
    database: list[Photo]
    description: str
    fit: list[Photo] = field(default_factory=list)  # train photos learned parts may be fitted on for this protocol

    def positives(self, q: Photo) -> set[int]:
        """Indexes into `database` of the photos relevant to `q` (same fine class)."""
        return set(self._by_class().get(q.fine_id, ()))

    def _by_class(self) -> dict[int, list[int]]:
        cached = self.__dict__.get("_cls")
        if cached is None:
            cached = {}
            for i, p in enumerate(self.database):
                cached.setdefault(p.fine_id, []).append(i)
            object.__setattr__(self, "_cls", cached)
        return cached

    @property
    def fit_key(self) -> str:
        """Identity of the fit set: protocols with equal keys can share fitted models."""
        digest = hashlib.sha256("\n".join(str(p.path) for p in self.fit).encode()).hexdigest()[:12]
        return f"{len(self.fit)}-{digest}"

    def limited(self, n_queries: int, n_distractors: int = 4, per_class: int = 2) -> Protocol:
        """A small protocol for smoke runs: the first query of each of up to `n_queries` classes, a
        database of those classes' photos (up to `per_class` each) plus `n_distractors` others; fit =
        the database photos that were in `fit`, or else 8 photos spread over `fit`."""
        picked, seen = [], set()
        for q in self.queries:
            if q.fine_id not in seen and self.positives(q):
                picked.append(q)
                seen.add(q.fine_id)
            if len(picked) >= n_queries:
                break
        db: list[Photo] = []
        for q in picked:
            db += [self.database[i] for i in sorted(self.positives(q))[:per_class]]
        others = [p for p in self.database if p.fine_id not in seen]
        step = max(1, len(others) // max(1, n_distractors))
        db += others[::step][:n_distractors]
        in_db = {p.path for p in db}
        fit = [p for p in self.fit if p.path in in_db]
        if len(fit) < 8:
            fit = self.fit[::max(1, len(self.fit) // 8)][:8]
        return Protocol(self.name, picked, db,
                        self.description + f" (smoke: {len(picked)} queries, {len(db)} database images)", fit)


def _holdout(photos: list[Photo], fraction: float) -> tuple[list[Photo], list[Photo]]:
    """(queries, rest): per class, the last ceil(fraction * n) photos in file order are queries."""
    by_class: dict[int, list[Photo]] = {}
    for p in photos:
        by_class.setdefault(p.fine_id, []).append(p)
    held: set[Path] = set()
    for ps in by_class.values():
        k = math.ceil(fraction * len(ps)) if len(ps) > 1 else 0
        held.update(p.path for p in sorted(ps, key=lambda p: p.key)[len(ps) - k:])
    return [p for p in photos if p.path in held], [p for p in photos if p.path not in held]


def train_holdout(root: Path, fraction: float = HOLDOUT_FRACTION, query_ids: Sequence[int] = PRODUCT_FINE_IDS,
                  exclude_ids: Sequence[int] = (), name: str = "TH") -> Protocol:
    """A model-selection protocol inside TRAIN: held-out train photos of `query_ids` against the rest.

    Photos of `exclude_ids` are dropped everywhere (queries, database, fit).
    """
    train = [p for p in grocery_split(root, "train") if p.fine_id not in set(exclude_ids)]
    qids = set(query_ids)
    held, rest = _holdout([p for p in train if p.fine_id in qids], fraction)
    held_paths = {p.path for p in held}
    database = [p for p in train if p.path not in held_paths]
    return Protocol(name, held, database,
                    f"train hold-out: last {fraction:.0%} of each class {min(qids)}..{max(qids)}'s train photos "
                    f"-> the other train photos" + (f" (classes {min(exclude_ids)}..{max(exclude_ids)} removed)"
                                                   if exclude_ids else ""),
                    fit=database)


def get_protocols(root: Path, names: Sequence[str] = ("P1", "P3", "CD")) -> dict[str, Protocol]:
    """The named protocols on the dataset at `root` (names from PROTOCOL_NAMES), in the order asked."""
    unknown = [n for n in names if n not in PROTOCOL_NAMES]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOL_NAMES)}")
    train, val, iconic = grocery_split(root, "train"), grocery_split(root, "val"), grocery_iconic(root)
    products = [p for p in val if p.is_product]
    out: dict[str, Protocol] = {}
    for n in names:
        if n == "P1":
            out[n] = Protocol("P1", products, train, "val product photos (fine 28-58) -> all train photos", train)
        elif n == "P3":
            out[n] = Protocol("P3", products, iconic, "val product photos -> the 81 iconic images (1 positive)", train)
        elif n == "CD":
            seen = set(CD_TRAIN_IDS)
            out[n] = Protocol(
                "CD", [p for p in products if p.fine_id in CD_TEST_IDS], [p for p in train if p.fine_id not in seen],
                "class-disjoint: val photos of products 44-58 -> train photos minus products 28-43 "
                "(models learn from products 28-43 + fruit/veg only)",
                [p for p in train if p.fine_id not in set(CD_TEST_IDS)])
        elif n == "TH":
            out[n] = train_holdout(root)
        elif n == "TH-CD":
            out[n] = train_holdout(root, query_ids=CD_TRAIN_IDS, exclude_ids=CD_TEST_IDS, name="TH-CD")
        elif n in ("G", "GR", "GS"):
            from .generic import generic_protocols

            out.update(generic_protocols(GENERIC_CACHE, train, [n]))
    return out


def dataset_images(root: Path) -> list[Path]:
    """Every image of the protocols (val, train, iconic): one feature bank covers them all."""
    return [p.path for p in (*grocery_split(root, "val"), *grocery_split(root, "train"), *grocery_iconic(root))]
