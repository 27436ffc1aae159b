"""`cai label`: a pairs file labelled by the judge (cai.judge), resumable by id, with its summary.

`summarize` turns labelled rows into the numbers a user needs before trusting the labels:
position consistency, the mean P(first option), the mean margin, and agreement with prior human
labels with a 95% Wilson interval, overall and per principle, plus plain warnings when the judge
is no better than chance, than the "pick the shorter answer" rule, or than its own position bias.
`run_label` writes the labelled rows (the judge's label in place, the old one kept as
``label.prior``), applies a calibration map when given one, re-checks every principle with
``--recheck``, and writes ``<out>.summary.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cai.chunks import chunks_in_flight, run_chunks
from cai.configs import LabelConfig
from cai.errors import InputError
from cai.fmt import pct as _pct
from cai.judge import (
    OPTIONS,
    VERDICT_MAX_NEW_TOKENS,
    judge_pairs,
    recheck_pairs,
    recheck_params,
    recheck_side,
)
from cai.recheck import regressed
from cai.recheck import stats as recheck_stats
from cai.recheck import summary_lines as recheck_lines
from cai.records import response_text, write_json
from cai.stats import agrees, rate
from cai.stats import mean as _mean

LOW_CONSISTENCY = 0.6  # below this, most pairs get a winner that depends on where it was shown
STRONG_POSITION_BIAS = 0.15  # |mean P(first option) - 0.5| above this is called out
FEW_HUMAN_LABELS = 30
SHORTER_RULE_PUBLISHED = 0.553  # "pick the shorter answer" on HH harmless-base test (docs/judge.md)


# ============================================================================ summary statistics


def _human_prior(label: dict) -> float | None:
    """p_chosen of the nearest human label under label.prior (relabelling nests priors)."""
    prior = label.get("prior") if isinstance(label, dict) else None
    while isinstance(prior, dict):
        if prior.get("source") == "human" and prior.get("p_chosen") is not None:
            return float(prior["p_chosen"])
        prior = prior.get("prior")
    return None


def summarize(rows: list[dict]) -> dict:
    """Summary statistics of labelled rows (pure: no files, no model).

    rows              every row given
    judged            rows whose label has judge.orders
    position_consistency  share of judged rows where both orders prefer the same response
    mean_p_first      mean probability given to whichever response was shown first
    mean_abs_margin   mean |p_chosen - 0.5| (how decided the labels are)
    human             agreement with human priors (label.prior.source == "human"), 95% Wilson
                      interval, each order alone, and the "pick the shorter answer" rule on the
                      same pairs; judge ties count one half
    per_principle     the same per principle (from judge.by_principle)
    unparsed          verdicts that named no option (scored 0.5)
    warnings          plain sentences for a weak judge
    """
    judged, consistent, p_first, margins = 0, 0, [], []
    agree, agree_o = [], ([], [])
    shorter = []
    per: dict[str, dict[str, list]] = {}
    unparsed = unparsed_rows = 0
    for r in rows:
        label = r.get("label") or {}
        judge = label.get("judge") or {}
        orders = judge.get("orders")
        if not (isinstance(orders, list) and len(orders) == 2 and None not in orders):
            continue
        judged += 1
        o0, o1 = float(orders[0]), float(orders[1])
        p = label.get("p_chosen")
        p = (o0 + o1) / 2 if p is None else float(p)
        consistent += (o0 - 0.5) * (o1 - 0.5) > 0
        p_first.append((o0 + (1.0 - o1)) / 2)  # order 0: chosen first; order 1: rejected first
        margins.append(abs(p - 0.5))
        u = int(judge.get("unparsed") or 0)
        unparsed += u
        unparsed_rows += u > 0
        human = _human_prior(label)
        if human is not None and human == 0.5:
            human = None  # a human tie has no side to agree with
        for pid, po in (judge.get("by_principle") or {}).items():
            d = per.setdefault(pid, {"agree": [], "consistent": []})
            d["consistent"].append(float((po[0] - 0.5) * (po[1] - 0.5) > 0))
            if human is not None:
                d["agree"].append(agrees((po[0] + po[1]) / 2, human))
        if human is None:
            continue
        agree.append(agrees(p, human))
        agree_o[0].append(agrees(o0, human))
        agree_o[1].append(agrees(o1, human))
        lc, lr = len(response_text(r.get("chosen") or [])), len(response_text(r.get("rejected") or []))
        # the shorter response is `chosen` when lc < lr; a human p_chosen > 0.5 picks chosen
        shorter.append(0.5 if lc == lr else float((lc < lr) == (human > 0.5)))

    out: dict = {
        "rows": len(rows),
        "judged": judged,
        "position_consistency": round(consistent / judged, 4) if judged else None,
        "mean_p_first": round(_mean(p_first), 4) if judged else None,
        "mean_abs_margin": round(_mean(margins), 4) if judged else None,
        "unparsed": unparsed,
        "unparsed_rows": unparsed_rows,
        "human": None,
        "per_principle": {},
    }
    if agree:
        h = rate(agree)
        h["ties"] = sum(1 for a in agree if a == 0.5)
        h["agreement_by_order"] = [rate(agree_o[0])["agreement"], rate(agree_o[1])["agreement"]]
        h["shorter_rule"] = round(_mean(shorter), 4)
        out["human"] = h
    for pid, d in sorted(per.items()):
        entry = {"rows": len(d["consistent"]), "position_consistency": round(_mean(d["consistent"]), 4)}
        if d["agree"]:
            entry.update(rate(d["agree"]))
        out["per_principle"][pid] = entry
    out["warnings"] = _warnings(out)
    return out


def _warnings(s: dict) -> list[str]:
    w = []
    h = s.get("human")
    if h:
        a, (lo, hi), n = h["agreement"], h["ci95"], h["n"]
        if hi < 0.5:
            w.append(
                f"agreement with humans ({_pct(a)}, 95% CI {_pct(lo)}–{_pct(hi)}) is BELOW chance: "
                "the judge tends to prefer the response humans rejected; do not train on these labels"
            )
        elif lo <= 0.5:
            w.append(
                f"agreement with humans ({_pct(a)}, 95% CI {_pct(lo)}–{_pct(hi)}, n={n}) is within noise of "
                "chance (50%): these labels carry little or no signal; use a stronger --model"
            )
        if a < h["shorter_rule"]:
            w.append(
                f"agreement with humans ({_pct(a)}) is below the 'pick the shorter answer' rule on the same "
                f"pairs ({_pct(h['shorter_rule'])}; "
                f"{_pct(SHORTER_RULE_PUBLISHED)} on the HH harmless test set)"
            )
        if n < FEW_HUMAN_LABELS:
            w.append(
                f"only {n} pairs carry human labels: the agreement interval is wide; "
                "label more pairs to judge the judge"
            )
    c = s.get("position_consistency")
    if c is not None and c < LOW_CONSISTENCY:
        w.append(
            f"low position consistency ({_pct(c)}): for most pairs the winner depends on which response is "
            "shown first, not on what it says; averaging both orders hides this bias but leaves weak labels"
        )
    pf = s.get("mean_p_first")
    if pf is not None and abs(pf - 0.5) > STRONG_POSITION_BIAS:
        w.append(
            f"strong position bias: the response shown {'first' if pf > 0.5 else 'second'} gets "
            f"{_pct(max(pf, 1 - pf))} on average; one order alone would be mostly position, not content"
        )
    if s.get("unparsed"):
        w.append(
            f"{s['unparsed']} verdicts in {s['unparsed_rows']} rows named no option and were scored 0.5; "
            "their raw text is in label.judge.raw"
        )
    return w


def format_summary(s: dict) -> list[str]:
    """The summary as the lines `cai label` prints."""
    if not s.get("judged"):
        return [f"rows: {s.get('rows', 0)}, none with judge labels"]
    lines = [
        f"rows: {s['rows']}   position consistency: {_pct(s['position_consistency'])}   "
        f"mean P(first option): {s['mean_p_first']:.3f}   mean |p-0.5|: {s['mean_abs_margin']:.3f}"
    ]
    h = s.get("human")
    if h:
        lines.append(
            f"agreement with humans: {_pct(h['agreement'])} "
            f"(95% CI {_pct(h['ci95'][0])}–{_pct(h['ci95'][1])}, n={h['n']}; "
            f"one order alone {_pct(h['agreement_by_order'][0])} / {_pct(h['agreement_by_order'][1])}; "
            f"'pick the shorter' {_pct(h['shorter_rule'])})"
        )
        per = {k: v for k, v in s.get("per_principle", {}).items() if v.get("n")}
        if len(per) > 1:
            lines.append(
                "per principle: "
                + ", ".join(
                    f"{k} {_pct(v['agreement'])} [{_pct(v['ci95'][0])}–{_pct(v['ci95'][1])}] n={v['n']}"
                    for k, v in per.items()
                )
            )
    else:
        lines.append("agreement with humans: n/a (the input carries no human labels)")
    lines += [f"warning: {x}" for x in s.get("warnings", [])]
    return lines


# ============================================================================ `cai label`


@dataclass
class LabelSummary:
    out: str
    summary_path: str
    labelled: int = 0  # pairs judged by this run
    resumed: int = 0  # pairs already in the output (skipped)
    skipped: int = 0  # bad input rows skipped with --skip-bad
    duplicates: int = 0  # repeated ids in the input (first kept)
    seconds: float = 0.0  # judging time (model loading excluded)
    pairs_per_s: float = 0.0
    stats: dict = field(default_factory=dict)  # summarize() over the output rows of this input
    skipped_lines: list = field(default_factory=list)  # (line, message) for the first skips
    truncated: int = 0  # judge prompts cut to fit the model's input window
    recheck: dict | None = None  # cai.recheck.stats over the output rows of this input (--recheck)

    def line(self) -> str:
        parts = [
            f"labelled {self.labelled} pairs"
            + (f" in {self.seconds:.1f} s ({self.pairs_per_s:.2f} pairs/s)" if self.labelled else "")
        ]
        if self.resumed:
            parts.append(f"{self.resumed} already done")
        if self.skipped:
            parts.append(f"{self.skipped} bad rows skipped")
        if self.truncated:
            parts.append(f"{self.truncated} prompts cut to fit the model's input window")
        return ", ".join(parts) + f" -> {self.out}"

    def lines(self) -> list[str]:
        out = [self.line()]
        for n, msg in self.skipped_lines[:5]:
            out.append(f"skipped: {msg}")
        if self.skipped > 5:
            out.append(f"skipped: ... and {self.skipped - 5} more")
        out += format_summary(self.stats)
        out += recheck_lines(self.recheck)
        out.append(f"summary: {self.summary_path}")
        return out


def summary_path(out) -> Path:
    """<out-stem>.summary.json beside the output (labelled.jsonl -> labelled.summary.json)."""
    out = Path(out)
    name = out.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return out.with_name(name + ".summary.json")


def _output_row(row: dict, label: dict, meta: dict) -> dict:
    """Input orientation kept; the judge's label replaces the old one, which moves to label.prior."""
    label = dict(label, prior=row.get("label"))
    m = dict(meta)
    if row.get("meta"):
        m["prior"] = row["meta"]
    head = {
        "id": row["id"],
        "prompt": row["prompt"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "label": label,
    }
    rest = {k: v for k, v in row.items() if k not in head and k != "meta"}
    return {**head, **rest, "meta": m}


def run_label(cfg: LabelConfig) -> LabelSummary:
    """Label a pairs file with the judge; resumable by id. Returns the run's summary."""
    from cai.constitution import load_constitution
    from cai.guard import check_output, claim_output
    from cai.options import check_config

    check_config(cfg)
    principles = cfg.principles or None
    if principles is not None and principles < 0:
        raise InputError(f"--principles must be a positive number or 'all', not {principles}")
    lo, hi = cfg.clamp
    if not (0.0 <= lo <= 0.5 <= hi <= 1.0):
        raise InputError(f"--clamp {lo} {hi}: need 0 <= low <= 0.5 <= high <= 1, e.g. --clamp 0.4 0.6")
    const = load_constitution(cfg.constitution)
    calib = None
    if cfg.calibration:
        from cai.calibration import load

        calib = load(cfg.calibration)
    inputs = [cfg.pairs, *(Path(const.path) / f for f in const.files), cfg.calibration]
    check_output(summary_path(cfg.out), inputs, option="--out's summary file")
    from cai.backends import resolve_config

    cfg = resolve_config(cfg)  # the engine --backend stands for here, before anything loads
    if cfg.backend == "hf":
        from cai.models import check_model, resolve_model

        check_model(resolve_model(cfg.model)[0])  # weights whole, tokenizer fits: before any work
    with claim_output(cfg.out, inputs):
        return _label(cfg, const, principles, lo, hi, calib)


def calibrated(label: dict, calib: dict) -> dict:
    """The judge's label with the calibration map applied: ``p_chosen`` calibrated, the judge's
    own probability kept as ``judge.p_chosen`` (with the map's method and file hash)."""
    from cai.calibration import apply

    raw = label["p_chosen"]
    judge = dict(
        label["judge"],
        p_chosen=raw,
        calibration={"method": calib["map"]["method"], "sha256": calib["sha256"]},
    )
    return dict(label, p_chosen=round(float(apply(calib["map"], raw)), 6), judge=judge)


def _label(
    cfg: LabelConfig, const, principles, lo: float, hi: float, calib: dict | None = None
) -> LabelSummary:
    """The label stage once its inputs are checked and its output claimed: read the pairs, check
    a resumed file's settings, judge what is left chunk by chunk, write the summary file."""
    from cai.records import read_pairs
    from cai.rowwriter import RowWriter, check_resume_meta

    read_stats: dict = {}
    rows = read_pairs(cfg.pairs, limit=cfg.limit, skip_bad=cfg.skip_bad, stats=read_stats)
    params = _params(cfg, const, principles, lo, hi, calib)
    meta = _meta(cfg, const, params)
    writer = RowWriter(cfg.out, overwrite=cfg.overwrite)
    check_resume_meta(writer, meta, keys=("constitution", "seed", "params"))  # before loading a model
    todo = [r for r in rows if r["id"] not in writer.done]
    s = LabelSummary(
        out=str(cfg.out),
        summary_path=str(summary_path(cfg.out)),
        resumed=len(rows) - len(todo),
        skipped=len(read_stats.get("skipped", [])),
        duplicates=read_stats.get("duplicates", 0),
        skipped_lines=list(read_stats.get("skipped", [])),
    )
    if todo:
        _judge_rows(cfg, const, principles, (lo, hi), calib, meta, writer, todo, len(rows), s)
    _write_summary(cfg, const, rows, params, calib, s)
    return s


def _params(cfg: LabelConfig, const, principles, lo: float, hi: float, calib: dict | None) -> dict:
    """The settings a labelled file records (and a resume must match). A calibration map is
    checked against them here, before any model loads."""
    from cai.records import file_sha256

    # verdict_max_new_tokens only matters for backends without log-probs; always recorded so a
    # resume can be checked before any model is loaded
    params = {
        "principles": principles or "all",
        "cot": cfg.cot,
        "options": list(OPTIONS),
        "verdict_max_new_tokens": VERDICT_MAX_NEW_TOKENS,
    }
    if cfg.cot:
        params.update(clamp=[lo, hi], max_new_tokens=cfg.max_new_tokens)
    if cfg.recheck:  # only when on, so files made before the option existed still resume
        params["recheck"] = recheck_params(const, cfg.recheck_margin)
    if calib is not None:
        from cai.calibration import check_judge, judge_signature

        calib["sha256"] = file_sha256(calib["_path"])
        # the model is checked once it is loaded (_judge_rows), before any row is written
        unloaded = judge_signature({"model": "(not loaded)", "params": params})
        check_judge(calib, calib["_path"], constitution=_constitution(const), signature=unloaded, model=False)
        params["calibration"] = calib["sha256"]
    return params


def _constitution(const) -> dict:
    return {"name": const.name, "sha256": const.sha256}


def _meta(cfg: LabelConfig, const, params: dict) -> dict:
    from cai import __version__
    from cai.records import file_sha256

    return {
        "constitution": _constitution(const),
        "seed": cfg.seed,
        "params": params,
        "version": __version__,
        "pairs": {"path": str(cfg.pairs), "sha256": file_sha256(cfg.pairs)},
    }


def _judge_rows(cfg: LabelConfig, const, principles, clamp, calib, meta, writer, todo, total, s) -> None:
    """Load the judge, check the resumed file and the calibration map against it, and label
    ``todo`` in chunks (side by side on a server), each chunk's rows written whole."""
    from tqdm.auto import tqdm

    from cai.backends import load_backend, runtime
    from cai.backends.base import note_retries, warn_truncation
    from cai.models import fingerprint
    from cai.rowwriter import check_resume_meta

    backend = load_backend(cfg.backend, cfg.model, **cfg.backend_options)
    meta = {
        "model": backend.model_id,
        "model_sha256": fingerprint(getattr(backend, "model_path", None) or ""),
        "backend": backend.name,
        **meta,
        "runtime": runtime(backend),
    }
    check_resume_meta(writer, meta)
    if calib is not None:
        from cai.calibration import check_judge, judge_signature

        check_judge(calib, calib["_path"], constitution=_constitution(const), signature=judge_signature(meta))
    bar = tqdm(total=total, initial=s.resumed, unit="pair", desc="label", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    workers = chunks_in_flight(backend)
    # on a server, a chunk's judge requests (2 orders x K principles per pair) fill --concurrency
    per_pair = 2 * (principles or len(const.principles))
    size = cfg.chunk_size or (max(16, -(-backend.concurrency // per_pair)) if workers > 1 else 16)

    def work(chunk):
        labels = judge_pairs(
            backend,
            const,
            chunk,
            principles=principles,
            cot=cfg.cot,
            clamp=clamp,
            seed=cfg.seed,
            progress=bar,
            max_new_tokens=cfg.max_new_tokens,
        )
        if cfg.recheck:
            chunk = _rechecked(backend, const, chunk, cfg)
        if calib is not None:
            labels = [calibrated(lab, calib) for lab in labels]
        return [_output_row(r, lab, meta) for r, lab in zip(chunk, labels)]

    def write_chunk(chunk, out_rows):
        writer.write_many(out_rows)
        s.labelled += len(out_rows)
        s.truncated = warn_truncation(backend, s.truncated)

    try:
        with writer:
            chunks = [todo[k : k + size] for k in range(0, len(todo), size)]
            run_chunks(chunks, work, write_chunk, workers=workers, cancel=getattr(backend, "cancel", None))
    finally:
        bar.close()
        s.seconds = time.perf_counter() - t0
        s.pairs_per_s = s.labelled / s.seconds if s.seconds > 0 else 0.0
    note_retries(backend)


def _write_summary(cfg: LabelConfig, const, rows, params: dict, calib: dict | None, s: LabelSummary) -> None:
    """The run's summary (the agreement, position and length numbers of every row of this input
    in the output, resumed ones included) into ``s`` and the summary file."""
    from cai.records import read_rows

    ids = {r["id"] for r in rows}
    done = [r for r in read_rows(cfg.out) if str(r.get("id")) in ids] if Path(cfg.out).exists() else []
    s.stats = summarize(done)
    if cfg.recheck:
        s.recheck = recheck_stats(done)
    calibration = None
    if calib:
        calibration = {"path": calib["_path"], "sha256": calib["sha256"], "method": calib["map"]["method"]}
    run = {
        "pairs": str(cfg.pairs),
        "out": str(cfg.out),
        "labelled": s.labelled,
        "resumed": s.resumed,
        "skipped": s.skipped,
        "duplicates": s.duplicates,
        "seconds": round(s.seconds, 2),
        "pairs_per_s": round(s.pairs_per_s, 4),
        "params": params,
        "seed": cfg.seed,
        "constitution": _constitution(const),
        "calibration": calibration,
    }
    write_json(
        Path(s.summary_path), {**s.stats, "run": run, **({"recheck": s.recheck} if cfg.recheck else {})}
    )


def _rechecked(backend, const, chunk: list[dict], cfg: LabelConfig) -> list[dict]:
    """The chunk's rows with trace.recheck / regressed / recheck_side: each pair under every
    principle (chosen vs rejected; the revision as `final` in a `cai generate` row)."""
    sides = [recheck_side(r) for r in chunk]
    items = [
        (r["prompt"], response_text(r[side]), response_text(r["rejected" if side == "chosen" else "chosen"]))
        for r, side in zip(chunk, sides)
    ]
    out = []
    for r, side, res in zip(chunk, sides, recheck_pairs(backend, const, items, seed=cfg.seed)):
        trace = dict(r.get("trace") or {}, recheck=res, regressed=regressed(res, cfg.recheck_margin))
        out.append(dict(r, trace=dict(trace, recheck_side=side)))
    return out
