"""The record of one retrieval protocol: queries, a database, and the photos learned parts may fit on.

Defined here, below both `protocols` (the grocery protocols) and `generic` (the generic ones), which
build them; `visearch.evaluation.protocols.Protocol` is this class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from visearch.datasets import Photo


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
