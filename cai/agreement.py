"""`cai agreement`: how often the AI labels agree with people, on the user's own pairs.

Inputs: the AI-labelled pairs (`cai generate` / `cai label` output) and one or more files of
human labels (`cai review` output, or any pairs file whose labels have ``source: "human"``).
Human rows are matched to AI rows by ``pair_id`` (review rows) or ``id``, and turned into the AI
row's orientation by comparing the response texts (``cai/labeljoin.py``), so a human file may hold
a pair either way round. Each annotator's last answer per pair counts (``records.read_pairs``
resolves ``label.revision``); skips and undone answers count for nothing.

Every agreement figure and interval comes from ``cai.stats.agreement`` (share of pairs where
both pick the same side, an AI tie counting ½, reference ties left out; 95% Wilson interval;
Cohen's kappa on the hard sides), the same measure `cai label`'s summary and `cai compare` use.

- **overall**: the AI label against the human consensus per pair (the mean of the annotators'
  answers; an even split is a tie and is left out), so each pair counts once;
- **per annotator**: the AI label against each person's answers;
- **between annotators**: each pair of people on the pairs both answered;
- **per principle**: the judge's per-principle probability (``judge.by_principle``) against
  the consensus;
- **by judge confidence**: pairs split into bins of equal size by max(p, 1 − p) of the AI label;
- baselines on the same pairs: "pick the shorter answer" and each answer order of the judge alone;
- **preference rate** (``cai/prefrate.py``): how often people prefer the revision (or the
  file's ``chosen`` where a row has no critique/revision trace), overall and per principle,
  human-only, AI-only and prediction-powered.

Writes ``agreement.json``, ``agreement.md``, a self-contained ``agreement.html`` (the same
renderer as `cai eval`'s report) and ``agreement_by_confidence.png``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from cai import __version__
from cai.configs import AgreementConfig
from cai.errors import InputError
from cai.fmt import pct, rate_txt
from cai.guard import claim_output
from cai.labeljoin import FEW, ai_p, align, load_ai, load_human, texts
from cai.options import check_config
from cai.prefrate import preference_rates, rate_blocks
from cai.recheck import recheck_blocks
from cai.recheck import stats as recheck_stats
from cai.records import file_sha256, write_atomic, write_json, write_text
from cai.stats import agreement

PLOT = "agreement_by_confidence.png"


# ============================================================================ the numbers


def _by_principle(row) -> dict[str, float]:
    judge = row["label"].get("judge") or {}
    by = judge.get("by_principle")
    if isinstance(by, dict) and by:
        return {k: sum(map(float, v)) / len(v) for k, v in by.items() if v}
    return {p: ai_p(row) for p in judge.get("principles") or []}


def _bins(pairs: list[tuple[float, float, float]], k: int) -> list[dict]:
    """(confidence, p_ai, p_ref) rows split into k bins of (nearly) equal size by confidence."""
    pairs = sorted(pairs)
    k = max(1, min(k, len(pairs)))
    out = []
    for i in range(k):
        chunk = pairs[len(pairs) * i // k : len(pairs) * (i + 1) // k]
        if not chunk:
            continue
        r = agreement([(pa, pr) for _, pa, pr in chunk])
        out.append({"confidence": [round(chunk[0][0], 4), round(chunk[-1][0], 4)], **r})
    return out


def _flip(row) -> bool:
    """Whether to turn a pair round into the orientation every figure is computed in.

    Agreement rates do not depend on which response a file calls ``chosen``; Cohen's kappa
    does (its chance term uses how often each rater picks ``chosen``), and `cai generate` puts
    the judge's pick there, which would make the judge a constant rater and kappa 0 by
    construction. So every pair is turned to (revision, initial) when its trace names the
    initial answer, else to the two response texts in sorted order: a choice neither label made.
    """
    c, r = texts(row)
    initial = str((row.get("trace") or {}).get("initial", "")).strip()
    if initial and initial in (c, r):
        return c == initial
    return c > r


def compute(ai: dict[str, dict], human: list[dict], bins: int = 3) -> dict:
    flip = {pid: _flip(row) for pid, row in ai.items()}

    def o(pid, p: float) -> float:  # a P(chosen) in the common orientation
        return 1.0 - p if flip[pid] else p

    annotators = sorted({h["annotator"] for h in human})
    by_pair: dict[str, dict[str, float]] = {}
    for h in human:
        by_pair.setdefault(h["pair_id"], {})[h["annotator"]] = o(h["pair_id"], h["p"])
    consensus = {pid: sum(v.values()) / len(v) for pid, v in by_pair.items()}
    p_ai = {pid: o(pid, ai_p(ai[pid])) for pid in consensus}

    overall = agreement([(p_ai[pid], c) for pid, c in consensus.items()])
    per_annotator = {
        who: {
            **agreement([(p_ai[pid], v[who]) for pid, v in by_pair.items() if who in v]),
            "answers": _answers([h for h in human if h["annotator"] == who]),
        }
        for who in annotators
    }
    between = []
    for a, b in itertools.combinations(annotators, 2):
        both = [pid for pid, v in by_pair.items() if a in v and b in v]
        between.append({"annotators": [a, b], **agreement([(by_pair[p][a], by_pair[p][b]) for p in both])})

    def shorter(pid):
        c, r = texts(ai[pid])
        return o(pid, 0.5 if len(c) == len(r) else float(len(c) < len(r)))

    baselines = {"shorter answer": agreement([(shorter(pid), c) for pid, c in consensus.items()])}
    for i, name in enumerate(("judge, `chosen` shown first only", "judge, `chosen` shown second only")):
        vals = [
            (o(pid, float(j[i])), c)
            for pid, c in consensus.items()
            if len(j := (ai[pid]["label"].get("judge") or {}).get("orders") or []) == 2 and None not in j
        ]
        if vals:
            baselines[name] = agreement(vals)

    per_principle: dict[str, list] = {}
    for pid, c in consensus.items():
        for prin, p in _by_principle(ai[pid]).items():
            per_principle.setdefault(prin, []).append((o(pid, p), c))
    conf = [(max(p_ai[pid], 1 - p_ai[pid]), p_ai[pid], c) for pid, c in consensus.items() if c != 0.5]

    return {
        "pairs": len(consensus),
        "annotators": annotators,
        "orientation": {
            "revision_first": sum(1 for pid in consensus if (ai[pid].get("trace") or {}).get("initial")),
            "turned_round": sum(flip[pid] for pid in consensus),
        },
        "overall": overall,
        "per_annotator": per_annotator,
        "between_annotators": between,
        "baselines": baselines,
        "per_principle": {k: agreement(v) for k, v in sorted(per_principle.items())},
        "by_confidence": _bins(conf, bins),
    }


def _answers(hs: list[dict]) -> dict:
    """How one person answered: counts of first/second/tie, and the share picking the left response."""
    counts = {"first": 0, "second": 0, "tie": 0}
    for h in hs:
        if h.get("answer") in counts:
            counts[h["answer"]] += 1
    sided = counts["first"] + counts["second"]
    counts["left_share"] = round(counts["first"] / sided, 4) if sided else None
    return counts


def warnings(m: dict) -> list[str]:
    out = []
    o = m["overall"]
    if o["n"] < FEW:
        out.append(
            f"Only {o['n']} pairs with a human side: the interval is wide; label {FEW}+ pairs before "
            "trusting the judge either way."
        )
    if o["ci95"] and o["ci95"][0] <= 0.5 <= o["ci95"][1]:
        out.append(
            "The judge's agreement with people is within noise of chance (50% is inside the interval)."
        )
    sh = m["baselines"]["shorter answer"]
    if o["agreement"] is not None and sh["agreement"] is not None and sh["agreement"] >= o["agreement"]:
        out.append(
            f'"Pick the shorter answer" agrees with people as often ({pct(sh["agreement"])}) as the judge.'
        )
    if (m.get("recheck") or {}).get("at_chance"):
        out.append(
            "The re-check judge is at chance (see Re-check): its per-principle improvements, "
            "regressions and conflicts are noise."
        )
    for b in m["between_annotators"]:
        if b["kappa"] is not None and b["kappa"] < 0.2:
            out.append(
                f"{b['annotators'][0]} and {b['annotators'][1]} agree little with each other "
                f"(kappa {b['kappa']}): the task or the pairs may be ambiguous."
            )
    return out


# ============================================================================ the report


def _kappa(r: dict) -> str:
    return "n/a" if r.get("kappa") is None else f"{r['kappa'] + 0.0:+.2f}".replace("-0.00", "+0.00")


def _row(name: str, r: dict) -> list[str]:
    return [name, str(r["n"]), rate_txt(r), _kappa(r), str(r["ties"]), str(r["reference_ties"])]


HEAD = ["", "pairs", "agreement (95% CI)", "Cohen's κ", "AI ties (½)", "human ties (left out)"]


def build_blocks(m: dict) -> list[tuple]:
    """The agreement report, section by section."""
    B = _agreement_blocks(m) + _annotator_blocks(m) + _principle_blocks(m)
    if m.get("preference_rate"):
        r = dict(m["preference_rate"], warnings=[])  # its warnings are at the top already
        B += rate_blocks(r, "Preference rate: human, AI and prediction-powered")
    B += _confidence_blocks(m)
    if m.get("recheck"):
        B += recheck_blocks(m["recheck"])
    return B + _provenance_blocks(m)


def _agreement_blocks(m: dict) -> list[tuple]:
    """The files, the warnings, and the judge's agreement with people (overall, per person, the baselines)."""
    B: list[tuple] = [("h1", "AI–human agreement")]
    prov = m["provenance"]
    B.append(
        (
            "p",
            f"AI labels: `{prov['ai']['path']}`; human labels: "
            + ", ".join(f"`{f['path']}` ({f['judgments']} answers)" for f in prov["human"]["files"])
            + f". {m['pairs']} pairs answered by {len(m['annotators'])} "
            + f"annotator{'s' * (len(m['annotators']) != 1)} ({', '.join(m['annotators'])}).",
        )
    )
    if m["warnings"]:
        B.append(("ul", [f"**{w}**" for w in m["warnings"]]))
    rows = [_row("**AI judge vs people** (consensus per pair)", m["overall"])]
    rows += [_row(f"AI judge vs {who}", r) for who, r in m["per_annotator"].items()]
    rows += [_row(f"[baseline] {name}", r) for name, r in m["baselines"].items()]
    B += [("h2", "Agreement"), ("table", HEAD, rows)]
    B.append(
        (
            "p",
            "Agreement: share of pairs where the AI label (p > ½ after averaging both answer orders) "
            "picks the response people picked; an AI p = ½ counts ½; pairs people called a tie (or split "
            "on) have no side and are left out. 95% Wilson interval. Cohen's κ: agreement beyond what the "
            "two label rates alone would give (0 = chance, 1 = perfect), on pairs where both picked a "
            "side; computed with each pair as (revision, initial) when it has a critique/revision trace, "
            "else with its two texts in sorted order, so it does not depend on which response a file "
            "calls `chosen`.",
        )
    )
    return B


def _annotator_blocks(m: dict) -> list[tuple]:
    """How much people agree with each other, and how each one answered."""
    B: list[tuple] = []
    B.append(("h2", "Between annotators"))
    if m["between_annotators"]:
        B.append(("table", HEAD, [_row(" vs ".join(b["annotators"]), b) for b in m["between_annotators"]]))
        B.append(("p", "The first name's ties count ½; pairs the second called a tie are left out."))
    else:
        B.append(
            (
                "p",
                "One annotator: have a second person label the same sample (`cai review --seed` with the "
                "same seed and `--sample`, another `--annotator`) to see how much people agree with each "
                "other.",
            )
        )
    ans = [
        [
            who,
            str(r["answers"]["first"]),
            str(r["answers"]["second"]),
            str(r["answers"]["tie"]),
            pct(r["answers"]["left_share"]),
        ]
        for who, r in m["per_annotator"].items()
    ]
    B.append(
        (
            "table",
            ["annotator", "picked response 1", "picked response 2", "tie", "share picking the left one"],
            ans,
        )
    )
    return B


def _principle_blocks(m: dict) -> list[tuple]:
    """The judge under each principle alone against the consensus."""
    if not m["per_principle"]:
        return []
    return [
        ("h2", "Per principle"),
        ("table", ["principle"] + HEAD[1:], [_row(k, r) for k, r in m["per_principle"].items()]),
        (
            "p",
            "The judge's probability under each principle alone (both orders averaged) "
            "against the consensus.",
        ),
    ]


def _confidence_blocks(m: dict) -> list[tuple]:
    """Agreement in bins of the judge's confidence (and the plot)."""
    B: list[tuple] = []
    B.append(("h2", "Agreement by judge confidence"))
    B.append(
        (
            "table",
            ["confidence max(p, 1 − p)"] + HEAD[1:],
            [
                [f"{b['confidence'][0]:.3f} – {b['confidence'][1]:.3f}"] + _row("", b)[1:]
                for b in m["by_confidence"]
            ],
        )
    )
    B.append(
        (
            "p",
            "Pairs with a human side, split into bins of equal size by how sure the AI label is. A useful "
            "judge agrees more where it is surer.",
        )
    )
    B.append(("img", PLOT, "agreement by judge confidence"))
    return B


def _provenance_blocks(m: dict) -> list[tuple]:
    """The files' hashes, how the human answers joined the AI rows, the version and command."""
    prov, j = m["provenance"], m["join"]
    B: list[tuple] = []
    B.append(("h2", "Provenance"))
    B.append(
        (
            "ul",
            [
                f"AI file sha256 `{prov['ai']['sha256'][:16]}`, {prov['ai']['ai_labelled']} AI-labelled rows",
                *[f"`{f['path']}` sha256 `{f['sha256'][:16]}`" for f in prov["human"]["files"]],
                f"human answers without an AI row: {j['no_ai_row']}; "
                f"with different response texts: {j['different_texts']}; "
                f"turned round to the AI row's orientation: {j['flipped']}; "
                f"skipped or undone: {prov['human']['unlabelled']}",
                f"cai {m['version']}" + (f"; command: `{m['command']}`" if m.get("command") else ""),
            ],
        )
    )
    return B


def write_plot(m: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in m["by_confidence"] if b["agreement"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for b in bins:
        x = (b["confidence"][0] + b["confidence"][1]) / 2
        lo, hi = b["ci95"]
        ax.errorbar(
            x,
            b["agreement"],
            yerr=[[b["agreement"] - lo], [hi - b["agreement"]]],
            fmt="o",
            color="C0",
            capsize=3,
        )
        ax.hlines(b["agreement"], b["confidence"][0], b["confidence"][1], color="C0", lw=2)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xlabel("AI label confidence max(p, 1 − p)")
    ax.set_ylabel("agreement with people (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_xlim(0.48, 1.02)
    fig.tight_layout()
    write_atomic(out / PLOT, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def run_agreement(cfg: AgreementConfig) -> dict:
    check_config(cfg)
    if not cfg.human:
        raise InputError("pass at least one --human file (`cai review` output)")
    with claim_output(
        cfg.out,
        inputs=[cfg.ai, *cfg.human],
        kind="folder",
        marker=("agreement.json", "agreement report"),
        discard_on_error=True,
    ):
        ai, ai_counts = load_ai(cfg.ai, cfg.skip_bad)
        human, h_counts = load_human(cfg.human, cfg.skip_bad)
        kept, join = align(human, ai)
        if not kept:
            raise InputError(
                f"none of the {len(human)} human answers matches a pair in the AI file "
                f"({join['no_ai_row']} ids not found, {join['different_texts']} with other texts); "
                "label the same pairs file you pass as --ai",
                cfg.human[0],
            )
        m = compute(ai, kept, cfg.bins)
        rc = recheck_stats(list(ai.values()))  # over every AI row, answered by people or not
        if rc:
            m["recheck"] = rc
        m["preference_rate"] = preference_rates(ai, kept)
        m["join"] = join
        m["provenance"] = {
            "ai": {"path": str(cfg.ai), "sha256": file_sha256(cfg.ai), **ai_counts},
            "human": h_counts,
        }
        m["version"] = __version__
        m["command"] = cfg.command
        m["warnings"] = warnings(m) + m["preference_rate"]["warnings"]
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "agreement.json", m)
        write_plot(m, out)
        from cai.plots import write_recheck_plot
        from cai.render import render_html, render_md

        if rc:
            write_recheck_plot(rc, out)

        blocks = build_blocks(m)
        write_text(out / "agreement.md", render_md(blocks))
        write_text(out / "agreement.html", render_html(blocks, out))
    for w in m["warnings"]:
        print(f"cai agreement: {w}", file=sys.stderr)
    return m


def summary_line(m: dict, out) -> str:
    o = m["overall"]
    k = _kappa(o)
    return (
        f"cai agreement: AI vs people {rate_txt(o)} on {o['n']} pairs, Cohen's kappa {k}; "
        f"{len(m['annotators'])} annotator(s) -> {Path(out) / 'agreement.html'}"
    )
