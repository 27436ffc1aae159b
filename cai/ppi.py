"""Prediction-powered inference for a rate: AI labels on every pair, corrected by a human slice.

Angelopoulos, Bates, Fannjiang, Jordan and Zrnic, "Prediction-powered inference", Science 382
(2023), with the power tuning of PPI++ (Angelopoulos, Duchi and Zrnic 2023). For the mean θ of
a human label Y over a population of pairs, given the judge's prediction f on every pair and Y
on a random slice of n of them (the other N pairs have f only):

    θ̂ = λ · mean(f over the N) + mean(Y − λ f over the n)
    Var(θ̂) ≈ λ² Var(f_N) / N + Var(Y − λ f_n) / n,   95% interval θ̂ ± 1.96 √Var

Any fixed λ gives a consistent estimate whatever the judge's bias: the second term measures
the judge's error on the slice and takes it off. λ = 0 is the human labels alone; λ = 1 is
plain PPI. λ here minimises the estimated variance (PPI++'s choice for a mean),

    λ = Cov(Y, f_n) / (Var(f_n) + (n / N) Var(f_N)),   clipped below at 0,

so the interval is never wider than the human-only one computed the same way, and narrower
whenever the judge's labels co-vary with people's. Unlike ppi_py (the authors' library, which
caps λ at 1), λ is not capped above: a small judge's probabilities are squeezed toward ½, and
using their signal takes λ > 1 (a regression estimator, as in survey sampling). A negative
covariance (a judge that runs against people) is not used: λ = 0.

*Effective human labels*: Var(Y) / Var(θ̂), the number of human labels alone that would give an
interval as narrow. The estimator is a few lines of numpy; ppi_py would bring numba,
statsmodels and a downloader for its example data sets with it.

Validity needs the human slice to be a random sample of the pairs (`cai review` answers pairs
in a seeded random order; skipping the hard ones on purpose breaks it), and Y and f to be the
same quantity in the same orientation.
"""

from __future__ import annotations

import math

import numpy as np

from cai.stats import Z95


def _var(x: np.ndarray) -> float:
    return float(np.var(x, ddof=1)) if len(x) > 1 else float("nan")


def _interval(est: float, se: float) -> list[float] | None:
    if not math.isfinite(se):
        return None
    return [round(max(0.0, est - Z95 * se), 4), round(min(1.0, est + Z95 * se), 4)]


def mean_ci(x) -> dict:
    """The plain mean with its normal-approximation 95% interval (clipped to [0, 1])."""
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return {"estimate": None, "ci": None, "se": None, "n": 0}
    se = math.sqrt(_var(x) / len(x)) if len(x) > 1 else float("nan")
    est = float(x.mean())
    return {
        "estimate": round(est, 4),
        "ci": _interval(est, se),
        "se": round(se, 6) if math.isfinite(se) else None,
        "n": int(len(x)),
    }


def ppi_mean(y, f_labelled, f_unlabelled) -> dict:
    """The PPI++ estimate of the mean of ``y``: ``f_labelled`` are the predictions on the pairs
    with a human label ``y`` (same order), ``f_unlabelled`` those on the pairs without one.

    Returns estimate, 95% ci, se, n, N, lambda and n_effective (see the module docstring)."""
    y = np.asarray(y, dtype=np.float64)
    f = np.asarray(f_labelled, dtype=np.float64)
    fu = np.asarray(f_unlabelled, dtype=np.float64)
    n, big_n = len(y), len(fu)
    out = {"estimate": None, "ci": None, "se": None, "n": n, "N": big_n, "lambda": 0.0, "n_effective": None}
    if n == 0:
        return out
    lam = 0.0
    if n > 1 and big_n > 1:
        denom = _var(f) + n / big_n * _var(fu)
        cov = float(np.cov(y, f, ddof=1)[0, 1])
        if denom > 0 and cov > 0:
            lam = cov / denom
    est = float(lam * fu.mean() + (y - lam * f).mean()) if big_n else float(y.mean())
    var = (lam**2 * _var(fu) / big_n if lam else 0.0) + (_var(y - lam * f) / n if n > 1 else float("nan"))
    se = math.sqrt(var) if math.isfinite(var) else float("nan")
    out.update({"estimate": round(est, 4), "ci": _interval(est, se), "lambda": round(lam, 4)})
    if math.isfinite(se):
        out["se"] = round(se, 6)
        vy = _var(y)
        out["n_effective"] = round(vy / var, 1) if var > 0 else None
    return out


def estimates(y, f_labelled, f_unlabelled) -> dict:
    """The rate three ways: human labels alone, AI labels alone (every pair, biased), and PPI."""
    f_all = np.concatenate([np.asarray(f_labelled, float), np.asarray(f_unlabelled, float)])
    return {
        "human": mean_ci(y),
        "ai": mean_ci(f_all),
        "ppi": ppi_mean(y, f_labelled, f_unlabelled),
    }
