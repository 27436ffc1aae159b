"""The re-check's numbers: regressions, per-principle improvement rates and the conflict matrix.

`cai generate --recheck` and `cai label --recheck` judge a pair's final answer against the
other response under every principle of the constitution (`judge.recheck_pairs`) and write
``trace.recheck`` (one ``{"principle", "p_final_better", "orders"}`` per principle). This module
turns those entries into what a user acts on, with no model and no files:

- ``regressed``: the principles under which the final answer is judged worse, P(final better)
  below ``0.5 - margin``, worst first (``trace.regressed``); ``improved`` the other way round;
- ``stats``: over many rows, per principle how often revisions improved and regressed it (95%
  Wilson intervals), the **conflict matrix** (rows revised for principle A in which principle B
  regressed, n of m), what repair rounds did, and whether the judge is **at chance**: how often
  both presentation orders agree on the better response. A judge that reads the responses
  agrees with itself across orders more often than a coin (50%); a position-biased one far less.
  Below that, every improvement and regression it reports is noise, and the report says so;
- ``summary_lines``: the lines `generate` and `label` print; ``recheck_blocks``: the re-check
  section of the eval and agreement reports (per-principle table, conflict matrix; the heat map
  it shows is drawn by plots.py).

Used by revise (generate), feedback (label), train (`--drop-regressed`), evaluate and
agreement.
"""

from __future__ import annotations

from cai.fmt import pct
from cai.stats import wilson_interval

DEFAULT_MARGIN = 0.1  # --recheck-margin's default (configs), and for rows that do not record theirs
RECHECK_PLOT = "recheck_conflicts.png"  # written when the pairs carry a re-check (--recheck)
FEW = 30  # fewer re-checked rows than this: the intervals are wide


def regressed(entries: list[dict], margin: float) -> list[str]:
    """Principle ids whose P(final better) is below 0.5 - margin, worst first."""
    low = [
        (e["p_final_better"], k, e["principle"])
        for k, e in enumerate(entries)
        if e["p_final_better"] < 0.5 - margin
    ]
    return [pid for _, _, pid in sorted(low)]


def improved(entries: list[dict], margin: float) -> list[str]:
    """Principle ids whose P(final better) is above 0.5 + margin."""
    return [e["principle"] for e in entries if e["p_final_better"] > 0.5 + margin]


def revised_for(trace: dict) -> list[str]:
    """The principles whose revisions made the row's final answer: rounds with a revision that
    changed the answer (an empty or early-stopped round changes nothing), then kept repairs."""
    out: list[str] = []
    for r in trace.get("rounds") or []:
        if r.get("revision"):
            out.append(r["principle"])
    for r in trace.get("repairs") or []:
        if r.get("kept"):
            out.append(r["principle"])
    return list(dict.fromkeys(out))


def margin_of(row: dict) -> float:
    """The margin the row was re-checked with (meta.params.recheck.margin), else the default."""
    rc = (((row.get("meta") or {}).get("params") or {}).get("recheck")) or {}
    m = rc.get("margin") if isinstance(rc, dict) else None
    return float(m) if isinstance(m, (int, float)) and not isinstance(m, bool) else DEFAULT_MARGIN


def has_regression(row: dict) -> bool:
    return bool((row.get("trace") or {}).get("regressed"))


def share(k: int, n: int) -> dict:
    """k of n with its 95% Wilson interval."""
    if not n:
        return {"k": k, "n": 0, "rate": None, "ci95": None}
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def consistency(k: int, units: int, rows: int) -> dict:
    """Share of (pair, principle) judgements whose two orders pick the same response. A pair's
    judgements are not independent (one pair, one judge), so the 95% Wilson interval counts
    each pair once (n = pairs): wider than one over the judgements, as it should be."""
    if not units:
        return {"k": 0, "n": 0, "rows": 0, "rate": None, "ci95": None}
    rate = k / units
    lo, hi = wilson_interval(rate * rows, rows)
    return {"k": k, "n": units, "rows": rows, "rate": round(rate, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def share_txt(x: dict) -> str:
    """'33.3% [9.7%–70.0%]' for a share() result."""
    if x["rate"] is None:
        return "n/a"
    return f"{pct(x['rate'])} [{pct(x['ci95'][0])}–{pct(x['ci95'][1])}]"


def _entries(row: dict) -> list[dict]:
    rc = (row.get("trace") or {}).get("recheck")
    return [e for e in rc if isinstance(e, dict) and "principle" in e] if isinstance(rc, list) else []


def stats(rows: list[dict]) -> dict | None:
    """The re-check over rows (those with a non-empty trace.recheck); None when no row has one."""
    checked = [r for r in rows if _entries(r)]
    if not checked:
        return None
    principles: list[str] = []
    per: dict[str, dict] = {}
    conflicts: dict[str, dict[str, int]] = {}
    revised: dict[str, int] = {}
    margins = set()
    with_regression = consistent = units = decided_rows = 0
    repaired = kept = fixed = 0
    for r in checked:
        m = margin_of(r)
        margins.add(m)
        entries, trace = _entries(r), r.get("trace") or {}
        reg = set(trace["regressed"] if isinstance(trace.get("regressed"), list) else regressed(entries, m))
        imp = set(improved(entries, m))
        with_regression += bool(reg)
        units0 = units
        for e in entries:
            pid = e["principle"]
            if pid not in per:
                principles.append(pid)
                per[pid] = {"n": 0, "improved": 0, "regressed": 0, "sum_p": 0.0}
            d = per[pid]
            d["n"] += 1
            d["improved"] += pid in imp
            d["regressed"] += pid in reg
            d["sum_p"] += float(e["p_final_better"])
            o = e.get("orders")
            if isinstance(o, list) and len(o) == 2 and 0.5 not in o:
                units += 1
                consistent += (o[0] > 0.5) == (o[1] > 0.5)
        decided_rows += units > units0
        for a in revised_for(trace):
            revised[a] = revised.get(a, 0) + 1
            row_c = conflicts.setdefault(a, {})
            for b in reg:
                row_c[b] = row_c.get(b, 0) + 1
        reps = trace.get("repairs") or []
        if reps:
            repaired += 1
            if any(x.get("kept") for x in reps):
                kept += 1
                fixed += not reg
    for a in revised:
        for b in principles:
            conflicts.setdefault(a, {}).setdefault(b, 0)
    c = consistency(consistent, units, decided_rows)
    at_chance = None if c["rate"] is None else c["ci95"][0] <= 0.5
    out = {
        "rows": len(checked),
        "principles": principles,
        "margin": margins.pop() if len(margins) == 1 else sorted(margins),
        "rows_with_regression": share(with_regression, len(checked)),
        "per_principle": {
            pid: {
                "n": d["n"],
                "improved": share(d["improved"], d["n"]),
                "regressed": share(d["regressed"], d["n"]),
                "mean_p_final_better": round(d["sum_p"] / d["n"], 4),
            }
            for pid, d in per.items()
        },
        # conflicts[A][B] = [rows revised for A in which B regressed, rows revised for A]
        "conflicts": {
            a: {b: [conflicts[a][b], revised[a]] for b in principles} for a in principles if a in revised
        },
        "repairs": {"rows": repaired, "kept": kept, "fixed": fixed},
        "consistency": c,
        "at_chance": at_chance,
    }
    out["warnings"] = warnings(out)
    return out


def warnings(s: dict) -> list[str]:
    w = []
    c = s["consistency"]
    if s["at_chance"]:
        w.append(
            f"the re-check judge is at chance: both orders agreed on the better response in "
            f"{pct(c['rate'])} of {c['n']} (pair, principle) judgements (95% CI {pct(c['ci95'][0])}–"
            f"{pct(c['ci95'][1])} over {c['rows']} pairs), "
            + (
                "less often than a coin's 50%, so which response wins depends on where it is shown, "
                "not on what it says"
                if c["ci95"][1] < 0.5
                else "not clearly more often than a coin's 50%, so which response wins may depend on "
                "where it is shown rather than on what it says"
            )
            + "; the improvements, regressions and conflicts are noise, not the revisions' effect; "
            "use a stronger --model (or re-check more pairs)"
        )
    if s["rows"] < FEW:
        w.append(f"only {s['rows']} re-checked rows: the intervals are wide; re-check more rows")
    return w


def top_conflicts(s: dict, k: int = 5) -> list[tuple[str, str, int, int]]:
    """The k largest cells (A, B, n, m) with n > 0, by rate then count."""
    cells = [(a, b, n, m) for a, row in s["conflicts"].items() for b, (n, m) in row.items() if n]
    return sorted(cells, key=lambda x: (-x[2] / x[3], -x[2], x[0], x[1]))[:k]


def summary_lines(s: dict | None) -> list[str]:
    """What `generate` and `label` print about the re-check."""
    if not s:
        return []
    rr = s["rows_with_regression"]
    lines = [
        f"re-check: {s['rows']} rows under {len(s['principles'])} principles (margin {s['margin']}); "
        f"{rr['k']} with a regression ({share_txt(rr)})"
        + (
            f"; repairs on {s['repairs']['rows']} rows, kept on {s['repairs']['kept']}, "
            f"{s['repairs']['fixed']} left without a regression"
            if s["repairs"]["rows"]
            else ""
        )
    ]
    parts = [
        f"{pid} {share_txt(d['improved'])} / {share_txt(d['regressed'])}"
        for pid, d in s["per_principle"].items()
    ]
    lines.append("re-check per principle, improved / regressed (95% CI): " + ", ".join(parts))
    top = top_conflicts(s)
    if top:
        lines.append(
            "re-check conflicts (revising for A regressed B): "
            + ", ".join(f"{a} -> {b} in {n} of {m}" for a, b, n, m in top)
        )
    lines += [f"warning: {x}" for x in s["warnings"]]
    return lines


def recheck_blocks(rc: dict, plot: str = RECHECK_PLOT) -> list[tuple]:
    """The re-check section: per principle how often revisions improved and regressed it, and
    the conflict matrix (as a table and the heat map `plot`)."""
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
