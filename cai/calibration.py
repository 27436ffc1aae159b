"""The judge's calibration map: from its ``p_chosen`` to P(a person prefers ``chosen``).

`cai calibrate` fits the map on the pairs a person labelled (`cai/calibrate.py`); `cai label
--calibration` applies it (`cai/feedback.py`). This module is the map itself: fitting, applying,
checking it fits the judge at hand, reading and validating ``calibration.json``.

- **Monotone.** Isotonic regression (scikit-learn), or Platt scaling (a logistic regression on
  logit p, scikit-learn) when fewer than ``ISOTONIC_MIN`` pairs are shared: isotonic regression
  has a free value per step and overfits a small slice, Platt has one parameter.
- **Orientation-free.** Each pair is used twice, as (p, y) and (1 − p, 1 − y): which response a
  file calls ``chosen`` is arbitrary (in HH-RLHF files it is always the person's pick, which a
  one-sided fit would learn as "chosen wins"), so the map satisfies g(1 − p) = 1 − g(p) and
  Platt has no intercept.
- **Never certain.** Isotonic values are kept within [1/(2n + 2), 1 − 1/(2n + 2)]: n pairs do not
  justify a probability of exactly 0 or 1.
- **Portable.** Stored as numbers, applied with numpy alone: isotonic as its step table
  (``x``, ``y``, linearly interpolated and held flat beyond its ends, as scikit-learn predicts),
  Platt as its slope ``a`` in ``σ(a · logit p)``.
- **Fitted for one judge.** ``judge`` (model by content hash, principles per pair, chain of
  thought and its clamp, answer options) and ``constitution`` (name, sha256) are recorded;
  :func:`check_judge` refuses to apply the map to labels made any other way.

Human labels ``y`` may be soft (several annotators: their mean; a tie: ½).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cai.errors import InputError

ISOTONIC_MIN = 100  # fewer shared pairs: Platt scaling
METHODS = ("auto", "isotonic", "platt")
KIND = "cai judge calibration"
_EPS = 1e-4  # p is clipped to [eps, 1 - eps] before a logit
BINS = 10


# ============================================================================ the map


def _mirror(p, y) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    return np.concatenate([p, 1.0 - p]), np.concatenate([y, 1.0 - y])


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1.0 - _EPS)
    return np.log(p / (1.0 - p))


def resolve_method(method: str, n: int) -> str:
    if method not in METHODS:
        raise InputError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if method == "auto":
        return "isotonic" if n >= ISOTONIC_MIN else "platt"
    return method


def fit(p, y, method: str = "auto") -> dict:
    """The map from judge probabilities ``p`` to human labels ``y`` (both in [0, 1], one per pair)."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    n = len(p)
    method = resolve_method(method, n)
    xm, ym = _mirror(p, y)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        eps = 1.0 / (2 * n + 2)
        iso = IsotonicRegression(y_min=eps, y_max=1 - eps, out_of_bounds="clip").fit(xm, ym)
        return {
            "method": "isotonic",
            "x": [round(float(v), 6) for v in iso.X_thresholds_],
            "y": [round(float(v), 6) for v in iso.y_thresholds_],
            "n": n,
        }
    from sklearn.linear_model import LogisticRegression

    # y as sample weights of the two classes: soft labels (ties, several annotators) count as they are
    z = _logit(xm).reshape(-1, 1)
    feats = np.concatenate([z, z])
    cls = np.concatenate([np.ones(len(z)), np.zeros(len(z))])
    w = np.concatenate([ym, 1.0 - ym])
    keep = w > 0
    if len(set(cls[keep])) < 2:  # cannot happen with mirrored data; kept for safety
        return {"method": "platt", "slope": 1.0, "n": n, "clip": _EPS}
    lr = LogisticRegression(fit_intercept=False, C=1.0).fit(feats[keep], cls[keep], sample_weight=w[keep])
    return {"method": "platt", "slope": round(float(lr.coef_[0, 0]), 6), "n": n, "clip": _EPS}


def apply(m: dict, p) -> np.ndarray:
    """Calibrated probabilities for judge probabilities ``p`` (numpy only)."""
    p = np.asarray(p, np.float64)
    if m["method"] == "isotonic":
        return np.interp(p, np.asarray(m["x"], np.float64), np.asarray(m["y"], np.float64))
    z = m["slope"] * _logit(p)
    return 1.0 / (1.0 + np.exp(-z))


# ============================================================================ how well it does


def log_loss(q, y) -> float:
    """Cross-entropy of soft labels y under probabilities q (q clipped to [1e-6, 1 − 1e-6])."""
    q = np.clip(np.asarray(q, np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def brier(q, y) -> float:
    return float(np.mean((np.asarray(q, np.float64) - np.asarray(y, np.float64)) ** 2))


def reliability(q, y, bins: int = BINS) -> dict:
    """Top-label reliability, as `cai eval` reads a reward model's: confidence max(q, 1 − q) in
    [½, 1] against how often the side it picks is the one people picked (soft labels count as
    they are; q = ½ picks nothing and counts ½). ECE: the pair-weighted gap over ``bins`` bins."""
    q, y = np.asarray(q, np.float64), np.asarray(y, np.float64)
    conf = np.maximum(q, 1 - q)
    hit = np.where(q > 0.5, y, np.where(q < 0.5, 1 - y, 0.5))
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        c, a = float(conf[m].mean()), float(hit[m].mean())
        ece += m.mean() * abs(c - a)
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(m.sum()),
                "confidence": c,
                "agreement": a,
            }
        )
    return {"ece": round(float(ece), 4) if len(q) else None, "bins": out}


def scores(q, y) -> dict:
    return {
        "log_loss": round(log_loss(q, y), 4),
        "brier": round(brier(q, y), 4),
        "ece": reliability(q, y)["ece"],
    }


def cross_validate(p, y, method: str, folds: int = 5, seed: int = 0) -> dict | None:
    """Held-out reliability: the pairs split into ``folds`` (seeded), a map fitted on all folds
    but one predicts that one. Returns the pooled held-out scores of the raw and the calibrated
    probabilities, each fold's log losses, and the held-out predictions; None below 2 pairs."""
    from sklearn.model_selection import KFold

    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    n = len(p)
    k = min(folds, n)
    if k < 2:
        return None
    method = resolve_method(method, n)
    held = np.empty(n)
    per_fold = []
    for train, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(p):
        held[test] = apply(fit(p[train], y[train], method), p[test])
        per_fold.append(
            {
                "n": int(len(test)),
                "raw_log_loss": round(log_loss(p[test], y[test]), 4),
                "calibrated_log_loss": round(log_loss(held[test], y[test]), 4),
            }
        )
    return {
        "folds": k,
        "seed": seed,
        "method": method,
        "raw": scores(p, y),
        "calibrated": scores(held, y),
        "per_fold": per_fold,
        "reliability": {"raw": reliability(p, y), "calibrated": reliability(held, y)},
        "_held_out": held.tolist(),
    }


# ============================================================================ which judge it is for


def judge_signature(meta: dict | None, label: dict | None = None) -> dict | None:
    """What identifies a judge's labels, from a labelled row's ``meta`` (`cai label` or
    `cai generate`): the model (by content hash where recorded), principles per pair, chain of
    thought (and its clamp) and the answer options. None when the row carries no meta."""
    if not isinstance(meta, dict) or not meta.get("model"):
        return None
    params = meta.get("params") or {}
    principles = params["principles"] if "principles" in params else params.get("judge_principles")
    cot = bool(params.get("cot", False))
    judge = (label or {}).get("judge") or {}
    return {
        "model": meta.get("model"),
        "model_sha256": meta.get("model_sha256") or None,
        "principles": "all" if principles in (None, 0, "all") else principles,
        "cot": cot,
        "clamp": params.get("clamp") if cot else None,
        "options": params.get("options") or judge.get("options") or ["A", "B"],
    }


def _same_model(a: dict, b: dict) -> bool:
    if a.get("model_sha256") and b.get("model_sha256"):
        return a["model_sha256"] == b["model_sha256"]
    return a.get("model") == b.get("model")


def check_judge(calib: dict, path, *, constitution: dict, signature: dict, model: bool = True):
    """Refuse a calibration fitted for another constitution or judge (``model``: compare the
    model too; `cai label` checks everything else before loading one)."""
    want_c = calib["constitution"]
    if want_c.get("sha256") != constitution.get("sha256"):
        raise InputError(
            f"was fitted for constitution {want_c.get('name')!r} (sha256 {str(want_c.get('sha256'))[:12]}), "
            f"not {constitution.get('name')!r} (sha256 {str(constitution.get('sha256'))[:12]}); "
            "fit one for this constitution with cai calibrate",
            path,
        )
    want = calib["judge"]
    for k in ("principles", "cot", "clamp", "options"):
        if json.dumps(want.get(k)) != json.dumps(signature.get(k)):
            raise InputError(
                f"was fitted for a judge with {k} = {json.dumps(want.get(k))}, this run has "
                f"{json.dumps(signature.get(k))}; label with the same settings or fit a calibration "
                "for these (cai calibrate)",
                path,
            )
    if model and not _same_model(want, signature):
        raise InputError(
            f"was fitted for the judge model {want.get('model')!r}"
            + (f" (sha256 {want['model_sha256'][:12]})" if want.get("model_sha256") else "")
            + f", not {signature.get('model')!r}"
            + (f" (sha256 {signature['model_sha256'][:12]})" if signature.get("model_sha256") else "")
            + "; fit a calibration for this model with cai calibrate",
            path,
        )


def load(path) -> dict:
    """A ``calibration.json`` written by `cai calibrate`, checked; errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "calibration.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found; pass the calibration.json that cai calibrate wrote", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"cannot read it as JSON ({e}); pass the calibration.json of cai calibrate", path
        ) from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise InputError(
            'is not a calibration written by cai calibrate (no "kind": "cai judge calibration")', path
        )
    m = rec.get("map")
    ok = (
        isinstance(m, dict)
        and isinstance(rec.get("judge"), dict)
        and isinstance(rec.get("constitution"), dict)
    )
    if ok and m.get("method") == "isotonic":
        try:
            x, y = np.asarray(m["x"], np.float64), np.asarray(m["y"], np.float64)
            ok = (
                x.ndim == 1
                and x.shape == y.shape
                and len(x) >= 1
                and np.isfinite(x).all()
                and np.isfinite(y).all()
            )
            ok = (
                ok
                and bool(np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0))
                and 0 <= y.min()
                and y.max() <= 1
            )
        except (KeyError, TypeError, ValueError):
            ok = False
    elif ok and m.get("method") == "platt":
        ok = (
            isinstance(m.get("slope"), (int, float))
            and not isinstance(m["slope"], bool)
            and math.isfinite(m["slope"])
        )
    else:
        ok = False
    if not ok:
        raise InputError(
            "has no valid map (isotonic x/y tables or a Platt slope); refit it with cai calibrate", path
        )
    rec["_path"] = str(path)
    return rec
