"""bench.exact_rows: the rule that says when a view's first rows fix a search's re-rank candidates,
checked against an exhaustive search on random catalogs; and a smoke run on real photos."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.exact_rows import candidates_exact, markdown, measure
from bench.meshpath import Obj
from visearch import search


def rows_of(vectors: np.ndarray, objects: list[tuple[str, str]], q: np.ndarray, n: int) -> list[Obj]:
    s = vectors @ q
    top = np.argsort(-s, kind="stable")[:n]
    return [Obj(objects[i][0], objects[i][1], float(s[i]), (0, 0, 1, 1)) for i in top]


def test_a_fixed_answer_is_the_exhaustive_answer():
    rng = np.random.default_rng(7)
    said = {True: 0, False: 0}
    for trial in range(60):
        objects = []
        for item in range(int(rng.integers(20, 80))):
            objects += [(f"i{item}", f"i{item}#{k}") for k in range(int(rng.integers(1, 5)))]
        dim = 8
        centres = rng.standard_normal((4, dim))
        vectors = centres[rng.integers(0, 4, len(objects))] + rng.standard_normal((len(objects), dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = rng.standard_normal((2, dim))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        margins, crop, n = [0.0, 0.03], 0.02 * (trial % 2), int(rng.integers(3, 15))
        everything = [rows_of(vectors, objects, q, len(objects)) for q in queries]
        full = list(search.best_per_item(everything, margins, crop).values())[:n]
        for rows in (n, 2 * n, 4 * n):
            found = [rows_of(vectors, objects, q, rows) for q in queries]
            fixed = candidates_exact(found, margins, crop, rows, n)
            said[fixed] += 1
            if fixed:
                got = list(search.best_per_item(found, margins, crop).values())[:n]
                assert [(o.object_id, s) for s, o in got] == [(o.object_id, s) for s, o in full]
    assert said[True] >= 10 and said[False] >= 10  # both answers are exercised


def test_rows_that_are_all_the_catalog_are_exact():
    rows = [[Obj("a", "a#0", 0.9, (0, 0, 1, 1)), Obj("b", "b#0", 0.1, (0, 0, 1, 1))]]
    assert candidates_exact(rows, [0.0], 0.0, 5, 2)  # fewer rows than asked: the view returned all it has
    assert not candidates_exact(rows, [0.0], 0.0, 2, 2)  # the 2nd item is the bound itself: not above it


@pytest.mark.integration
def test_exact_rows_smoke(model_repo, grocery):
    r = asyncio.run(measure("P3", model_repo, [2, 8, 1000], smoke=True, progress=lambda m: None))
    assert r["queries"] == 4 and r["candidates"] == 4 and set(r["exact_share_by_rows"]) == {"2", "8", "1000"}
    assert r["exact_share_by_rows"]["1000"] == 1.0  # more rows than the catalog has objects
    assert 0.0 <= r["served_rows_equal_exhaustive"] <= 1.0
    assert "| 1000 | 1.000 |" in markdown(r)
