"""The judge: AI preference labels from a constitution (the method: docs/judge.md).

For every pair and each of K principles, the compare template is rendered twice — the row's
`chosen` shown as option (A), then as option (B) — and the judge's probability of each option
letter is read from the model's next-token log-probabilities, normalised over the two letters
(the Constitutional AI paper's multiple-choice method). Small judges lean hard toward one
position, so the two orders are averaged; both stay in the row::

    label = {"p_chosen": mean(orders), "source": "ai",
             "judge": {"orders": [p(chosen) when shown first, p(chosen) when shown second],
                       "principles": [ids], "by_principle": {id: [first, second]},
                       "method": "logprob" | "cot" | "verdict", "model": ..., ...}}

Every probability here is about the row's own `chosen`, whichever letter it was shown under.

Variants: an ensemble over K principles (averaged per order); chain of thought (the judge writes
its reasoning first, then the letters are scored after it, clamped to a band as in the CAI paper
because reasoning makes small judges overconfident); and a generated verdict for backends that
expose no log-probs (an unparseable answer counts as 0.5, its raw text is kept, and it is counted).

The re-check (`recheck_pairs`) asks the same judge about a final answer under every principle;
`flip_label` turns a judgement round when a row's chosen and rejected are swapped. The stage
that writes labelled files is `cai.feedback` (`cai label`).
"""

from __future__ import annotations

import math
import re

from cai.errors import InputError
from cai.records import response_text
from cai.stats import mean as _mean

OPTIONS = ("A", "B")
VERDICT_MAX_NEW_TOKENS = 8  # "A) ..." is all a verdict needs; more only costs time


# ============================================================================ the judge


def render_judge_prompt(
    constitution, row: dict, principle, chosen_first: bool, cot: bool, reasoning: str
) -> list[dict]:
    chosen, rejected = response_text(row["chosen"]), response_text(row["rejected"])
    a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
    return constitution.render(
        "compare",
        conversation=row["prompt"],
        response_a=a,
        response_b=b,
        question=principle.compare,
        principle=principle,
        options=list(OPTIONS),
        cot=cot,
        reasoning=reasoning,
    )


def _p_first(logprobs) -> float | None:
    """P(option A) normalised over the two options; None when neither option is scored."""
    la, lb = (float(x) if x is not None else -math.inf for x in logprobs[:2])
    if not (math.isfinite(la) or math.isfinite(lb)):
        return None
    if not math.isfinite(lb):
        return 1.0
    if not math.isfinite(la):
        return 0.0
    return 1.0 / (1.0 + math.exp(lb - la))


_VERDICT_START = re.compile(r"^[\s(\[*\"']*([A-Z])\s*(?:[)\].,:;*\"']|$)")
_VERDICT_SAID = re.compile(r"(?i:answer|option|response|choice)\s*(?:is)?\s*:?\s*\(?\s*([A-Z])\s*(?:\)|\b)")


def parse_verdict(text: str, options=OPTIONS) -> str | None:
    """The option letter a generated verdict names, or None when it names none (or both).

    Accepts what follows the template's "The answer is: (" prefix ("A)", "B", "(A) because ..."),
    and "answer is B" / "option (A)" anywhere in a longer reply.
    """
    t = (text or "").strip()
    m = _VERDICT_START.match(t)
    if m and m.group(1) in options:
        return m.group(1)
    said = set(_VERDICT_SAID.findall(t)) & set(options)
    if len(said) == 1:
        return said.pop()
    bracketed = {o for o in options if re.search(rf"\(\s*{re.escape(o)}\s*\)", t)}
    return bracketed.pop() if len(bracketed) == 1 else None


def _clean_reasoning(text: str) -> str:
    """The reasoning up to where the model announces an answer itself: the second stage asks
    for the letter right after it, so a restated answer would only be scored twice."""
    t = (text or "").strip()
    m = re.search(r"\btherefore,? the answer is", t, re.I)
    return t[: m.start()].strip() if m else t


def _update(progress, n: int):
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(n)
    else:
        progress(n)


def judge_pairs(
    backend,
    constitution,
    rows: list[dict],
    *,
    principles: int | None = 1,
    cot: bool = False,
    clamp: tuple[float, float] = (0.4, 0.6),
    seed: int = 0,
    progress=None,
    max_new_tokens: int = 128,
) -> list[dict]:
    """rows are pairs-contract rows (prompt/chosen/rejected messages, id). Returns one `label` dict
    per row (p_chosen about the row's own chosen):
    {"p_chosen": float, "source": "ai", "judge": {"orders": [p_chosen_shown_first, p_chosen_shown_second],
     "principles": [ids], "method": "logprob"|"cot"|"verdict", "model": ..., ...}}

    principles: K principles per pair, drawn by a seeded RNG keyed on (seed, row id); None = all.
    cot: reasoning first (up to max_new_tokens), then the letters; each probability clamped to `clamp`.
    All prompts of the call go to the backend at once (one option_logprobs call; two with cot),
    so pass a chunk of pairs, not one pair at a time. `progress` is a tqdm bar or a callable(n).
    """
    if not rows:
        return []
    if principles is not None and principles < 0:
        raise InputError(f"principles must be a positive number or None (all), not {principles}")
    lo, hi = clamp
    if not (0.0 <= lo <= 0.5 <= hi <= 1.0):
        raise InputError(f"clamp band {list(clamp)} must satisfy 0 <= low <= 0.5 <= high <= 1, e.g. 0.4 0.6")
    logprobs = bool(getattr(backend, "supports_logprobs", False))
    method = "verdict" if not logprobs else "cot" if cot else "logprob"

    # One job per (pair, principle, order); order 0 shows the row's chosen as (A).
    drawn = [constitution.sample(seed, str(r["id"]), principles) for r in rows]
    jobs = [(i, p, order) for i, ps in enumerate(drawn) for p in ps for order in (0, 1)]
    reasoning = [""] * len(jobs)
    if cot:
        first = [render_judge_prompt(constitution, rows[i], p, order == 0, True, "") for i, p, order in jobs]
        gens = backend.generate(first, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
        reasoning = [_clean_reasoning(g.text) for g in gens]
    prompts = [
        render_judge_prompt(constitution, rows[i], p, order == 0, cot, reasoning[j])
        for j, (i, p, order) in enumerate(jobs)
    ]

    p_first, verdicts, raw = _score(backend, prompts, seed)

    labels = []
    per_row: list[list[int]] = [[] for _ in rows]
    for j, (i, _, _) in enumerate(jobs):
        per_row[i].append(j)
    for i, row in enumerate(rows):
        by_principle: dict[str, list[float]] = {}
        unparsed = 0
        for j in per_row[i]:
            _, p, order = jobs[j]
            pf = p_first[j]
            if pf is None:
                unparsed += 1
                pf = 0.5
            pc = pf if order == 0 else 1.0 - pf  # about the row's chosen, whichever letter it had
            if cot:
                pc = min(max(pc, lo), hi)
            by_principle.setdefault(p.id, [0.5, 0.5])[order] = pc
        orders = [_mean(v[0] for v in by_principle.values()), _mean(v[1] for v in by_principle.values())]
        judge = {
            "orders": [round(o, 6) for o in orders],
            "principles": list(by_principle),
            "by_principle": {k: [round(x, 6) for x in v] for k, v in by_principle.items()},
            "method": method,
            "model": getattr(backend, "model_id", None),
            "options": list(OPTIONS),
        }
        if cot:
            judge["cot"] = True
            judge["clamp"] = [lo, hi]
            judge["reasoning"] = {}
            for j in per_row[i]:
                judge["reasoning"].setdefault(jobs[j][1].id, ["", ""])[jobs[j][2]] = reasoning[j]
        if not logprobs:
            judge["verdicts"], judge["raw"] = {}, {}
            for j in per_row[i]:
                pid, order = jobs[j][1].id, jobs[j][2]
                judge["verdicts"].setdefault(pid, [None, None])[order] = verdicts[j]
                judge["raw"].setdefault(pid, [None, None])[order] = raw[j]
        if unparsed or not logprobs:
            judge["unparsed"] = unparsed
        labels.append({"p_chosen": round(_mean(orders), 6), "source": "ai", "judge": judge})
    _update(progress, len(rows))
    return labels


def _score(backend, prompts: list[list[dict]], seed: int):
    """P(option A) per prompt (None: unscored), with the verdicts and raw replies of a backend
    without log-probs (None each otherwise). One backend call for all the prompts."""
    n = len(prompts)
    if getattr(backend, "supports_logprobs", False):
        return (
            [_p_first(lp) for lp in backend.option_logprobs(prompts, list(OPTIONS))],
            [None] * n,
            [None] * n,
        )
    gens = backend.generate(prompts, max_new_tokens=VERDICT_MAX_NEW_TOKENS, temperature=0.0, seed=seed)
    raw = [g.text for g in gens]
    verdicts = [parse_verdict(t) for t in raw]
    return [None if v is None else 1.0 if v == OPTIONS[0] else 0.0 for v in verdicts], verdicts, raw


# ============================================================================ the re-check


def recheck_template(constitution) -> str:
    """recheck.jinja when the constitution has one (every principle's question first, so a pair's
    prompts differ only in their last tokens), else compare.jinja, one full prompt per principle."""
    from cai.constitution import RECHECK_TEMPLATE

    return RECHECK_TEMPLATE if RECHECK_TEMPLATE in constitution.templates else "compare"


def recheck_params(constitution, margin: float, repair_rounds: int | None = None) -> dict:
    """meta.params.recheck: how the re-check judged (part of the resume check)."""
    out = {"principles": "all", "template": f"{recheck_template(constitution)}.jinja", "margin": margin}
    if repair_rounds is not None:
        out["repair_rounds"] = repair_rounds
    return out | {"options": list(OPTIONS)}


def recheck_side(row: dict) -> str:
    """The response `p_final_better` is about in `cai label --recheck`: the revision when the
    row's trace names its initial response (a `cai generate` row), else `chosen`."""
    initial = str((row.get("trace") or {}).get("initial", "")).strip()
    c, r = response_text(row["chosen"]).strip(), response_text(row["rejected"]).strip()
    return "rejected" if initial and c == initial and r != initial else "chosen"


def render_recheck_prompt(constitution, template: str, conversation, first: str, second: str, principle):
    common = dict(conversation=conversation, response_a=first, response_b=second, options=list(OPTIONS))
    if template == "compare":
        return constitution.render(
            "compare", **common, question=principle.compare, principle=principle, cot=False, reasoning=""
        )
    return constitution.render(
        template,
        **common,
        question=principle.compare,
        principle=principle,
        **constitution.recheck_variables(principle),
    )


def recheck_pairs(
    backend, constitution, items: list[tuple], *, seed: int = 0, progress=None
) -> list[list[dict]]:
    """Judge each (conversation, final, other) under every principle of the constitution, in both
    orders, in one backend call. Returns per item, in the constitution's principle order::

        [{"principle": id, "p_final_better": mean of the orders,
          "orders": [p when final is shown first, p when final is shown second]}, ...]

    (+ ``unparsed`` and ``raw`` on an entry whose generated verdicts named no option; those
    orders count 0.5). The prompts come from recheck.jinja (see recheck_template): per item the
    conversation once, per order the two responses, per principle a short suffix, so a backend
    that reuses shared prefixes (hf's prefix tree, llama.cpp's slots, a server's prefix cache)
    pays for the pair about once.
    """
    if not items:
        return []
    template = recheck_template(constitution)
    principles = list(constitution.principles.values())
    jobs = [(i, p, order) for i in range(len(items)) for order in (0, 1) for p in principles]
    prompts = []
    for i, p, order in jobs:
        conv, final, other = items[i]
        a, b = (final, other) if order == 0 else (other, final)
        prompts.append(render_recheck_prompt(constitution, template, conv, a, b, p))
    p_first, _, raw = _score(backend, prompts, seed)
    out: list[dict[str, dict]] = [
        {p.id: {"principle": p.id, "p_final_better": 0.5, "orders": [0.5, 0.5]} for p in principles}
        for _ in items
    ]
    for j, (i, p, order) in enumerate(jobs):
        e = out[i][p.id]
        pf = p_first[j]
        if pf is None:
            e["unparsed"] = e.get("unparsed", 0) + 1
            e.setdefault("raw", [None, None])[order] = raw[j]
            pf = 0.5
        e["orders"][order] = round(pf if order == 0 else 1.0 - pf, 6)
        e["p_final_better"] = round((e["orders"][0] + e["orders"][1]) / 2, 6)
    _update(progress, len(items))
    return [list(entries.values()) for entries in out]


def flip_label(label: dict) -> dict:
    """The same judgement about the *other* response (when a row's chosen/rejected are swapped).

    p_chosen -> 1 - p. Per-order figures [shown first, shown second] become
    [1 - second, 1 - first]: the new chosen was shown first exactly when the old one was second.
    Per-principle reasoning/verdicts/raw text [first, second] are reordered the same way.
    """

    def orders(o):
        return [1.0 - o[1], 1.0 - o[0]] if isinstance(o, list) and len(o) == 2 and None not in o else o

    out = dict(label)
    if out.get("p_chosen") is not None:
        out["p_chosen"] = 1.0 - out["p_chosen"]
    j = dict(out.get("judge") or {})
    if j:
        j["orders"] = orders(j.get("orders"))
        if isinstance(j.get("p_chosen"), (int, float)):  # the judge's own, on calibrated labels
            j["p_chosen"] = 1.0 - j["p_chosen"]
        if isinstance(j.get("by_principle"), dict):
            j["by_principle"] = {k: orders(v) for k, v in j["by_principle"].items()}
        for k in ("verdicts", "raw", "reasoning"):
            if isinstance(j.get(k), dict):
                j[k] = {pid: v[::-1] if isinstance(v, list) else v for pid, v in j[k].items()}
        out["judge"] = j
    return out
