"""The evaluation in plain language: a headline per model, the warnings a reader must not miss,
a sentence per paired comparison, and the subsets a length shortcut wins. Computed from the
metrics alone (`annotate`), so a cached evaluation is always described by the current wording.
"""

from __future__ import annotations

import math

from cai.fmt import pct as _pct
from cai.fmt import pts as _pts


def annotate(metrics: dict) -> dict:
    """The plain-language verdicts and warnings, from the numbers. Kept apart from the numbers so a
    cached evaluation is always described by the current wording."""

    def at_chance(n):
        lo, hi = metrics["models"][n]["accuracy"]["ci"]
        return lo is not None and lo <= 0.5 <= hi

    metrics["notes"] = []
    metrics["headlines"] = []
    for name, m in metrics["models"].items():
        h = model_headline(name, m, metrics["baselines"], m.get("vs_baselines", {}))
        metrics["headlines"] += [h] if h else []
        metrics["notes"] += model_notes(name, m, metrics["baselines"], m.get("vs_baselines", {}))
    metrics["notes"] += subset_notes(metrics.get("subsets"))
    for c in metrics["comparisons"]:
        c["verdict"] = comparison_verdict(
            c["a"], c["b"], c, tuple(n for n in (c["a"], c["b"]) if at_chance(n))
        )
    if (metrics.get("recheck") or {}).get("at_chance"):
        metrics["notes"].append(
            "The test pairs' re-check judge is at chance (see Re-check below): its per-principle "
            "improvements, regressions and conflicts are noise."
        )
    return metrics


def comparison_verdict(a: str, b: str, t: dict, at_chance: tuple[str, ...] = ()) -> str:
    """One plain sentence about A vs B. ``at_chance`` names the models whose own accuracy is not
    distinguishable from 50%: a real difference between them is then not evidence of learning."""
    mc, (lo, hi) = t["mcnemar"], t["ci"]
    if t["n"] == 0:
        return f"{a} vs {b}: no pairs to compare."
    if mc["b"] + mc["c"] == 0:
        return (
            f"{a} and {b} make the same call on every one of the {t['n']} pairs: "
            "there is no difference to test."
        )
    if t["significant"]:
        # say it the way round a reader expects: the better one, by a positive amount
        flip = t["diff"] < 0
        better, worse = (b, a) if flip else (a, b)
        d, lo2, hi2 = (-t["diff"], -hi, -lo) if flip else (t["diff"], lo, hi)
        bb, cc = (mc["c"], mc["b"]) if flip else (mc["b"], mc["c"])
        out = (
            f"{better} is more accurate than {worse} by {100 * d:.1f} points (95% CI {100 * lo2:.1f} to "
            f"{100 * hi2:.1f}; McNemar p = {mc['p']:.3g}, {bb} vs {cc} discordant pairs of {t['n']}): "
            "a real difference at this sample size."
        )
        if better in at_chance:
            out += (
                f" But {better} itself is not distinguishable from chance, so this shows the two models "
                f"err on different pairs, not that {better} has learned the preference."
            )
        return out
    stats = (
        f"{_pts(t['diff'])} points, 95% CI {_pts(lo)} to {_pts(hi)}; McNemar p = {mc['p']:.3g} "
        f"on {mc['b']} vs {mc['c']} discordant pairs of {t['n']}"
    )
    half = (hi - lo) / 2
    return (
        f"{a} − {b} = {stats}. This is inside noise: these {t['n']} pairs cannot tell the two apart "
        f"(differences smaller than about {100 * half:.0f} points would not show)."
    )


def length_balanced(m: dict) -> dict | None:
    """Length-balanced accuracy: the mean of the accuracies when the preferred answer is the longer
    and when it is the shorter one (a reward that is only length scores 50%). The 95% interval
    combines the two subsets' bootstrap intervals as independent normal errors (approximate)."""
    lp = m.get("probes", {}).get("length")
    if not lp:
        return None
    lo_, sh = lp["preferred_longer"], lp["preferred_shorter"]
    if lo_.get("value") is None or sh.get("value") is None:
        return None
    value = (lo_["value"] + sh["value"]) / 2
    se = [
        ((d["ci"][1] - d["ci"][0]) / (2 * 1.96)) if d.get("ci") and d["ci"][0] is not None else 0.0
        for d in (lo_, sh)
    ]
    half = 1.96 * math.sqrt(se[0] ** 2 + se[1] ** 2) / 2
    return {
        "value": value,
        "ci": [value - half, value + half],
        "longer": lo_["value"],
        "shorter": sh["value"],
    }


def model_headline(name: str, m: dict, baselines: dict, vs_baselines: dict) -> str | None:
    """One line per model for the top of the report: does it beat the *best* trivial baseline, and
    what is its length-balanced accuracy? A reward that only learned length must not read as a success."""
    acc = m["accuracy"]["value"]
    trivial = {
        k: b for k, b in baselines.items() if k != "always-first" and b["accuracy"]["value"] is not None
    }
    if acc is None or not trivial:
        return None
    best = max(trivial, key=lambda k: trivial[k]["accuracy"]["value"])
    bv, t = trivial[best]["accuracy"]["value"], vs_baselines.get(best)
    if acc > bv and t and t["significant"]:
        beat = f"beats the best trivial baseline, '{best}' ({_pct(bv)}), by {_pts(acc - bv)} points"
    elif acc > bv:
        beat = (
            f"does not clearly beat the best trivial baseline, '{best}' ({_pct(bv)}): "
            f"its {_pts(acc - bv)} points are inside noise"
        )
    else:
        beat = f"does not beat the best trivial baseline, '{best}' ({_pct(bv)})"
    line = f"{name}: accuracy {_pct(acc)}; it {beat}."
    lb = length_balanced(m)
    if lb is None:
        return line + " Length-balanced accuracy not measured (probes off)."
    line += (
        f" Length-balanced accuracy {_pct(lb['value'])} (≈95% CI {_pct(lb['ci'][0])}–{_pct(lb['ci'][1])}; "
        f"{_pct(lb['longer'])} when the preferred answer is the longer, "
        f"{_pct(lb['shorter'])} when it is the shorter)"
    )
    if lb["ci"][0] > 0.5:
        line += ": it learned more than length."
    else:
        line += ": at chance once length is balanced, so what it learned is mostly length" + (
            " — do not read its accuracy as a success." if acc > 0.5 else "."
        )
    lc = m.get("length_corrected")
    if lc:
        lb2, gap = length_balanced(lc), lc.get("probes", {}).get("length", {}).get("gap", {})
        line += f" With its length fit subtracted: accuracy {_pct(lc['accuracy']['value'])}"
        if lb2:
            line += f", length-balanced {_pct(lb2['value'])}, gap {_pts(gap.get('value'))} points"
            raw_gap = m["probes"]["length"]["gap"]["value"]
            line += f" (raw {_pts(raw_gap)})"
        line += "."
    return line


def model_notes(name: str, m: dict, baselines: dict, vs_baselines: dict) -> list[str]:
    """Warnings a reader must not miss: chance-level, below a trivial baseline."""
    notes = []
    acc = m["accuracy"]
    if acc["value"] is None:
        return notes
    lo, hi = acc["ci"]
    if lo <= 0.5 <= hi:
        notes.append(
            f"{name}: accuracy {_pct(acc['value'])} is not distinguishable from chance (95% CI "
            f"{_pct(lo)}–{_pct(hi)} includes 50%)."
        )
    elif hi < 0.5:
        notes.append(
            f"{name}: accuracy {_pct(acc['value'])} is below chance (95% CI {_pct(lo)}–{_pct(hi)}): "
            "its rewards point the wrong way on this data more often than not."
        )
    for bname, bm in baselines.items():
        if bname == "always-first":
            continue
        bv = bm["accuracy"]["value"]
        if bv is not None and acc["value"] < bv:
            t = vs_baselines.get(bname)
            how = "significantly" if t and t["significant"] else "though inside noise"
            notes.append(
                f"{name} is below the trivial '{bname}' baseline ({_pct(acc['value'])} vs {_pct(bv)}, {how})."
            )
    mabs = m.get("margin", {}).get("mean_abs")
    if mabs is not None and mabs < 0.05 and "calibration" in m:
        notes.append(
            f"{name}'s rewards barely separate the two responses (mean |Δ| = {mabs:.2g}, so σ(Δ) ≈ 0.5 on "
            "almost every pair): it has learned little, and its calibration figures say nothing."
        )
    trivial = {
        k: b for k, b in baselines.items() if k != "always-first" and b["accuracy"]["value"] is not None
    }
    if trivial:
        best = max(trivial, key=lambda k: trivial[k]["accuracy"]["value"])
        bv, t = trivial[best]["accuracy"]["value"], vs_baselines.get(best)
        if acc["value"] >= bv and t and not t["significant"]:
            notes.append(
                f"{name}'s lead over the best trivial baseline, '{best}' "
                f"({_pct(acc['value'])} vs {_pct(bv)}), is inside noise."
            )
    lp = m.get("probes", {}).get("length")
    gap = lp["gap"] if lp else {"value": None}
    if gap["value"] is not None and gap["ci"][0] is not None and (gap["ci"][0] > 0 or gap["ci"][1] < 0):
        # the accuracy gap between the two subsets is real: the reward leans on length
        toward = "longer" if gap["value"] > 0 else "shorter"
        strongly = "strongly " if min(abs(gap["ci"][0]), abs(gap["ci"][1])) > 0.3 else ""
        notes.append(
            f"{name} is {strongly}length-biased toward {toward} answers: "
            f"{_pct(lp['preferred_longer']['value'])} right when the preferred answer is longer, "
            f"{_pct(lp['preferred_shorter']['value'])} when it is shorter "
            f"(gap {_pts(gap['value'])} points, 95% CI {_pts(gap['ci'][0])} to {_pts(gap['ci'][1])})."
        )
    return notes


def subset_notes(subsets: dict | None) -> list[str]:
    notes = []
    for sub, e in (subsets or {}).items():
        for b in e["shortcut"]:
            notes.append(
                f"Subset '{sub}': the '{b}' baseline scores {_pct(e['baselines'][b]['value'])} "
                f"(n={e['n']}): on it a reward model can look good by length alone, so its accuracy "
                "there says little."
            )
    return notes
