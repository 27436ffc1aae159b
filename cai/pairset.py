"""The evaluation rows with the preferred side made explicit (`PairSet`), from rows or a file.

The *preferred* response is ``chosen`` when the row's ``label.p_chosen`` > 0.5 and ``rejected``
when it is < 0.5; rows labelled exactly 0.5 have no preferred side and are left out (and counted).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from cai.errors import InputError
from cai.records import file_sha256, read_pairs, response_text, skip_note


@dataclass
class PairSet:
    """The evaluation rows in the form the metrics need (the preferred side made explicit)."""

    rows: list[dict]  # pairs-contract rows that have a preferred side
    sign: np.ndarray  # +1: chosen is preferred, −1: rejected is
    len_pref: np.ndarray  # characters of the preferred response
    len_other: np.ndarray
    dropped_label_ties: int = 0
    source: dict = field(default_factory=dict)  # file, sha256, n, limit

    @property
    def n(self) -> int:
        return len(self.rows)

    def head(self, k: int | None) -> PairSet:
        """The first k pairs (all when k is None or larger)."""
        if k is None or k >= self.n:
            return self
        return PairSet(
            self.rows[:k], self.sign[:k], self.len_pref[:k], self.len_other[:k], 0, dict(self.source, n=k)
        )

    def pref_text(self, i: int) -> str:
        r = self.rows[i]
        return response_text(r["chosen"] if self.sign[i] > 0 else r["rejected"])

    def other_text(self, i: int) -> str:
        r = self.rows[i]
        return response_text(r["rejected"] if self.sign[i] > 0 else r["chosen"])


def make_pairset(rows: list[dict], source: dict | None = None) -> PairSet:
    keep, sign = [], []
    for r in rows:
        p = float(r["label"]["p_chosen"])
        if p == 0.5:
            continue
        keep.append(r)
        sign.append(1.0 if p > 0.5 else -1.0)
    ps = PairSet(
        keep, np.array(sign), np.zeros(len(keep)), np.zeros(len(keep)), len(rows) - len(keep), source or {}
    )
    ps.len_pref = np.array([len(ps.pref_text(i)) for i in range(ps.n)], float)
    ps.len_other = np.array([len(ps.other_text(i)) for i in range(ps.n)], float)
    return ps


def load_pairset(path, limit: int | None = None, skip_bad: bool = False) -> PairSet:
    stats: dict = {}
    rows = read_pairs(path, limit=limit, skip_bad=skip_bad, stats=stats, need_label=True)
    ps = make_pairset(rows, {"file": str(path), "sha256": file_sha256(path), "limit": limit})
    ps.source["skipped"] = len(stats.get("skipped", []))
    if stats.get("skipped"):
        print(f"cai: {path}: {skip_note(stats)}", file=sys.stderr)
    if ps.n == 0:
        raise InputError(
            "every row is labelled p_chosen = 0.5 (no preferred side); nothing to evaluate", path
        )
    ps.source["n"] = ps.n
    ps.source["dropped_label_ties"] = ps.dropped_label_ties
    return ps
