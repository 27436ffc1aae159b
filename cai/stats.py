"""Ground-floor statistics shared by every stage: one measure per quantity.

Nothing here imports another `cai` module. Agreement between two labellers (judge vs human,
human vs human) is computed only by :func:`agreement`, so `cai label`'s summary, the study
report and `cai agreement` give the same number and the same interval for the same rows.
"""

from __future__ import annotations

import math

Z95 = 1.96


def mean(xs) -> float:
    """The mean of ``xs``; nan when there are none."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sound near 0, 1 and for small n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return (max(0.0, centre - half), min(1.0, centre + half))


def agrees(p: float, q: float) -> float:
    """1 when two preference probabilities pick the same side, 0 when not, 0.5 when `p` is a tie.

    `q` is the reference label (a human's); callers drop rows where the reference is a tie.
    """
    if p == 0.5:
        return 0.5
    return float((p > 0.5) == (q > 0.5))


def rate(values: list[float]) -> dict:
    """Share of agreements (ties count ½) with its 95% Wilson interval: {n, agreement, ci95}."""
    n = len(values)
    k = float(sum(values))
    if not n:
        return {"n": 0, "agreement": None, "ci95": None}
    lo, hi = wilson_interval(k, n)
    return {"n": n, "agreement": round(k / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def agreement(pairs: list[tuple[float, float]]) -> dict:
    """Agreement of labeller A with reference B over (p_a, p_b) pairs of P(chosen is better).

    Rows where the reference is a tie (0.5) have no side and are left out (counted in
    ``reference_ties``); an A tie scores ½. Returns ``rate()`` plus ``ties`` (A ties) and
    Cohen's kappa on the hard sides.
    """
    vals, ties, ref_ties, sides = [], 0, 0, []
    for pa, pb in pairs:
        if pb == 0.5:
            ref_ties += 1
            continue
        a = agrees(pa, pb)
        ties += a == 0.5
        vals.append(a)
        if pa != 0.5:
            sides.append((pa > 0.5, pb > 0.5))
    out = rate(vals)
    out["ties"] = ties
    out["reference_ties"] = ref_ties
    out["kappa"] = cohen_kappa(sides)
    return out


def cohen_kappa(sides: list[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa for two raters' binary choices; None when undefined (no rows, or no spread)."""
    n = len(sides)
    if not n:
        return None
    po = sum(a == b for a, b in sides) / n
    pa = sum(a for a, _ in sides) / n
    pb = sum(b for _, b in sides) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe >= 1.0:
        return None
    return round((po - pe) / (1 - pe), 4)
