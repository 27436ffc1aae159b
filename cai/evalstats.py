"""The evaluation's statistics (numpy only): accuracy with ties ½, seeded percentile bootstrap
intervals, McNemar's test and the paired bootstrap, rank correlations, calibration (ECE) and
margin summaries. `cai eval` (cai/evaluate.py), its probes and its verdicts compute with these.
"""

from __future__ import annotations

import math

import numpy as np

TIE_TOL = 1e-6  # batched scoring of identical text can differ in the last float bits
ALPHA = 0.05


def accuracy_vector(delta_pref: np.ndarray) -> np.ndarray:
    """1 where the preferred response scores higher, ½ on a tie, 0 otherwise."""
    d = np.asarray(delta_pref, dtype=float)
    return np.where(np.abs(d) <= TIE_TOL, 0.5, (d > 0).astype(float))


def _boot_indices(n: int, n_boot: int, seed: int, chunk: int = 250):
    """Bootstrap row indices in chunks, so 100k rows × 2000 resamples never sits in memory."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def bootstrap_mean(x, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The bootstrap distribution of the mean of ``x`` (resampling rows)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return np.array([np.nan])
    return np.concatenate([x[idx].mean(axis=1) for idx in _boot_indices(len(x), n_boot, seed)])


def ci(dist: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(dist, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return [float(lo), float(hi)]


def mean_ci(x, n_boot: int = 2000, seed: int = 0) -> dict:
    """{"value", "ci": [lo, hi], "n"} for the mean of x; value None when x is empty."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    return {"value": float(x.mean()), "ci": ci(bootstrap_mean(x, n_boot, seed)), "n": len(x)}


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial test of k successes in n at p = ½ (the exact McNemar test)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # log-space so thousands of discordant pairs do not overflow a float
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(v - m) for v in logs)
    return float(min(1.0, 2 * tail))


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test on the pairs where exactly one model is right.

    With ties counted ½ a row is discordant when the two scores differ; ``b`` counts rows where
    A did better, ``c`` where B did. Exact binomial below 50 discordant rows (the χ²
    approximation is poor there), continuity-corrected χ² above.
    """
    a, b_ = np.asarray(correct_a, float), np.asarray(correct_b, float)
    b = int((a > b_).sum())
    c = int((a < b_).sum())
    n = b + c
    if n < 50:
        return {"b": b, "c": c, "p": binom_two_sided(b, n), "method": "exact binomial"}
    chi2 = (abs(b - c) - 1) ** 2 / n
    return {
        "b": b,
        "c": c,
        "p": float(math.erfc(math.sqrt(chi2 / 2))),
        "method": "chi-square, continuity-corrected",
    }


def paired_test(correct_a, correct_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy difference A − B on the same rows: paired bootstrap interval + McNemar."""
    a, b = np.asarray(correct_a, float), np.asarray(correct_b, float)
    d = a - b
    dist = bootstrap_mean(d, n_boot, seed)
    out = {"diff": float(d.mean()) if len(d) else None, "ci": ci(dist), "n": len(d)}
    # share of resamples on the other side of zero: a bootstrap p-value, reported alongside McNemar
    out["p_bootstrap"] = float(min(1.0, 2 * min((dist <= 0).mean(), (dist >= 0).mean()))) if len(d) else 1.0
    out["mcnemar"] = mcnemar(a, b)
    lo, hi = out["ci"]
    out["significant"] = bool(out["mcnemar"]["p"] < ALPHA and (lo > 0 or hi < 0))
    return out


def rankdata(x) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata does."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None  # undefined for a constant series
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float | None:
    return pearson(rankdata(x), rankdata(y))


def corr_ci(fn, xs: np.ndarray, ys: np.ndarray, n_boot: int, seed: int) -> dict:
    """Correlation over responses with an interval from resampling *pairs* (the two responses
    of a pair share a prompt, so they are not independent points). xs/ys have shape (n, 2)."""
    n = len(xs)
    value = fn(xs.ravel(), ys.ravel())
    if value is None:
        return {"value": None, "ci": [None, None], "n": int(xs.size)}
    rng = np.random.default_rng(seed)
    dist = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(xs[idx].ravel(), ys[idx].ravel())
        dist.append(np.nan if v is None else v)
    return {"value": value, "ci": ci(np.array(dist)), "n": int(xs.size)}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, float), -60, 60)))


def calibration(delta_pref, n_bins: int = 10) -> dict:
    """Expected calibration error of σ(Δ) as the probability that the model's pick is right.

    Top-label form: confidence = max(σ(Δ), 1 − σ(Δ)) in [½, 1], outcome = the pick is the
    preferred response (ties ½). With human test labels every row points the same way, so the
    two-sided σ(Δ)-vs-label curve carries no more information than this one.
    """
    d = np.asarray(delta_pref, float)
    p = sigmoid(d)
    conf = np.maximum(p, 1 - p)
    correct = accuracy_vector(d)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        if not m.any():
            continue
        c, a = float(conf[m].mean()), float(correct[m].mean())
        ece += m.mean() * abs(c - a)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(m.sum()),
                "confidence": c,
                "accuracy": a,
            }
        )
    return {
        "ece": float(ece) if len(d) else None,
        "bins": bins,
        "mean_confidence": float(conf.mean()) if len(d) else None,
    }


def margin_stats(delta_pref) -> dict:
    d = np.asarray(delta_pref, float)
    if len(d) == 0:
        return {}
    q = np.percentile(d, [5, 25, 50, 75, 95])
    return {
        "mean": float(d.mean()),
        "std": float(d.std()),
        "mean_abs": float(np.abs(d).mean()),
        "q05": float(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "q95": float(q[4]),
        "frac_positive": float((d > TIE_TOL).mean()),
        "frac_tie": float((np.abs(d) <= TIE_TOL).mean()),
    }
