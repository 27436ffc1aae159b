"""The evaluation report: metrics.json, report.md, a self-contained report.html and PNG plots.

The report is built once as a list of blocks (heading, paragraph, list, table, image) and
rendered twice, so the Markdown and the HTML always say the same thing. The HTML embeds the
plots as base64 PNGs and links nothing: it opens offline, attached to an email, years later.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from cai.fmt import ci_txt as _ci_txt
from cai.fmt import num as _f
from cai.fmt import pct as _pct
from cai.fmt import pts as _pts
from cai.fmt import rate_txt
from cai.records import write_atomic, write_json, write_text

PLOTS = ("accuracy.png", "reliability.png", "margins.png", "length_bias.png")
RECHECK_PLOT = "recheck_conflicts.png"  # written when the pairs carry a re-check (--recheck)


def public_metrics(metrics: dict) -> dict:
    """metrics without the per-row arrays kept for plotting (keys starting with '_')."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.startswith("_")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(metrics)


# ============================================================================ plots


def write_plots(metrics: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    import numpy as np

    models = metrics["models"]
    written = []

    def save(fig, name: str):
        fig.tight_layout()
        write_atomic(out / name, lambda f: fig.savefig(f, dpi=110, format="png"))
        plt.close(fig)
        written.append(name)

    # accuracy with intervals, models and baselines on one axis
    rows = [(n, m["accuracy"]) for n, m in models.items()] + [
        (f"[baseline] {n}", b["accuracy"]) for n, b in metrics["baselines"].items()
    ]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    for y, (n, a) in enumerate(reversed(rows)):
        if a["value"] is None:
            continue
        lo, hi = a["ci"]
        ax.errorbar(
            a["value"],
            y,
            xerr=[[a["value"] - lo], [hi - a["value"]]],
            fmt="o",
            color="grey" if n.startswith("[baseline]") else "C0",
            capsize=3,
        )
    ax.axvline(0.5, color="k", lw=0.8, ls=":")
    ax.set_yticks(range(len(rows)), [n for n, _ in reversed(rows)])
    ax.set_xlabel("accuracy on test pairs (ties ½), 95% bootstrap CI")
    ax.set_xlim(0, 1)
    save(fig, "accuracy.png")

    # reliability of σ(Δ)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0.5, 1], [0.5, 1], "k:", lw=0.8, label="perfect calibration")
    for i, (n, m) in enumerate(models.items()):
        bins = m.get("calibration", {}).get("bins", [])
        if bins:
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                "o-",
                color=f"C{i}",
                label=f"{n} (ECE {m['calibration']['ece']:.3f})",
            )
    ax.set_xlabel("confidence max(σ(Δ), 1−σ(Δ))")
    ax.set_ylabel("fraction of picks that match the label")
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Reliability")
    save(fig, "reliability.png")

    # margin distribution
    fig, ax = plt.subplots(figsize=(6, 4))
    deltas = [np.asarray(m["_delta"]) for m in models.values() if m.get("_delta")]
    if deltas:
        allv = np.concatenate(deltas)
        lo, hi = np.percentile(allv, [1, 99]) if len(allv) > 1 else (allv.min() - 1, allv.max() + 1)
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        edges = np.linspace(lo, hi, 31)
        for i, (n, m) in enumerate(models.items()):
            ax.hist(np.clip(m["_delta"], lo, hi), bins=edges, histtype="step", lw=1.5, color=f"C{i}", label=n)
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("margin Δ = r(preferred) − r(other)   (right of 0 = correct)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    ax.set_title("Margin distribution")
    save(fig, "margins.png")

    # length bias: accuracy when the preferred answer is longer vs shorter
    fig, ax = plt.subplots(figsize=(6.5, 4))
    entries = [(n, m["probes"]["length"]) for n, m in models.items() if "probes" in m]
    x = np.arange(len(entries))
    for k, (key, lab) in enumerate(
        (("preferred_longer", "preferred is longer"), ("preferred_shorter", "preferred is shorter"))
    ):
        vals = [e[key]["value"] if e[key]["value"] is not None else np.nan for _, e in entries]
        err = [
            [max(0, v - (e[key]["ci"][0] or v)) for v, (_, e) in zip(vals, entries)],
            [max(0, (e[key]["ci"][1] or v) - v) for v, (_, e) in zip(vals, entries)],
        ]
        ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, label=lab)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, [n for n, _ in entries], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend(fontsize=8)
    ax.set_title("Length bias: a fair model scores alike on both")
    save(fig, "length_bias.png")
    if metrics.get("recheck"):
        written.append(write_recheck_plot(metrics["recheck"], out))
    return written


def write_recheck_plot(rc: dict, out: Path, name: str = RECHECK_PLOT) -> str:
    """The conflict matrix as a heat map: row A (revised for), column B (regressed), colour the
    share n/m of A's rows in which B regressed, each cell labelled n/m."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = rc["principles"]
    rows = list(rc["conflicts"]) or ["(no revision)"]
    cells = [[rc["conflicts"].get(a, {}).get(b, [0, 0]) for b in cols] for a in rows]
    rate = np.array([[n / m if m else np.nan for n, m in r] for r in cells], float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols), 1.4 + 0.42 * len(rows)))
    im = ax.imshow(rate, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    small = 7 if len(cols) > 8 else 9
    for i, r in enumerate(cells):
        for j, (n, m) in enumerate(r):
            if m:
                ax.text(
                    j,
                    i,
                    f"{n}/{m}",
                    ha="center",
                    va="center",
                    fontsize=small,
                    color="white" if n / m > 0.6 else "black",
                )
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=small)
    ax.set_yticks(range(len(rows)), rows, fontsize=small)
    ax.set_xlabel("principle that regressed (B)")
    ax.set_ylabel("revised for (A)")
    title = "Revising for A regressed B: n of m rows"
    if rc.get("at_chance"):
        title += "\n(judge at chance: noise)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="share of A's rows")
    fig.tight_layout()
    write_atomic(out / name, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return name


def recheck_blocks(rc: dict, plot: str = RECHECK_PLOT) -> list[tuple]:
    """The re-check section: per principle how often revisions improved and regressed it, and
    the conflict matrix (as a table and the heat map `plot`)."""
    from cai.recheck import share_txt

    rr, rep = rc["rows_with_regression"], rc["repairs"]
    B: list[tuple] = [("h2", "Re-check: what the revisions did to every principle")]
    if rc.get("warnings"):
        B.append(("ul", [f"**{w}**" for w in rc["warnings"]]))
    c = rc["consistency"]
    B.append(
        (
            "p",
            f"{rc['rows']} pairs judged (final answer against the other response) under each of "
            f"{len(rc['principles'])} principles, both orders averaged. A principle regressed when "
            f"P(final better) < 0.5 − {rc['margin']} and improved when it is > 0.5 + {rc['margin']}. "
            f"Rows with a regression: {rr['k']} of {rr['n']} ({share_txt(rr)}, 95% Wilson interval)."
            + (
                f" Repair rounds ran on {rep['rows']} rows; a repair was kept on {rep['kept']}, "
                f"{rep['fixed']} of them left with no regression."
                if rep["rows"]
                else ""
            )
            + f" Both orders agreed on the better response in {share_txt(c)} of {c['n']} (pair, "
            f"principle) judgements (the interval over {c['rows']} pairs): a judge that reads the "
            "responses does so more often than a coin's 50%"
            + (", this one not clearly so (at chance)." if rc.get("at_chance") else "."),
        )
    )
    B.append(
        (
            "table",
            ["principle", "pairs", "improved (95% CI)", "regressed (95% CI)", "mean P(final better)"],
            [
                [
                    pid,
                    str(d["n"]),
                    share_txt(d["improved"]),
                    share_txt(d["regressed"]),
                    f"{d['mean_p_final_better']:.3f}",
                ]
                for pid, d in rc["per_principle"].items()
            ],
        )
    )
    B.append(("h3", "Conflicts: revising for A regressed B"))
    if rc["conflicts"]:
        cols = rc["principles"]
        B.append(
            (
                "table",
                ["revised for (A) ↓, regressed (B) →", *cols],
                [[a, *(f"{n}/{m}" for n, m in (row[b] for b in cols))] for a, row in rc["conflicts"].items()],
            )
        )
        B.append(
            (
                "p",
                "Each cell: the rows whose final answer came from a revision for A (a critique → "
                "revision round or a kept repair) in which B regressed, out of all rows revised for A. "
                "The diagonal is a revision that made its own principle worse.",
            )
        )
        B.append(("img", plot, "conflict matrix heat map"))
    else:
        B.append(("p", "No row's final answer came from a recorded revision (no trace.rounds)."))
    return B


# ============================================================================ the blocks


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
    B: list[tuple] = []
    study = metrics.get("study")
    test = metrics["data"]["test"]
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

    # the verdicts first: what a reader must not miss
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

    if study:
        B += study_blocks(study)

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

    if metrics["models"]:
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

    if metrics["comparisons"]:
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

    if any("calibration" in m for m in metrics["models"].values()):
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

    B += probe_blocks(metrics)
    B += shift_blocks(metrics)
    if metrics.get("recheck"):
        B += recheck_blocks(metrics["recheck"])
    B += subset_blocks(metrics)

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
    models = {n: m for n, m in metrics["models"].items() if "probes" in m}
    B: list[tuple] = []
    if not models:
        return B
    B.append(("h2", "Reward-hacking and robustness probes"))

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


# ============================================================================ rendering


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif kind == "table":
            head, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _inline_html(s: str) -> str:
    """Escape, then the two bits of Markdown the blocks use: `code` and **bold** / *italic*."""
    import re

    s = html.escape(str(s))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", s)


_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
img{max-width:100%;display:block;margin:.5em 0 1.5em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def render_html(blocks: list[tuple], img_dir: Path) -> str:
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cai report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head, rows = b[1], b[2]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_inline_html(h)}</th>" for h in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
        elif kind == "img":
            p = img_dir / b[1]
            if p.exists():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f"<img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


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
