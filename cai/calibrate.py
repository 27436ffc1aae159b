"""`cai calibrate`: fit the judge's probabilities to people's on the pairs both labelled.

Inputs are those of `cai agreement`: the AI-labelled pairs and the human labels of some of them
(matched by ``pair_id``/``id`` and turned into the AI row's orientation by `labeljoin.align`; a
pair's annotators are averaged, a tie counts ½). On the shared pairs it

- fits a monotone map from the judge's ``p_chosen`` (the judge's own, ``label.judge.p_chosen``,
  when the file was already calibrated) to P(a person prefers ``chosen``) (`cai/calibration.py`:
  isotonic regression, Platt scaling below 100 shared pairs), recorded with the judge and
  constitution it was fitted for;
- measures, on held-out folds, log loss, Brier score and ECE of the raw and the calibrated
  probabilities, and draws their reliability curves;
- reports the preference rate for the revisions overall and per principle, human-only, AI-only
  and prediction-powered (`prefrate.preference_rates` on the judge's own probabilities, which
  no fitted map has seen: the prediction-powered estimate stays valid).

Writes ``calibration.json`` (for `cai label --calibration`), ``calibration.md``, a
self-contained ``calibration.html`` and ``reliability.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cai import __version__
from cai.calibration import ISOTONIC_MIN, KIND, cross_validate, fit, judge_signature, resolve_method
from cai.configs import CalibrateConfig
from cai.errors import InputError
from cai.fmt import num, pct
from cai.guard import claim_output
from cai.labeljoin import FEW, align, load_ai, load_human
from cai.options import check_config
from cai.prefrate import preference_rates, rate_blocks
from cai.records import file_sha256, write_atomic, write_json, write_text

PLOT = "reliability.png"


def raw_p(row) -> float:
    """The judge's own probability: ``label.judge.p_chosen`` on calibrated rows, else ``label.p_chosen``."""
    lab = row["label"]
    own = (lab.get("judge") or {}).get("p_chosen")
    return float(own if isinstance(own, (int, float)) and not isinstance(own, bool) else lab["p_chosen"])


def _provenance(ai: dict[str, dict], path) -> tuple[dict, dict]:
    """(judge signature, constitution) shared by every AI row; an error when rows differ or say nothing."""
    sig = const = first = None
    for pid, row in ai.items():
        meta = row.get("meta")
        s = judge_signature(meta, row.get("label"))
        if s is None or not isinstance(meta.get("constitution"), dict):
            raise InputError(
                f"row {pid!r} carries no meta (model, constitution): calibrate the output of cai label or "
                "cai generate, which record the judge that made each label",
                path,
            )
        c = {"name": meta["constitution"].get("name"), "sha256": meta["constitution"].get("sha256")}
        if sig is None:
            sig, const, first = s, c, pid
        elif json.dumps(s, sort_keys=True) != json.dumps(sig, sort_keys=True) or c != const:
            raise InputError(
                f"mixes labels from different judges or constitutions (rows {first!r} and {pid!r}); "
                "calibrate one labelling run at a time",
                path,
            )
    return sig, const


def warnings(m: dict) -> list[str]:
    n, cv = m["n"], m["cross_validation"]
    out = []
    if n < FEW:
        out.append(
            f"Only {n} shared pairs: the map and its held-out figures are rough; label {FEW}+ pairs "
            f"(and {ISOTONIC_MIN}+ for isotonic regression)."
        )
    if m["map"]["method"] == "platt" and n < ISOTONIC_MIN and m["config"]["method"] == "auto":
        out.append(
            f"{n} shared pairs (fewer than {ISOTONIC_MIN}): Platt scaling, one parameter, instead of "
            "isotonic regression."
        )
    if cv is None:
        out.append("Fewer than 2 shared pairs: no held-out figures.")
    elif cv["calibrated"]["log_loss"] > cv["raw"]["log_loss"]:
        out.append(
            f"On held-out folds the calibrated probabilities do worse than the judge's own (log loss "
            f"{cv['calibrated']['log_loss']:.3f} vs {cv['raw']['log_loss']:.3f}): with this slice the map "
            "does not help; label more pairs before labelling with --calibration."
        )
    return out + m["preference_rate"]["warnings"]


def build_blocks(m: dict) -> list[tuple]:
    cv, j, c = m["cross_validation"], m["judge"], m["constitution"]
    B: list[tuple] = [("h1", "Judge calibration")]
    B.append(
        (
            "p",
            f"Judge `{j['model']}` ({j['principles']} principle(s) per pair"
            + (", chain of thought" if j["cot"] else "")
            + f"), constitution {c['name']} (sha256 {str(c['sha256'])[:12]}). "
            f"{m['n']} pairs carry both an AI and a human label ({len(m['annotators'])} annotator(s)); "
            f"map: {'isotonic regression' if m['map']['method'] == 'isotonic' else 'Platt scaling'}.",
        )
    )
    if m["warnings"]:
        B.append(("ul", [f"**{w}**" for w in m["warnings"]]))
    B.append(("h2", "Held-out reliability"))
    if cv:
        rows = [
            [name, num(cv[k]["log_loss"]), num(cv[k]["brier"]), num(cv[k]["ece"])]
            for name, k in (("judge's own p_chosen", "raw"), ("calibrated", "calibrated"))
        ]
        B.append(("table", ["", "log loss", "Brier", "ECE"], rows))
        B.append(
            (
                "p",
                f"{cv['folds']}-fold cross-validation (seed {cv['seed']}): each fold scored by a map "
                "fitted on the others. Log loss and Brier score against the people's label (soft where "
                "annotators split or tied); ECE over 10 bins of confidence max(p, 1 − p) against how "
                "often the side picked is the people's. Lower is better for all three.",
            )
        )
        per = cv["per_fold"]
        B.append(
            (
                "table",
                ["fold", "pairs", "log loss, judge's own", "log loss, calibrated"],
                [
                    [str(i + 1), str(f["n"]), num(f["raw_log_loss"]), num(f["calibrated_log_loss"])]
                    for i, f in enumerate(per)
                ],
            )
        )
        B.append(("img", PLOT, "reliability of the judge's probabilities, raw and calibrated"))
    else:
        B.append(("p", "Too few shared pairs to hold any out."))
    B.append(("h2", "The map"))
    mp = m["map"]
    if mp["method"] == "isotonic":
        pts = list(zip(mp["x"], mp["y"]))
        step = max(1, len(pts) // 12)
        B.append(
            (
                "p",
                "Isotonic steps (judge p → P(a person prefers chosen))"
                + (f", one point in {step}" if step > 1 else "")
                + ": "
                + ", ".join(f"{x:.3f} → {y:.3f}" for x, y in pts[::step]),
            )
        )
    else:
        B.append(("p", f"Platt scaling: P = σ({mp['slope']:.3f} · logit p)."))
    B.append(
        (
            "p",
            "Fitted on each pair in both orientations, so g(1 − p) = 1 − g(p): it does not learn which "
            "response a file calls `chosen`. Apply it with `cai label --calibration calibration.json` "
            "(same judge, same settings, same constitution; anything else is refused).",
        )
    )
    B += rate_blocks(
        dict(m["preference_rate"], warnings=[]), "Preference rate: human, AI and prediction-powered"
    )
    B.append(("h2", "Provenance"))
    B.append(
        (
            "ul",
            [
                f"AI labels `{m['fitted_on']['ai']['path']}` (sha256 {m['fitted_on']['ai']['sha256'][:16]})",
                *[f"human labels `{f['path']}` (sha256 {f['sha256'][:16]})" for f in m["fitted_on"]["human"]],
                f"cai {m['version']}" + (f"; command: `{m['command']}`" if m.get("command") else ""),
            ],
        )
    )
    return B


def write_plot(m: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = m["cross_validation"]["reliability"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0.5, 1], [0.5, 1], "k:", lw=0.8, label="perfectly calibrated")
    for i, (k, name) in enumerate((("raw", "judge's own"), ("calibrated", "calibrated (held out)"))):
        bins = rel[k]["bins"]
        ax.plot(
            [b["confidence"] for b in bins],
            [b["agreement"] for b in bins],
            "o-",
            color=f"C{i}",
            label=f"{name} (ECE {rel[k]['ece']:.3f})",
        )
        for b in bins:
            ax.annotate(str(b["n"]), (b["confidence"], b["agreement"]), fontsize=6, color=f"C{i}")
    ax.set_xlabel("confidence max(p, 1 − p)")
    ax.set_ylabel("share where people picked the same side")
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Reliability (numbers: pairs per bin)")
    fig.tight_layout()
    write_atomic(out / PLOT, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def run_calibrate(cfg: CalibrateConfig) -> dict:
    check_config(cfg)
    if not cfg.human:
        raise InputError("pass at least one --human file (`cai review` output)")
    with claim_output(cfg.out, inputs=[cfg.ai, *cfg.human], kind="folder"):
        ai, _ = load_ai(cfg.ai, cfg.skip_bad)
        signature, constitution = _provenance(ai, cfg.ai)
        human, h_counts = load_human(cfg.human, cfg.skip_bad)
        kept, join = align(human, ai)
        if not kept:
            raise InputError(
                f"shares no pair with the AI file: none of the {len(human)} human answers matches one "
                f"({join['no_ai_row']} ids not found, {join['different_texts']} with other texts); "
                "label the same pairs file you pass as --ai",
                cfg.human[0],
            )
        by_pair: dict[str, list[float]] = {}
        for h in kept:
            by_pair.setdefault(h["pair_id"], []).append(h["p"])
        pids = sorted(by_pair)
        p = [raw_p(ai[pid]) for pid in pids]
        y = [sum(v) / len(v) for v in (by_pair[pid] for pid in pids)]
        method = resolve_method(cfg.method, len(pids))
        mp = fit(p, y, method)
        cv = cross_validate(p, y, method, cfg.folds, cfg.seed)
        m = {
            "kind": KIND,
            "version": __version__,
            "map": mp,
            "n": len(pids),
            "annotators": sorted({h["annotator"] for h in kept}),
            "judge": signature,
            "constitution": constitution,
            "cross_validation": {k: v for k, v in cv.items() if not k.startswith("_")} if cv else None,
            "preference_rate": preference_rates(ai, kept, raw_p),
            "fitted_on": {
                "ai": {"path": str(cfg.ai), "sha256": file_sha256(cfg.ai)},
                "human": h_counts["files"],
            },
            "join": join,
            "config": {"method": cfg.method, "folds": cfg.folds, "seed": cfg.seed},
            "command": cfg.command,
        }
        m["warnings"] = warnings(m)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if cv:
            write_plot(m, out)
        from cai.render import render_html, render_md

        blocks = build_blocks(m)
        write_text(out / "calibration.md", render_md(blocks))
        write_text(out / "calibration.html", render_html(blocks, out))
        write_json(out / "calibration.json", m)  # last: its presence means the run finished
    for w in m["warnings"]:
        print(f"cai calibrate: {w}", file=sys.stderr)
    return m


def summary_line(m: dict, out) -> str:
    cv = m["cross_validation"]
    held = (
        f"held-out log loss {cv['raw']['log_loss']:.3f} -> {cv['calibrated']['log_loss']:.3f}, "
        f"ECE {cv['raw']['ece']:.3f} -> {cv['calibrated']['ece']:.3f}"
        if cv
        else "no held-out figures"
    )
    ppi = m["preference_rate"]["overall"]["ppi"]
    rate = (
        f"; people prefer {m['preference_rate']['target']} {pct(ppi['estimate'])} "
        f"({pct(ppi['ci'][0])} – {pct(ppi['ci'][1])}, prediction-powered)"
        if ppi["ci"]
        else ""
    )
    return (
        f"cai calibrate: {m['map']['method']} on {m['n']} shared pairs, {held}{rate} "
        f"-> {Path(out) / 'calibration.json'}"
    )
