"""Length-corrected rewards: reward fitted against response length, and subtracted.

A post-hoc fix for a reward model that leans on length, needing no retraining (Huang et al.
2024, "Post-hoc Reward Calibration: A Case Study on Length Bias", arXiv 2409.17407: fit reward
against length with a local regression and subtract the fit). `cai train` fits it on its own
training pairs once training ends and stores it in the artifact (``cai_train_config.json``,
key ``length_correction``); `cai score` and `cai eval` subtract it.

The fit (:func:`fit`):

- x = log(1 + characters) of each response (lengths are heavy-tailed; characters, as the length
  probe of `cai eval` counts them);
- the model is ``r_chosen - r_rejected = f(x_chosen) - f(x_rejected) + noise``: a reward model is
  only ever compared within a prompt, and prompts differ in reward level (a prompt asking for a
  recipe gets long answers and a different baseline than a one-line question), which a fit of raw
  rewards on length would read as a length effect; differencing within the pair removes each
  prompt's level exactly;
- f is a cubic regression spline (scikit-learn's ``SplineTransformer``, 8 knots at quantiles of
  the training lengths), its coefficients ridge-penalised with the penalty chosen by efficient
  leave-one-out cross-validation (``RidgeCV``);
- stored as a table of f on 64 points spanning the training lengths, centred on the training
  responses, applied by linear interpolation and held flat beyond them (:func:`bias`), so
  applying it needs numpy only and an unusually long test response is not extrapolated into
  nonsense;
- applied at a **strength** s in [0, 1] (:func:`choose_strength`): f is all of the reward's
  dependence on length, including the part the preferences themselves carry (in HH-RLHF
  harmless the shorter answer is the preferred one more often, so a fair reward leans short
  too), and subtracting all of it overshoots: on the default model's own training pairs the gap
  between "preferred is longer" and "preferred is shorter" accuracy went from -22 to +11 points.
  s is the share of f that leaves the model length-balanced on its training pairs (the smallest
  |gap| on a grid of 0.05), chosen from the training pairs alone.

The corrected reward is ``r - s * f(log(1 + characters))``.
"""

from __future__ import annotations

import numpy as np

GRID = 64  # points of the stored table
KNOTS = 8
ALPHAS = tuple(10.0**k for k in range(-3, 5))  # ridge penalties RidgeCV chooses from
METHOD = (
    "cubic regression spline of reward on log(1 + characters), fitted to within-pair reward "
    "differences (scikit-learn SplineTransformer, 8 quantile knots; RidgeCV, leave-one-out)"
)


def _x(lengths) -> np.ndarray:
    return np.log1p(np.asarray(lengths, dtype=np.float64))


def fit(rewards, lengths) -> dict | None:
    """The correction for (n, 2) rewards and character lengths of n pairs (chosen, rejected).

    Returns the JSON-ready record (``x``/``y`` table, method, penalty, counts), or None when
    there is too little to fit (fewer than 5 distinct lengths, or no reward differences)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import SplineTransformer

    r = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    x = _x(lengths).reshape(-1, 2)
    keep = np.isfinite(r).all(1) & np.isfinite(x).all(1)
    r, x = r[keep], x[keep]
    distinct = np.unique(x)
    delta = r[:, 0] - r[:, 1]
    if len(distinct) < 5 or not np.any(delta):
        return None
    spline = SplineTransformer(
        n_knots=min(KNOTS, len(distinct) - 2), degree=3, knots="quantile", extrapolation="constant"
    ).fit(x.reshape(-1, 1))
    design = spline.transform(x[:, :1]) - spline.transform(x[:, 1:])
    # B-splines sum to one, so a constant in f cancels in every difference: no intercept
    ridge = RidgeCV(alphas=ALPHAS, fit_intercept=False).fit(design, delta)
    grid = np.linspace(distinct[0], distinct[-1], GRID)
    table = spline.transform(grid.reshape(-1, 1)) @ ridge.coef_
    table -= (spline.transform(x.reshape(-1, 1)) @ ridge.coef_).mean()  # zero over the training responses
    explained = 1.0 - float(np.mean((delta - design @ ridge.coef_) ** 2) / np.mean(delta**2))
    return {
        "method": METHOD,
        "x": [round(float(v), 6) for v in grid],
        "y": [round(float(v), 6) for v in table],
        "characters": [int(round(np.expm1(distinct[0]))), int(round(np.expm1(distinct[-1])))],
        "pairs": int(len(r)),
        "distinct_lengths": int(len(distinct)),
        "ridge_alpha": float(ridge.alpha_),
        "share_of_margin_variance_explained": round(explained, 4),
    }


def check(record, where="the reward model's length_correction") -> dict:
    """A stored correction with an increasing ``x`` table and a ``y`` of the same length."""
    from cai.errors import InputError

    try:
        x, y = np.asarray(record["x"], np.float64), np.asarray(record["y"], np.float64)
        ok = x.ndim == 1 and x.shape == y.shape and len(x) >= 2 and np.isfinite(x).all()
        ok = ok and np.isfinite(y).all() and bool(np.all(np.diff(x) > 0))
        s = record.get("strength", 1.0)
        ok = ok and isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s <= 1.0
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"{where} is not a table of increasing x with as many finite y and a strength in [0, 1]; "
            "retrain the model (cai train)"
        )
    return record


def bias(record: dict, lengths) -> np.ndarray:
    """s * f(log(1 + characters)) for each length: the part of the reward put down to length."""
    f = np.interp(_x(lengths), np.asarray(record["x"]), np.asarray(record["y"]))
    return float(record.get("strength", 1.0)) * f


def choose_strength(record: dict, rewards, lengths, gap, step: float = 0.05) -> dict:
    """The record with ``strength``: the share of the fit whose subtraction makes ``gap`` (a
    function of corrected (n, 2) rewards: accuracy when the preferred response is the longer minus
    when it is the shorter, None when undefined) smallest in size; ties go to the weaker
    correction. ``strength_search`` keeps every [strength, gap] tried. Without a gap to measure
    (no pair on one side) the whole fit is used."""
    grid = np.round(np.arange(0.0, 1.0 + step / 2, step), 4)
    tried = []
    for s in grid:
        g = gap(correct({**record, "strength": float(s)}, rewards, lengths))
        if g is None:
            return {**record, "strength": 1.0, "strength_search": []}
        tried.append([float(s), round(float(g), 4)])
    best = min(tried, key=lambda t: (abs(t[1]), t[0]))
    return {**record, "strength": best[0], "strength_search": tried}


def correct(record: dict, rewards, lengths) -> np.ndarray:
    """Rewards with the length fit subtracted (same shape as ``rewards``)."""
    r = np.asarray(rewards, dtype=np.float64)
    return r - bias(record, np.asarray(lengths, dtype=np.float64)).reshape(r.shape)


def from_artifact(rm_dir, config_name: str = "cai_train_config.json") -> dict | None:
    """A reward-model folder's fitted correction, checked; None when it has none (trained with
    --no-length-correction or by an older cai, too few lengths to fit, or not a cai model)."""
    import json
    from pathlib import Path

    path = Path(rm_dir) / config_name
    try:
        rec = json.loads(path.read_text()).get("length_correction")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(rec, dict) or "x" not in rec:
        return None
    return check(rec, f"{path}: length_correction")
