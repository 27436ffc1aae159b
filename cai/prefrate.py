"""The preference rate: how often people prefer the revision, overall and per principle.

Three ways (:func:`preference_rates`): the human labels alone, the AI labels alone (every pair;
biased by the judge's errors, shown for contrast) and prediction-powered (every AI label,
corrected by the human slice; ``cai/ppi.py``), with the number of human labels the AI labels
were worth; the plain warnings for thin or biased slices, and the report section
(:func:`rate_blocks`) `cai agreement` and `cai calibrate` both show.
"""

from __future__ import annotations

from cai.fmt import pct
from cai.labeljoin import FEW, ai_p, texts
from cai.ppi import estimates

TOO_FEW = 10  # below this many human labels a rate's interval says nothing


def _toward_revision(row) -> tuple[bool, str]:
    """(turn round?, what the rate is about): a row with a critique/revision trace is taken as
    (revision, initial); any other keeps the file's own ``chosen``."""
    c, r = texts(row)
    initial = str((row.get("trace") or {}).get("initial", "")).strip()
    if initial and initial in (c, r):
        return c == initial, "revision"
    return False, "chosen"


def _row_principles(row) -> list[str]:
    """The principles behind a pair: those of the trace's rounds that revised the answer, else the
    principles the judge used."""
    rounds = (row.get("trace") or {}).get("rounds") or []
    found = [
        str(x["principle"])
        for x in rounds
        if isinstance(x, dict) and x.get("principle") and x.get("revision")
    ]
    if not found:
        found = [str(x) for x in ((row.get("label") or {}).get("judge") or {}).get("principles") or []]
    return list(dict.fromkeys(found))


def rate_warnings(e: dict, what: str) -> list[str]:
    """Plain words for one preference-rate estimate (``what`` names the group)."""
    n, ppi, ai = e["human_labelled"], e["ppi"], e["ai"]
    if n == 0:
        return [
            f"{what}: no human labels among these pairs; only the AI-only rate, "
            "which carries the judge's bias."
        ]
    if n < TOO_FEW:
        return [
            f"{what}: only {n} human labels, too few to say anything: the intervals are not to be trusted."
        ]
    if not e["human"]["se"]:  # every label the same: a normal interval has no width
        return [
            f"{what}: all {n} human labels say the same ({pct(e['human']['estimate'])}), so the intervals "
            "have no width and mean nothing: the rate is only known to be near that; label more pairs."
        ]
    out = []
    if n < FEW:
        out.append(f"{what}: {n} human labels; the intervals are rough (normal approximation): label {FEW}+.")
    if ppi["lambda"] == 0 and ppi["N"] > 1:
        out.append(
            f"{what}: the judge's labels do not co-vary with people's on this slice, so the "
            "prediction-powered estimate is the human-only one: the AI labels add nothing."
        )
    if ppi["ci"] and ai["estimate"] is not None and not ppi["ci"][0] <= ai["estimate"] <= ppi["ci"][1]:
        out.append(
            f"{what}: the AI labels alone say {pct(ai['estimate'])}, people (prediction-powered) "
            f"{pct(ppi['estimate'])} ({pct(ppi['ci'][0])} – {pct(ppi['ci'][1])}): the judge is biased here."
        )
    return out


def preference_rates(ai: dict[str, dict], human: list[dict], p_of=None) -> dict:
    """How often people prefer the revision, overall and per principle: human-only, AI-only and
    prediction-powered (cai/ppi.py). ``human`` are `align`ed judgments (p in the AI row's
    orientation; a pair's annotators are averaged); ``p_of(row)`` is the AI probability used
    (default: ``label.p_chosen``). Every AI pair counts; the human slice corrects them."""
    p_of = p_of or ai_p
    by_pair: dict[str, list[float]] = {}
    for h in human:
        by_pair.setdefault(h["pair_id"], []).append(h["p"])
    f, y, groups, targets = {}, {}, {}, set()
    for pid, row in ai.items():
        flip, target = _toward_revision(row)
        targets.add(target)
        p = p_of(row)
        f[pid] = 1.0 - p if flip else p
        if pid in by_pair:
            c = sum(by_pair[pid]) / len(by_pair[pid])
            y[pid] = 1.0 - c if flip else c
        for prin in _row_principles(row):
            groups.setdefault(prin, []).append(pid)

    def block(pids: list[str]) -> dict:
        lab = [pid for pid in pids if pid in y]
        unl = [pid for pid in pids if pid not in y]
        e = estimates([y[p] for p in lab], [f[p] for p in lab], [f[p] for p in unl])
        return {"pairs": len(pids), "human_labelled": len(lab), **e}

    target = (
        "the revision"
        if targets == {"revision"}
        else "`chosen`"
        if targets == {"chosen"}
        else ("the revision (`chosen` where a row has no trace)")
    )
    overall = block(list(ai))
    per = {k: block(v) for k, v in sorted(groups.items())}
    warn = rate_warnings(overall, "overall")
    thin = [k for k, v in per.items() if v["human_labelled"] < TOO_FEW]
    if thin:
        warn.append(
            f"{len(thin)} of {len(per)} principles have fewer than {TOO_FEW} human labels each "
            f"({', '.join(thin[:5])}{', …' if len(thin) > 5 else ''}): their rates say little."
        )
    for k, v in per.items():
        if k not in thin:
            keep = ("biased", "add nothing", "no width")
            warn += [w for w in rate_warnings(v, f"principle {k}") if any(x in w for x in keep)]
    return {"target": target, "overall": overall, "per_principle": per, "warnings": warn}


def rate_blocks(r: dict, title: str = "Preference rate") -> list[tuple]:
    """Report blocks for :func:`preference_rates` (shared by `cai agreement` and `cai calibrate`)."""

    def ci(e: dict) -> str:
        if e["estimate"] is None:
            return "n/a"
        return pct(e["estimate"]) + (f" ({pct(e['ci'][0])} – {pct(e['ci'][1])})" if e["ci"] else "")

    def row(name: str, b: dict) -> list[str]:
        ppi = b["ppi"]
        worth = (
            f"{ppi['n_effective']:.0f} (the AI labels worth "
            f"{max(0.0, ppi['n_effective'] - ppi['n']):.0f} more)"
            if ppi["n_effective"] is not None
            else "n/a"
        )
        lam = f"{ppi['lambda']:.2f}" if ppi["estimate"] is not None else "n/a"
        return [
            name,
            str(b["pairs"]),
            str(b["human_labelled"]),
            ci(b["human"]),
            ci(b["ai"]),
            ci(ppi),
            lam,
            worth,
        ]

    rows = [row("**overall**", r["overall"])] + [row(k, b) for k, b in r["per_principle"].items()]
    head = [
        "",
        "pairs",
        "human labels",
        "human labels alone",
        "AI labels alone (biased)",
        "prediction-powered",
        "λ",
        "effective human labels",
    ]
    B: list[tuple] = [("h2", title)]
    B.append(("p", f"How often people prefer {r['target']}, with 95% intervals."))
    if r["warnings"]:
        B.append(("ul", [f"**{w}**" for w in r["warnings"]]))
    B.append(("table", head, rows))
    B.append(
        (
            "p",
            "Human labels alone: the mean of the people's labels on the pairs they answered (a tie, or a "
            "split between annotators, counts as its share). AI labels alone: the mean of the judge's "
            "probability over every pair: tight, but it carries the judge's bias, and is shown only for "
            "contrast. Prediction-powered (Angelopoulos et al., Science 2023; PPI++ power tuning): every AI"
            " label, corrected by how far the judge was from people on the human slice; valid whatever the "
            "judge's bias when the slice is a random sample of the pairs (`cai review` orders them at "
            "random). λ weighs the AI labels (0: not used). Effective human labels: how many human labels "
            "alone would give an interval as narrow. All three intervals are normal approximations. Per "
            "principle: the pairs whose revision came from that principle (or that the judge judged under "
            "it, for pairs without a trace).",
        )
    )
    return B
