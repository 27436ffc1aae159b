"""AI labels and human answers on the same pairs, joined: what `cai agreement` and `cai calibrate` read.

`load_ai` keeps the AI-labelled rows of a pairs file by id; `load_human` reads one judgment per
(pair, annotator) from `cai review` output (or any pairs file whose labels have ``source:
"human"``; each annotator's last answer per pair counts, ``records.read_pairs`` resolves
``label.revision``); `align` matches them by ``pair_id``/``id`` and turns each human p into the
AI row's orientation by comparing the response texts, so a human file may hold a pair either way
round.
"""

from __future__ import annotations

from pathlib import Path

from cai.errors import InputError
from cai.records import file_sha256, read_pairs, response_text

FEW = 30  # below this many human labels an interval is too wide to trust


def texts(row) -> tuple[str, str]:
    """The row's two responses, stripped: (chosen, rejected)."""
    return response_text(row["chosen"]).strip(), response_text(row["rejected"]).strip()


def ai_p(row) -> float:
    """The AI label: the row's ``p_chosen``."""
    return float(row["label"]["p_chosen"])


def load_ai(path, skip_bad: bool = False) -> tuple[dict[str, dict], dict]:
    stats: dict = {}
    rows = read_pairs(path, skip_bad=skip_bad, stats=stats)
    ai = {r["id"]: r for r in rows if (r.get("label") or {}).get("source") == "ai"}
    if not ai:
        raise InputError(
            "has no AI labels (rows with label.source 'ai'); "
            "pass the output of `cai generate` or `cai label`",
            path,
        )
    return ai, {
        "rows": len(rows),
        "ai_labelled": len(ai),
        "skipped": len(stats["skipped"]),
        "ties": stats.get("ties", 0),
    }


def load_human(paths, skip_bad: bool = False) -> tuple[list[dict], dict]:
    """One judgment per (pair, annotator): {pair_id, annotator, p, row}."""
    out, counts = [], {"files": [], "not_human": 0, "unlabelled": 0}
    for path in paths:
        stats: dict = {}
        try:
            rows = read_pairs(path, skip_bad=skip_bad, stats=stats)
        except InputError:
            if stats.get("unlabelled"):  # every answer in the file is a skip or an undo
                rows = []
            else:
                raise
        kept = 0
        for r in rows:
            lab = r.get("label") or {}
            if lab.get("source") != "human":
                counts["not_human"] += 1
                continue
            who = str(lab.get("annotator") or Path(path).name.split(".")[0])
            out.append(
                {
                    "pair_id": str(r.get("pair_id") or r["id"]),
                    "annotator": who,
                    "p": float(lab["p_chosen"]),
                    "answer": lab.get("answer"),
                    "shown": lab.get("shown"),
                    "row": r,
                }
            )
            kept += 1
        counts["unlabelled"] += stats.get("unlabelled", 0)
        counts["files"].append(
            {
                "path": str(path),
                "sha256": file_sha256(path),
                "judgments": kept,
                "skipped": len(stats["skipped"]),
            }
        )
    if not out:
        raise InputError("no human answers found (label.source 'human' with p_chosen set)", paths[0])
    return out, counts


def align(human: list[dict], ai: dict[str, dict]) -> tuple[list[dict], dict]:
    """Put each human p in the AI row's orientation; drop judgments with no AI row or other texts."""
    kept, missing, mismatched, flipped = [], 0, 0, 0
    for h in human:
        a = ai.get(h["pair_id"])
        if a is None:
            missing += 1
            continue
        hc, hr = texts(h["row"])
        ac, ar = texts(a)
        if (hc, hr) == (ac, ar):
            p = h["p"]
        elif (hc, hr) == (ar, ac):
            p, flipped = 1.0 - h["p"], flipped + 1
        else:
            mismatched += 1
            continue
        kept.append({**h, "p": p})
    return kept, {"no_ai_row": missing, "different_texts": mismatched, "flipped": flipped}
