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

import math
from collections.abc import Sequence
from pathlib import Path

from visearch.datasets import PRODUCT_FINE_IDS, Photo, grocery_iconic, grocery_split

from .generic import GENERIC_CACHE, generic_protocols
from .protocol import Protocol

__all__ = ["CD_TEST_IDS", "CD_TRAIN_IDS", "GENERIC_CACHE", "HOLDOUT_FRACTION", "PROTOCOL_NAMES", "Protocol",
           "TF_LIST", "dataset_images", "get_protocols", "holdout_count", "read_list", "split_protocols", "train_far_holdout",
           "train_holdout"]

CD_TRAIN_IDS = range(28, 44)
CD_TEST_IDS = range(44, 59)
PROTOCOL_NAMES = ("P1", "P3", "CD", "TH", "TH-CD", "TF", "TI", "G", "GR", "GS")
HOLDOUT_FRACTION = 0.2
# TF's queries (visearch.evaluation.farsplit), dataset-relative paths: committed, so no model is needed.
TF_LIST = Path(__file__).resolve().parent.parent / "data" / "grocery-tf.txt"


def read_list(path: Path = TF_LIST) -> list[str]:
    """The dataset-relative paths in a split list (lines starting with '#' are comments)."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def holdout_count(n: int, fraction: float = HOLDOUT_FRACTION) -> int:
    """How many of a class's n train photos a hold-out takes: ceil(fraction * n), none of a lone photo."""
    return math.ceil(fraction * n) if n > 1 else 0


def _holdout(photos: list[Photo], fraction: float) -> tuple[list[Photo], list[Photo]]:
    """(queries, rest): per class, the last ceil(fraction * n) photos in file order are queries."""
    by_class: dict[int, list[Photo]] = {}
    for p in photos:
        by_class.setdefault(p.fine_id, []).append(p)
    held: set[Path] = set()
    for ps in by_class.values():
        k = holdout_count(len(ps), fraction)
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


def train_far_holdout(root: Path, listed: Path | None = None) -> Protocol:
    """TF, a selection protocol inside TRAIN closer to val's shift than TH: per product, the train
    photos least like the rest of their product (`visearch.evaluation.farsplit`, a committed list)
    -> the other train photos."""
    held_keys = set(read_list(listed or TF_LIST))
    train = grocery_split(root, "train")
    held = [p for p in train if p.key in held_keys]
    if len(held) != len(held_keys):
        raise ValueError(f"{len(held_keys) - len(held)} photo(s) of the TF list are not train photos of {root}")
    database = [p for p in train if p.key not in held_keys]
    return Protocol("TF", held, database, "train far hold-out: each product's train photos least like the rest "
                    "(ceil 20 %, off-the-shelf descriptor) -> the other train photos", fit=database)


SPLIT_PROTOCOLS = ("P1", "P3", "CD")  # defined by the dataset's own splits alone


def split_protocols(train: list[Photo], val: list[Photo], iconic: list[Photo],
                    names: Sequence[str] = SPLIT_PROTOCOLS) -> dict[str, Protocol]:
    """The protocols of SPLIT_PROTOCOLS named in `names` (in that order) on the dataset's train, val and
    iconic photos."""
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
        else:
            raise ValueError(f"{n} is not one of {', '.join(SPLIT_PROTOCOLS)}")
    return out


def get_protocols(root: Path, names: Sequence[str] = ("P1", "P3", "CD")) -> dict[str, Protocol]:
    """The named protocols on the dataset at `root` (names from PROTOCOL_NAMES), in the order asked."""
    unknown = [n for n in names if n not in PROTOCOL_NAMES]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOL_NAMES)}")
    train, val, iconic = grocery_split(root, "train"), grocery_split(root, "val"), grocery_iconic(root)
    out: dict[str, Protocol] = {}
    for n in names:
        if n in SPLIT_PROTOCOLS:
            out.update(split_protocols(train, val, iconic, [n]))
        elif n == "TH":
            out[n] = train_holdout(root)
        elif n == "TH-CD":
            out[n] = train_holdout(root, query_ids=CD_TRAIN_IDS, exclude_ids=CD_TEST_IDS, name="TH-CD")
        elif n == "TF":
            out[n] = train_far_holdout(root)
        elif n == "TI":  # P3's shape inside TRAIN: selects what P3 would be read for
            th = train_holdout(root)
            out[n] = Protocol("TI", th.queries, iconic, "train hold-out (TH's queries) -> the 81 iconic images "
                              "(1 positive)", th.database)
        elif n in ("G", "GR", "GS"):
            out.update(generic_protocols(GENERIC_CACHE, train, [n]))
    return out


def dataset_images(root: Path) -> list[Path]:
    """Every image of the protocols (val, train, iconic): one feature bank covers them all."""
    return [p.path for p in (*grocery_split(root, "val"), *grocery_split(root, "train"), *grocery_iconic(root))]
