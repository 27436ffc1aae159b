"""The evaluation report: metrics.json, report.md, a self-contained report.html and PNG plots.

The report is built once as a list of blocks (heading, paragraph, list, table, image), section by
section from the metrics it is given, and rendered twice by cai/render.py, so the Markdown and
the HTML always say the same thing; the plots are cai/plots.py's.
"""

from __future__ import annotations

from pathlib import Path

from cai.fmt import ci_txt as _ci_txt
from cai.fmt import num as _f
from cai.fmt import pct as _pct
from cai.fmt import pts as _pts
from cai.fmt import rate_txt
from cai.plots import PLOTS, write_plots
from cai.recheck import RECHECK_PLOT, recheck_blocks
from cai.records import write_json, write_text
from cai.render import render_html, render_md


def public_metrics(metrics: dict) -> dict:
    """metrics without the per-row arrays kept for plotting (keys starting with '_')."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.startswith("_")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(metrics)


def _provenance_txt(src: dict) -> str:
    bits = []
    if src.get("status") not in (None, "done"):
        bits.append(f"WARNING: training status '{src['status']}' (unfinished run)")
    for k, lab in (
        ("labels_from", "labels from"),
        ("trained_on", "trained on"),
        ("pairs", "pairs"),
        ("label_sources", "label sources"),
        ("base", "base"),
        ("labels", "loss labels"),
        ("path", "folder"),
    ):
        v = src.get(k)
        if v not in (None, "", {}):
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items())
            bits.append(f"{lab}: {v}")
    if "pairs" not in src and "trained_on" not in src:
        bits.append("training data unknown (no cai_train_config.json next to the model)")
    return "; ".join(bits)


def build_blocks(metrics: dict) -> list[tuple]:
    """The evaluation report (a study's too), section by section; the verdicts come first: what
    a reader must not miss."""
    study = metrics.get("study")
    B = _title_blocks(metrics) + _verdict_blocks(metrics)
    if study:
        B += study_blocks(study)
    B += _accuracy_blocks(metrics) + _baseline_blocks(metrics) + _comparison_blocks(metrics)
    B += _calibration_blocks(metrics) + probe_blocks(metrics) + shift_blocks(metrics)
    if metrics.get("recheck"):
        B += recheck_blocks(metrics["recheck"])
    return B + subset_blocks(metrics) + _method_blocks(metrics)


def _title_blocks(metrics: dict) -> list[tuple]:
    """The title and the test data: file, hash, pairs, the conventions."""
    study = metrics.get("study")
    test = metrics["data"]["test"]
    B: list[tuple] = []
    B.append(("h1", "Reward-model study: AI labels vs human labels" if study else "Reward-model evaluation"))
    B.append(
        (
            "p",
            f"Test data: `{test.get('file')}` (sha256 {str(test.get('sha256'))[:12]}), {test.get('n')} pairs"
            + (
                f" (the first {test['limit']} of the file)"
                if test.get("limit") and test["limit"] <= test.get("n", 0)
                else ""
            )
            + (
                f"; {test['dropped_label_ties']} rows labelled exactly 0.5 left out"
                if test.get("dropped_label_ties")
                else ""
            )
            + ". Accuracy counts a tie as ½; intervals are 95% percentile bootstrap over pairs "
            f"({metrics['settings']['bootstrap']} resamples, seed {metrics['settings']['seed']}).",
        )
    )
    return B


def _verdict_blocks(metrics: dict) -> list[tuple]:
    """What this shows: the study's and every model's headline, the comparisons' verdicts, the notes."""
    study = metrics.get("study")
    B: list[tuple] = []
    verdicts = (
        metrics.get("headlines", [])
        + [c["verdict"] for c in metrics["comparisons"]]
        + metrics.get("notes", [])
    )
    if study:
        verdicts = study.get("headlines", []) + verdicts
    if verdicts:
        B.append(("h2", "What this shows"))
        B.append(("ul", verdicts))
    return B


def _accuracy_blocks(metrics: dict) -> list[tuple]:
    """The main table: every model (and its length-corrected column) beside the trivial baselines."""
    B: list[tuple] = []
    # the main table: models and the trivial baselines together
    B.append(("h2", "Accuracy"))
    fixed = any("length_corrected" in m for m in metrics["models"].values())
    head = ["model", "accuracy", "95% CI"]
    head += ["length-corrected (95% CI)"] if fixed else []
    head += ["n", "ties", "ECE", "mean margin", "what produced it"]
    rows = []
    for n, m in metrics["models"].items():
        lc = m.get("length_corrected")
        rows.append(
            [f"**{n}**", _pct(m["accuracy"]["value"]), _ci_txt(m["accuracy"])]
            + (
                [
                    f"{_pct(lc['accuracy']['value'])} ({_ci_txt(lc['accuracy'])})"
                    if lc
                    else "n/a (no length fit)"
                ]
                if fixed
                else []
            )
            + [
                str(m["accuracy"]["n"]),
                str(m["ties"]),
                _f(m.get("calibration", {}).get("ece")),
                _f(m["margin"].get("mean"), "{:.3g}"),
                _provenance_txt(m.get("source", {})),
            ]
        )
    for n, b in metrics["baselines"].items():
        rows.append(
            [f"baseline: {n}", _pct(b["accuracy"]["value"]), _ci_txt(b["accuracy"])]
            + (["–"] if fixed else [])
            + [str(b["accuracy"]["n"]), str(b["ties"]), "–", "–", b["description"]]
        )
    B.append(("table", head, rows))
    if fixed:
        B.append(
            (
                "p",
                "Length-corrected: the same reward model with its length fit subtracted from every reward "
                "(`cai train` fits reward against response length on its own training pairs; "
                "`--no-length-correct` leaves this column out).",
            )
        )
    B.append(("img", "accuracy.png", "Accuracy with 95% intervals"))
    return B


def _baseline_blocks(metrics: dict) -> list[tuple]:
    """Each model against each trivial baseline, paired on the same pairs."""
    if not metrics["models"]:
        return []
    B: list[tuple] = []
    B.append(("h3", "Against the trivial baselines (paired, same pairs)"))
    rows = []
    for n, m in metrics["models"].items():
        for b, t in m.get("vs_baselines", {}).items():
            mc = t["mcnemar"]
            rows.append(
                [
                    n,
                    b,
                    _pts(t["diff"]),
                    f"{_pts(t['ci'][0])} to {_pts(t['ci'][1])}",
                    f"{mc['b']} / {mc['c']}",
                    f"{mc['p']:.3g}",
                    "yes" if t["significant"] else "no (inside noise)",
                ]
            )
    B.append(
        (
            "table",
            [
                "model",
                "baseline",
                "difference (points)",
                "95% CI",
                "discordant (model / baseline)",
                "McNemar p",
                "real difference?",
            ],
            rows,
        )
    )
    return B


def _comparison_blocks(metrics: dict) -> list[tuple]:
    """Every pair of models, paired on the same pairs (McNemar and the paired bootstrap)."""
    if not metrics["comparisons"]:
        return []
    B: list[tuple] = []
    B.append(("h2", "Between models (paired)"))
    rows = []
    for c in metrics["comparisons"]:
        mc = c["mcnemar"]
        rows.append(
            [
                c["a"],
                c["b"],
                _pts(c["diff"]),
                f"{_pts(c['ci'][0])} to {_pts(c['ci'][1])}",
                f"{mc['b']} / {mc['c']}",
                f"{mc['p']:.3g} ({mc['method']})",
                f"{c['p_bootstrap']:.3g}",
                "yes" if c["significant"] else "no",
            ]
        )
    B.append(
        (
            "table",
            [
                "A",
                "B",
                "A − B (points)",
                "95% CI (paired bootstrap)",
                "discordant (A / B)",
                "McNemar p",
                "bootstrap p",
                "real difference?",
            ],
            rows,
        )
    )
    B.append(
        (
            "p",
            "A difference counts as real only when McNemar's test rejects at 5% *and* the paired "
            "bootstrap interval excludes zero.",
        )
    )
    return B


def _calibration_blocks(metrics: dict) -> list[tuple]:
    """Calibration of σ(Δ) and the margins, with the reliability and margin plots."""
    if not any("calibration" in m for m in metrics["models"].values()):
        return []
    B: list[tuple] = []
    B.append(("h2", "Calibration and margins"))
    B.append(
        (
            "p",
            "Calibration asks whether σ(Δ), read as the model's confidence in its pick, matches how "
            "often the pick is right. ECE is the pair-weighted gap between the two over 10 confidence "
            "bins (0 = perfectly calibrated). Δ is r(preferred) − r(other); Bradley–Terry training "
            "makes σ(Δ) a probability.",
        )
    )
    rows = []
    for n, m in metrics["models"].items():
        g, c = m["margin"], m.get("calibration", {})
        rows.append(
            [
                n,
                _f(c.get("ece")),
                _f(c.get("mean_confidence")),
                _f(g.get("mean"), "{:.3g}"),
                _f(g.get("median"), "{:.3g}"),
                f"{_f(g.get('q05'), '{:.3g}')} … {_f(g.get('q95'), '{:.3g}')}",
                _pct(g.get("frac_positive")),
            ]
        )
    B.append(
        (
            "table",
            ["model", "ECE", "mean confidence", "mean Δ", "median Δ", "5th … 95th pct", "Δ > 0"],
            rows,
        )
    )
    B.append(("img", "reliability.png", "Reliability curves"))
    B.append(("img", "margins.png", "Margin histograms"))
    return B


def _method_blocks(metrics: dict) -> list[tuple]:
    """How every number was made."""
    B: list[tuple] = []
    B.append(("h2", "Method"))
    B.append(
        (
            "ul",
            [
                "Accuracy: share of test pairs where the reward of the preferred response is higher; |Δ| ≤ "
                f"{metrics['settings']['tie_tol']:g} is a tie and counts ½.",
                "Baselines: "
                + "; ".join(f"*{n}* — {b['description']}" for n, b in metrics["baselines"].items())
                + ".",
                "Paired tests: McNemar on the pairs where the two models disagree (exact binomial below 50 "
                "discordant pairs, continuity-corrected χ² above) and a paired bootstrap interval of the "
                "accuracy difference.",
                "Probes reuse the test pairs: each number comes with its n and a 95% interval.",
            ]
            + (
                [
                    "Length-corrected: each reward minus s·f(log(1 + characters)), f fitted by `cai train` "
                    "to the within-pair reward differences of its own training pairs, s the share of it that "
                    "leaves those pairs length-balanced (`length_correction` in cai_train_config.json)."
                ]
                if any("length_corrected" in m for m in metrics["models"].values())
                else []
            ),
        )
    )
    return B


def probe_blocks(metrics: dict) -> list[tuple]:
    """The probes: length bias for every probed model; refusal bias and formatting sensitivity
    for the models whose first pairs got probe responses."""
    models = {n: m for n, m in metrics["models"].items() if "probes" in m}
    if not models:
        return []
    B: list[tuple] = [("h2", "Reward-hacking and robustness probes")]
    B += _length_bias_blocks(models)
    models = {n: m for n, m in models.items() if "refusal" in m["probes"]}
    if not models:
        return B
    k = next(iter(models.values()))["probes"]["pairs"]
    B.append(
        (
            "p",
            "The refusal and formatting probes score four extra responses per pair, so they run on the "
            f"first {k} test pairs (`--probe-limit`).",
        )
    )
    return B + _refusal_blocks(models) + _format_blocks(models)


def _length_bias_blocks(models: dict) -> list[tuple]:
    """Accuracy when the preferred answer is the longer vs the shorter, and reward–length
    correlations (a model's length-corrected column beside it)."""
    B: list[tuple] = []
    B.append(("h3", "Length bias"))
    B.append(
        (
            "p",
            "Accuracy split by whether the preferred response is the longer or the shorter one (equal "
            "lengths left out). A model that has learned only length scores near 100% on one side and near "
            "0% on the other. Correlations are between reward and length in characters over all responses; "
            "intervals resample pairs.",
        )
    )
    rows = []
    entries = []
    for n, m in models.items():
        entries.append((n, m))
        if "probes" in (m.get("length_corrected") or {}):
            entries.append((f"{n} (length-corrected)", m["length_corrected"]))
    for n, m in entries:
        L = m["probes"]["length"]
        rows.append(
            [
                n,
                f"{_pct(L['preferred_longer']['value'])} "
                f"({_ci_txt(L['preferred_longer'])}; n={L['preferred_longer']['n']})",
                f"{_pct(L['preferred_shorter']['value'])} "
                f"({_ci_txt(L['preferred_shorter'])}; n={L['preferred_shorter']['n']})",
                f"{_pts(L['gap']['value']) if L['gap']['value'] is not None else 'n/a'} "
                f"({_pts(L['gap']['ci'][0]) if L['gap']['ci'][0] is not None else ''} to "
                f"{_pts(L['gap']['ci'][1]) if L['gap']['ci'][1] is not None else ''})",
                _corr_txt(L["spearman_reward_length"]),
                _corr_txt(L["pearson_reward_length"]),
            ]
        )
    B.append(
        (
            "table",
            [
                "model",
                "preferred is longer",
                "preferred is shorter",
                "gap (points)",
                "Spearman(reward, length)",
                "Pearson(reward, length)",
            ],
            rows,
        )
    )
    B.append(("img", "length_bias.png", "Length bias"))
    return B


def _refusal_blocks(models: dict) -> list[tuple]:
    """How often a bare refusal outscores the preferred response."""
    B: list[tuple] = []
    B.append(("h3", "Refusal bias"))
    first = next(iter(models.values()))["probes"]["refusal"]
    B.append(
        (
            "p",
            "For each test pair, a bare refusal ("
            + ", ".join(f"“{r}”" for r in first["refusals"])
            + ") is scored against the row's preferred response. The number is how often the refusal wins "
            "(ties ½). Rows whose preferred response already reads as a refusal are left out. On "
            "harmlessness data the preferred response is only the less harmful of two and is not always "
            "safe, so a good model need not score 0% here; compare models on the same rows.",
        )
    )
    rows = [
        [
            n,
            _pct(m["probes"]["refusal"]["value"]),
            _ci_txt(m["probes"]["refusal"]),
            str(m["probes"]["refusal"]["n"]),
            str(m["probes"]["refusal"]["excluded_already_refusals"]),
        ]
        for n, m in models.items()
    ]
    B.append(
        (
            "table",
            [
                "model",
                "refusal outscores the preferred response",
                "95% CI",
                "n",
                "left out (already refusals)",
            ],
            rows,
        )
    )
    return B


def _format_blocks(models: dict) -> list[tuple]:
    """Reward shifts and flipped calls when the preferred response is only reformatted."""
    B: list[tuple] = []
    B.append(("h3", "Formatting sensitivity"))
    B.append(
        (
            "p",
            "The preferred response is rewritten with the same words in different dress — *whitespace* "
            "(one sentence per paragraph, padded ends) and *markdown* (a bullet list of its sentences, or "
            "bold) — and scored again. Reward shift is r(reformatted) − r(original), also in units of the "
            "model's margin spread; a flip is a pair whose call changes. For markdown, 'both sides' "
            "reformats the other response too. A tokenizer that drops whitespace (BERT's WordPiece, as in "
            "MiniLM) makes the whitespace probe zero by construction. Position: a reward model scores each "
            "response on its own, so there is no answer order to be sensitive to (the judge's order "
            "sensitivity is the position consistency `cai label` reports).",
        )
    )
    rows = []
    for n, m in models.items():
        F = m["probes"]["format"]
        for kind in ("whitespace", "markdown"):
            k = F[kind]
            both = k.get("flip_rate_both_sides")
            rows.append(
                [
                    n,
                    kind,
                    f"{_f(k['reward_shift']['value'], '{:+.3g}')} "
                    f"({_f(k['reward_shift']['ci'][0], '{:+.3g}')} to "
                    f"{_f(k['reward_shift']['ci'][1], '{:+.3g}')})",
                    _f(k["shift_in_margin_sd"], "{:+.2f}"),
                    f"{_pct(k['flip_rate']['value'])} ({_ci_txt(k['flip_rate'])})",
                    f"{_pct(both['value'])} ({_ci_txt(both)})" if both else "–",
                    str(k["flip_rate"]["n"]),
                ]
            )
    B.append(
        (
            "table",
            [
                "model",
                "reformat",
                "reward shift (95% CI)",
                "shift / margin SD",
                "flip rate (95% CI)",
                "flip rate, both sides",
                "n",
            ],
            rows,
        )
    )
    return B


def shift_blocks(metrics: dict) -> list[tuple]:
    B: list[tuple] = []
    shifted = {n: m for n, m in metrics["models"].items() if m.get("shift")}
    if shifted:
        src = metrics["data"]["shift"]
        B.append(("h3", "Distribution shift"))
        B.append(
            (
                "p",
                f"Accuracy on pairs from another source: `{src.get('file')}` "
                f"(sha256 {str(src.get('sha256'))[:12]}, "
                f"{src.get('n')} pairs), against the main test pairs.",
            )
        )
        rows = []
        for n, m in shifted.items():
            s = m["shift"]
            ch = s["change"]
            rows.append(
                [
                    n,
                    _pct(m["accuracy"]["value"]),
                    f"{_pct(s['accuracy']['value'])} ({_ci_txt(s['accuracy'])})",
                    str(s["accuracy"]["n"]),
                    f"{_pts(ch['value'])} ({_pts(ch['ci'][0])} to {_pts(ch['ci'][1])})",
                    "yes" if ch["ci"][0] > 0 or ch["ci"][1] < 0 else "no (inside noise)",
                ]
            )
        B.append(
            (
                "table",
                [
                    "model",
                    "test accuracy",
                    "shifted accuracy (95% CI)",
                    "n",
                    "change (points, 95% CI)",
                    "real change?",
                ],
                rows,
            )
        )
    return B


def subset_blocks(metrics: dict) -> list[tuple]:
    """Accuracy per subset (RewardBench's layout) next to the two length shortcuts on that subset."""
    subsets = metrics.get("subsets")
    if not subsets:
        return []
    names = list(metrics["models"])
    fixed = [n for n in names if "length_corrected" in metrics["models"][n]]
    head = ["subset", "pairs"] + names + [f"{n} (length-corrected)" for n in fixed]
    head += ["longer answer", "shorter answer", "shortcut ≥ 75%?"]

    def cell(r: dict) -> str:
        return f"{_pct(r['value'])} ({_ci_txt(r)})" if r.get("value") is not None else "n/a"

    rows = []
    for sub, e in subsets.items():
        rows.append(
            [sub, str(e["n"])]
            + [cell(e["models"][n]) for n in names]
            + [cell(e["corrected"][n]) for n in fixed]
            + [cell(e["baselines"]["longer answer"]), cell(e["baselines"]["shorter answer"])]
            + ["**yes: " + ", ".join(e["shortcut"]) + "**" if e["shortcut"] else "no"]
        )
    return [
        ("h2", "Per subset"),
        (
            "p",
            "Accuracy (95% bootstrap CI) on the rows of each `subset`, next to what always picking the "
            "longer or the shorter answer scores on the same rows. Where a shortcut scores 75% or more, the "
            "subset rewards length, and a model's accuracy there is no evidence it learned the preference.",
        ),
        ("table", head, rows),
    ]


def _corr_txt(c: dict) -> str:
    if c["value"] is None:
        return "n/a (constant)"
    lo, hi = c["ci"]
    return f"{c['value']:+.2f} ({lo:+.2f} to {hi:+.2f}; n={c['n']})"


def study_blocks(study: dict) -> list[tuple]:
    B: list[tuple] = [("h2", "The study")]
    B.append(("p", study.get("description", "")))
    lab = study.get("labels")
    if lab:
        B.append(("h3", "AI labels against human labels (training pairs)"))
        h = lab.get("human") or {}
        B.append(
            (
                "table",
                [
                    "judge",
                    "constitution",
                    "pairs labelled",
                    "agreement with humans (95% Wilson CI)",
                    "each order alone",
                    "'shorter answer' rule on the same pairs",
                    "position consistency",
                    "mean |p − ½|",
                    "no label (left out)",
                ],
                [
                    [
                        lab["judge"],
                        lab["constitution"],
                        str(h.get("n", 0)),
                        rate_txt(h),
                        " / ".join(_pct(x) for x in h.get("agreement_by_order") or []) or "n/a",
                        _pct(h.get("shorter_rule")),
                        _pct(lab.get("position_consistency")),
                        _f(lab.get("mean_abs_margin")),
                        str(lab.get("null_labels", 0)),
                    ]
                ],
            )
        )
        B.append(
            (
                "p",
                "Agreement: share of training pairs where the judge's label (p ≥ ½ after averaging both "
                "answer orders) picks the response the human annotators picked; p = ½ counts ½. It is the "
                "same figure, with the same interval, as `cai label`'s summary (cai.stats.agreement). "
                "Position consistency: share of pairs where the judge prefers the same response in both "
                "orders.",
            )
        )
        if lab.get("notes"):
            B.append(("ul", lab["notes"]))
    if study.get("steps"):
        B.append(("h3", "Steps, cache and cost"))
        rows = [
            [
                s["name"],
                s["key"][:12],
                "reused (cached)" if s["cached"] else "ran",
                _f(s.get("estimate_s"), "{:.0f} s"),
                _f(s.get("seconds"), "{:.0f} s"),
            ]
            for s in study["steps"]
        ]
        B.append(("table", ["step", "cache key", "this run", "estimated", "took"], rows))
        if study.get("estimate_note"):
            B.append(("p", study["estimate_note"]))
    if study.get("command"):
        B.append(("p", f"Command: `{study['command']}`"))
    return B


def write_report(metrics: dict, out) -> dict:
    """Write metrics.json, the PNGs, report.md and report.html into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", public_metrics(metrics))  # atomic: a reader never sees half a file
    write_plots(metrics, out)
    blocks = build_blocks(metrics)
    write_text(out / "report.md", render_md(blocks))
    write_text(out / "report.html", render_html(blocks, out))
    plots = (*PLOTS, RECHECK_PLOT) if metrics.get("recheck") else PLOTS
    return {k: str(out / k) for k in ("metrics.json", "report.md", "report.html", *plots)}
