"""Rewards against labels, the figures `cai train` and `cai score` report (numpy only).

`pair_metrics`: accuracy (a reward tie counts half) and the mean margin toward the preferred
side; `length_metrics`: how much of the reward is length (accuracy when the preferred response
is the longer / the shorter, their mean and gap, Spearman(reward, length)). `cai eval`'s
bootstrap intervals are in cai/evalstats.py, its probes in cai/probes.py.
"""

from __future__ import annotations

import numpy as np


def pair_metrics(rewards, p) -> dict:
    """Accuracy against the label (a reward tie counts half) and mean margin toward the preferred side.

    `rewards` is (n, 2): chosen, rejected. Rows labelled exactly 0.5 prefer neither side and are left
    out, and so are rows without a label (``p_chosen`` null): no accuracy is made of them.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    p = np.array([np.nan if x is None else x for x in np.asarray(p, dtype=object).reshape(-1)], np.float64)
    sign = np.sign(p - 0.5)
    keep = np.isfinite(sign) & (sign != 0)  # rows without a label (p_chosen null) say nothing
    d = (r[:, 0] - r[:, 1])[keep] * sign[keep]
    if not len(d):
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    return {
        "accuracy": float(np.mean((d > 0) + 0.5 * (d == 0))),
        "margin": float(d.mean()),
        "pairs": int(len(d)),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def length_metrics(rewards, p, lengths) -> dict:
    """How much of the reward is length: accuracy when the preferred response is the longer /
    the shorter one, their mean (length-balanced accuracy), their gap, and Spearman(reward,
    length) over every response. Same definitions as the length probe of `cai eval`."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    ln = np.asarray(lengths, dtype=np.float64).reshape(-1, 2)
    sign = np.sign(np.asarray(p, dtype=np.float64).reshape(-1) - 0.5)
    d = (r[:, 0] - r[:, 1]) * sign
    correct = (d > 0) + 0.5 * (d == 0)
    longer = (ln[:, 0] - ln[:, 1]) * sign > 0
    shorter = (ln[:, 0] - ln[:, 1]) * sign < 0
    out = {}
    if longer.any() and shorter.any():
        a_l, a_s = float(correct[longer].mean()), float(correct[shorter].mean())
        out = {
            "acc_pref_longer": a_l,
            "acc_pref_shorter": a_s,
            "balanced_accuracy": (a_l + a_s) / 2,
            "length_gap": a_l - a_s,
        }
    x, y = r.reshape(-1), ln.reshape(-1)
    if x.std() > 0 and y.std() > 0:
        out["spearman_reward_length"] = float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])
    return out
