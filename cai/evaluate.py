"""Reward-model evaluation: accuracy, calibration, margins, paired tests and robustness probes.

A *scorer* is anything that maps pairs-contract rows to ``(r_chosen, r_rejected)`` per row — a
trained reward model folder (via ``cai.score.score_pairs``), or a plain function in tests and
for the trivial baselines. Everything here is numpy; the numbers are computed once into a
``metrics`` dict, which ``cai.report`` turns into metrics.json, report.md/.html and PNG plots.
The statistics are cai/evalstats.py, the probes cai/probes.py, the plain-language verdicts
cai/verdicts.py and the pairs (their preferred side made explicit) cai/pairset.py.

Conventions (all stated again in the report):
- Accuracy counts a tie (|Δ| ≤ TIE_TOL) as ½, so a reward that cannot tell responses apart
  scores exactly 50%.
- The *preferred* response is ``chosen`` when the row's ``label.p_chosen`` > 0.5 and
  ``rejected`` when it is < 0.5; rows labelled exactly 0.5 have no preferred side and are left
  out (and counted).
- Intervals are percentile bootstrap 95% intervals over pairs, seeded, so reruns reproduce.
- A reward model whose artifact carries a length fit (`cai train --length-correction`,
  cai/lengthfit.py) also gets a *length-corrected* column: the same figures with the fit
  subtracted from every reward (``--no-length-correct`` leaves it out).
- Rows with a ``subset`` (RewardBench's layout) get accuracy per subset next to the "longer
  answer" and "shorter answer" baselines on that subset; a subset where either shortcut scores
  ``SHORTCUT`` or more is flagged.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cai.configs import EvalConfig
from cai.errors import InputError
from cai.evalstats import (
    ALPHA,
    TIE_TOL,
    accuracy_vector,
    bootstrap_mean,
    calibration,
    ci,
    margin_stats,
    mean_ci,
    paired_test,
)
from cai.fmt import pct as _pct
from cai.guard import claim_output
from cai.pairset import PairSet, load_pairset
from cai.probes import format_probe, length_probe, probe_rows, refusal_probe
from cai.recheck import stats as recheck_stats
from cai.records import response_text
from cai.verdicts import annotate, length_balanced

Scorer = Callable[[list[dict]], list[tuple[float, float]]]

SHORTCUT = 0.75  # a subset where "longer/shorter answer" scores this much is flagged
NO_SUBSET = "(no subset)"


def rm_scorer(
    rm_dir,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | None = None,
    length_correct: bool = True,
) -> Scorer:
    """A trained reward-model folder as a scorer (cai.score does the batching). With
    ``length_correct`` its ``length_correction`` attribute is the artifact's length fit (None
    when it has none): `evaluate` then adds the length-corrected figures."""
    from cai import lengthfit

    def score(rows):
        from cai.score import score_pairs

        return score_pairs(rm_dir, rows, batch_size=batch_size, max_length=max_length, device=device)

    score.length_correction = lengthfit.from_artifact(rm_dir) if length_correct else None
    return score


def _len_scorer(sign: float) -> Scorer:
    def score(rows):
        return [
            (sign * len(response_text(r["chosen"])), sign * len(response_text(r["rejected"]))) for r in rows
        ]

    return score


# Trivial baselines: what a reward model must beat to have learned anything.
BASELINES: dict[str, tuple[Scorer, str]] = {
    "always-first": (
        lambda rows: [(0.0, 0.0)] * len(rows),
        "a reward that cannot tell responses apart (the same score for both, so every pair is a tie "
        "and counts ½): the 50% chance floor",
    ),
    "shorter answer": (_len_scorer(-1.0), "prefers the response with fewer characters"),
    "longer answer": (_len_scorer(1.0), "prefers the response with more characters"),
}


def score_pairset(scorer: Scorer, ps: PairSet, probe_n: int = 0) -> dict:
    """All the numbers a model needs, from one scorer call (a reward model loads once).
    The probes score four extra responses for each of the first ``probe_n`` pairs."""
    rows = list(ps.rows) + probe_rows(ps, probe_n)
    scores = np.array(scorer(rows), float).reshape(-1, 2)
    rc_rr = scores[: ps.n]
    out = {
        "r_pref": np.where(ps.sign > 0, rc_rr[:, 0], rc_rr[:, 1]),
        "r_other": np.where(ps.sign > 0, rc_rr[:, 1], rc_rr[:, 0]),
    }
    if probe_n:
        s = scores[ps.n :].reshape(probe_n, 4)
        out.update(r_refusal=s[:, 0], r_ws=s[:, 1], r_md=s[:, 2], r_md_other=s[:, 3])
    return out


def model_metrics(
    scores: dict, ps: PairSet, n_boot: int, seed: int, probes: bool = True, baseline: bool = False
) -> dict:
    """Accuracy and margins; for a model (not a ``baseline``) calibration too, and with ``probes``
    the probes. The length probe needs only the pairs' own scores, so it uses every pair; refusal
    and format use the pairs that got probe responses (the first k)."""
    delta = scores["r_pref"] - scores["r_other"]
    correct = accuracy_vector(delta)
    m = {
        "accuracy": mean_ci(correct, n_boot, seed),
        "ties": int((np.abs(delta) <= TIE_TOL).sum()),
        "margin": margin_stats(delta),
    }
    if baseline:
        return m  # a baseline's scores are lengths or constants: σ(Δ) means nothing
    m["calibration"] = calibration(delta)
    if not probes:
        return m
    m["probes"] = {
        "length": length_probe(correct, scores["r_pref"], scores["r_other"], ps, n_boot, seed + 10)
    }
    k = len(scores.get("r_refusal", ()))
    if k:
        pp, r_pref, r_other = ps.head(k), scores["r_pref"][:k], scores["r_other"][:k]
        m["probes"]["pairs"] = k
        m["probes"]["refusal"] = refusal_probe(r_pref, scores["r_refusal"], pp, n_boot, seed + 20)
        m["probes"]["format"] = format_probe(
            delta[:k],
            r_pref,
            r_other,
            {
                "whitespace": (scores["r_ws"], None),
                "markdown": (scores["r_md"], scores["r_md_other"]),
            },
            n_boot,
            seed + 30,
        )
    return m


def corrected_metrics(
    scores: dict, ps: PairSet, fit: dict, correct_raw, n_boot: int, seed: int, probes: bool
):
    """The length-corrected column: accuracy (and with ``probes`` the length probe) with the
    artifact's length fit subtracted from every reward, and the paired change from the raw."""
    from cai import lengthfit

    r_pref = scores["r_pref"] - lengthfit.bias(fit, ps.len_pref)
    r_other = scores["r_other"] - lengthfit.bias(fit, ps.len_other)
    correct = accuracy_vector(r_pref - r_other)
    m = {
        "accuracy": mean_ci(correct, n_boot, seed),
        "ties": int((np.abs(r_pref - r_other) <= TIE_TOL).sum()),
        "vs_raw": paired_test(correct, correct_raw, n_boot, seed + 70),
        "fit": {k: fit.get(k) for k in ("method", "pairs", "characters")},
    }
    if probes:
        m["probes"] = {"length": length_probe(correct, r_pref, r_other, ps, n_boot, seed + 10)}
    m["_correct"] = correct
    return m


def subset_metrics(ps: PairSet, correct: dict, corrected: dict, n_boot: int, seed: int) -> dict | None:
    """Accuracy per ``subset`` for every model (and its length-corrected column) and the two length
    baselines; None when no row names a subset."""
    names = [r.get("subset") for r in ps.rows]
    if all(x is None for x in names):
        return None
    names = [NO_SUBSET if x is None else str(x) for x in names]
    out = {}
    for sub in sorted(set(names)):
        mask = np.array([x == sub for x in names])
        entry = {
            "n": int(mask.sum()),
            "models": {n: mean_ci(c[mask], n_boot, seed) for n, c in correct.items() if n not in BASELINES},
            "corrected": {n: mean_ci(c[mask], n_boot, seed) for n, c in corrected.items()},
            "baselines": {
                b: mean_ci(correct[b][mask], n_boot, seed) for b in ("longer answer", "shorter answer")
            },
        }
        entry["shortcut"] = [b for b, r in entry["baselines"].items() if r["value"] >= SHORTCUT]
        out[sub] = entry
    return out


def evaluate(
    models: dict[str, Scorer],
    ps: PairSet,
    *,
    shift: PairSet | None = None,
    provenance: dict | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    probes: bool = True,
    probe_limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Score every model (and the trivial baselines) on ``ps``; return the metrics dict."""
    from tqdm.auto import tqdm

    provenance = provenance or {}
    probe_n = min(ps.n, probe_limit or ps.n) if probes else 0
    t0 = time.time()
    metrics: dict = {
        "data": {"test": ps.source, "shift": shift.source if shift else None},
        "settings": {
            "bootstrap": n_boot,
            "seed": seed,
            "alpha": ALPHA,
            "tie_tol": TIE_TOL,
            "probes": probes,
            "probe_pairs": probe_n,
        },
        "models": {},
        "baselines": {},
        "comparisons": [],
        "notes": [],
    }
    correct: dict[str, np.ndarray] = {}
    corrected: dict[str, np.ndarray] = {}
    for name, (fn, desc) in BASELINES.items():
        s = score_pairset(fn, ps)
        bm = model_metrics(s, ps, n_boot, seed, baseline=True)
        bm["description"] = desc
        metrics["baselines"][name] = bm
        correct[name] = accuracy_vector(s["r_pref"] - s["r_other"])

    bar = tqdm(
        models.items(), desc="eval: scoring models", unit="model", file=sys.stderr, disable=not progress
    )
    for name, scorer in bar:
        bar.set_postfix_str(name)
        t1 = time.time()
        s = score_pairset(scorer, ps, probe_n)
        m = model_metrics(s, ps, n_boot, seed, probes=probes)
        m["source"] = provenance.get(name, {})
        correct[name] = accuracy_vector(s["r_pref"] - s["r_other"])
        m["_delta"] = (s["r_pref"] - s["r_other"]).tolist()  # for the plots; dropped from metrics.json
        if shift is not None:
            ss = score_pairset(scorer, shift)
            sc = accuracy_vector(ss["r_pref"] - ss["r_other"])
            sh = {"accuracy": mean_ci(sc, n_boot, seed + 40)}
            drop = bootstrap_mean(sc, n_boot, seed + 40) - bootstrap_mean(correct[name], n_boot, seed)
            sh["change"] = {"value": float(sc.mean() - correct[name].mean()), "ci": ci(drop)}
            m["shift"] = sh
        fit = getattr(scorer, "length_correction", None)
        if fit:
            m["length_corrected"] = corrected_metrics(s, ps, fit, correct[name], n_boot, seed, probes)
            corrected[name] = m["length_corrected"].pop("_correct")
        vs = {b: paired_test(correct[name], correct[b], n_boot, seed + 50) for b in BASELINES}
        m["vs_baselines"] = vs
        m["seconds"] = round(time.time() - t1, 2)
        metrics["models"][name] = m

    names = list(models)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            t = paired_test(correct[a], correct[b], n_boot, seed + 60)
            t.update(a=a, b=b)
            metrics["comparisons"].append(t)
    rc = recheck_stats(ps.rows)  # the pairs' own re-check (`--recheck`), when they carry one
    if rc:
        metrics["recheck"] = rc
    subsets = subset_metrics(ps, correct, corrected, n_boot, seed + 80)
    if subsets:
        metrics["subsets"] = subsets
    metrics["seconds"] = round(time.time() - t0, 2)
    return annotate(metrics)


def rm_provenance(rm_dir) -> dict:
    """What produced a reward model, read from the cai_train_config.json `cai train` writes."""
    p = Path(rm_dir)
    out: dict = {"path": str(p)}
    try:
        rec = json.loads((p / "cai_train_config.json").read_text())
    except (OSError, ValueError):
        return out  # a model from elsewhere: the report says its provenance is unknown
    cfg, train = rec.get("config", {}), rec.get("data", {}).get("train") or {}
    out.update(
        base=cfg.get("base"), labels=cfg.get("labels"), epochs=cfg.get("epochs"), status=rec.get("status")
    )
    if train:
        out["pairs"] = (
            f"{train.get('path')} (sha256 {str(train.get('sha256'))[:12]}, {train.get('rows')} pairs)"
        )
        out["n_train"] = train.get("rows")
        out["label_sources"] = train.get("label_sources")
    return out


def _unique_names(rms: list[str], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(rms):
            raise InputError(
                f"got {len(names)} --name for {len(rms)} --rm; give one name per reward model, or none"
            )
        out = list(names)
    else:
        out = [Path(r).name or str(r) for r in rms]
        for i, n in enumerate(out):  # rm-a/model and rm-b/model both named "model"
            if out.count(n) > 1:
                out[i] = str(Path(rms[i]))
    if len(set(out)) != len(out):
        raise InputError(f"two reward models share the name {out}; pass --name for each")
    if set(out) & set(BASELINES):
        raise InputError(
            f"a reward model may not be named like a baseline ({', '.join(BASELINES)}); pass --name"
        )
    return out


def run_eval(cfg: EvalConfig, provenance: dict | None = None, progress: bool = True) -> dict:
    """`cai eval`: score the reward models on the pairs, write metrics.json + report + plots."""
    from cai.models import check_reward_model
    from cai.options import check_config
    from cai.report import write_report

    check_config(cfg)
    if not cfg.rms:
        raise InputError("no reward model given; pass --rm FOLDER (repeat it to compare several)")
    for r in cfg.rms:
        check_reward_model(r, "--rm")
    names = _unique_names(cfg.rms, cfg.names)
    with claim_output(
        cfg.out,
        inputs=[cfg.pairs, cfg.shift_pairs, *cfg.rms],
        kind="folder",
        marker=("metrics.json", "report folder"),  # one rule for whole-folder outputs (train's too)
        discard_on_error=True,  # a report folder this run made is removed when the run fails
    ):
        ps = load_pairset(cfg.pairs, cfg.limit, cfg.skip_bad)
        shift = load_pairset(cfg.shift_pairs, cfg.limit, cfg.skip_bad) if cfg.shift_pairs else None
        prov = {n: {**rm_provenance(r), **((provenance or {}).get(n, {}))} for n, r in zip(names, cfg.rms)}
        models = {
            n: rm_scorer(
                r,
                batch_size=cfg.rm_batch_size,
                max_length=cfg.max_length,
                device=cfg.device,
                length_correct=cfg.length_correct,
            )
            for n, r in zip(names, cfg.rms)
        }
        metrics = evaluate(
            models,
            ps,
            shift=shift,
            provenance=prov,
            n_boot=cfg.bootstrap,
            seed=cfg.seed,
            probes=cfg.probes,
            probe_limit=cfg.probe_limit or None,
            progress=progress,
        )
        metrics["config"] = asdict(cfg)
        write_report(metrics, cfg.out)
    return metrics


def summary_line(metrics: dict, out) -> str:
    parts = [
        f"{n} {_pct(m['accuracy']['value'])}"
        + (f" (length-balanced {_pct(lb['value'])})" if (lb := length_balanced(m)) else "")
        + (
            f", length-corrected {_pct(lc['accuracy']['value'])}"
            + (f" (length-balanced {_pct(lb2['value'])})" if (lb2 := length_balanced(lc)) else "")
            if (lc := m.get("length_corrected"))
            else ""
        )
        for n, m in metrics["models"].items()
    ]
    best = max(
        (b["accuracy"]["value"] for k, b in metrics["baselines"].items() if k != "always-first"), default=None
    )
    return (
        f"cai eval: {metrics['data']['test']['n']} pairs; accuracy {', '.join(parts)} "
        f"(best trivial baseline {_pct(best)}) -> {out}/report.html"
    )
