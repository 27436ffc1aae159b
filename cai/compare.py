"""`cai compare`: the whole human-vs-AI label study in one resumable, cached command.

    human train pairs ──strip labels──> judge (AI labels) ──> AI-label RM ──┐
            └──────────────────────────────────────────────> human-label RM ┼─> eval on test pairs
    optional `cai generate` revision pairs ───────────────> revision RM ───┘    (+ label agreement)

Every step runs through the content-keyed cache in cai.steps, so a rerun after a crash, or with
one setting changed, redoes only what changed; the up-front cost estimate is cai.estimate's.
The reward models are trained from one ``TrainConfig`` template (``cfg.train``) and evaluated
with one ``EvalConfig`` template (``cfg.eval``): an option added to either reaches the study
without an edit here.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from cai.configs import CompareConfig
from cai.errors import InputError
from cai.estimate import estimate, estimate_lines
from cai.evaluate import evaluate, rm_provenance, rm_scorer
from cai.fmt import duration
from cai.fmt import pct as _pct
from cai.pairset import load_pairset
from cai.records import file_sha256, read_pairs, read_rows, write_json, write_jsonl
from cai.steps import Steps
from cai.verdicts import annotate

WITHHELD = {
    "p_chosen": 0.5,
    "source": "withheld",
}  # what the judge's input carries instead of the human label
NAMES = {"human": "rm-human", "ai": "rm-ai", "revision": "rm-revision"}


def _log(msg: str):
    print(f"cai compare: {msg}", file=sys.stderr, flush=True)


def _prepare(cfg: CompareConfig, d: Path) -> dict:
    """The training pairs twice: as they are (human labels) and as the judge will see them.

    The judge must not see the human label. In a pairs file the label is also in the
    *orientation* (chosen = the human pick), so each row is swapped by a seeded coin flip and
    its label replaced by WITHHELD; the swap is undone after judging.
    """
    stats: dict = {}
    rows = read_pairs(cfg.human_train, limit=cfg.limit, skip_bad=cfg.skip_bad, stats=stats, need_label=True)
    rng = random.Random(cfg.seed)
    human, judge, swaps = [], [], {}
    for r in rows:
        human.append({k: r[k] for k in ("id", "prompt", "chosen", "rejected", "label")})
        swap = rng.random() < 0.5
        swaps[r["id"]] = swap
        judge.append(
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "chosen": r["rejected"] if swap else r["chosen"],
                "rejected": r["chosen"] if swap else r["rejected"],
                "label": dict(WITHHELD),
            }
        )
    write_jsonl(d / "human.jsonl", human)
    write_jsonl(d / "judge-input.jsonl", judge)
    write_json(d / "swaps.json", swaps)
    skipped = stats.get("skipped", [])
    return {
        "n": len(rows),
        "skipped": len(skipped),
        "first_skipped": skipped[0][1] if skipped else None,
        "duplicates": stats.get("duplicates", 0),
    }


def _judge(cfg: CompareConfig, data_dir: Path, d: Path) -> dict:
    """AI-label the label-free pairs (resumable: cai.feedback's run_label picks up by id)."""
    from cai.configs import LabelConfig
    from cai.feedback import run_label

    lc = LabelConfig(
        pairs=str(data_dir / "judge-input.jsonl"),
        constitution=cfg.constitution,
        out=str(d / "labelled.jsonl"),
        model=cfg.model,
        backend=cfg.backend,
        backend_options=dict(cfg.backend_options),
        principles=cfg.principles or None,
        cot=cfg.cot,
        seed=cfg.seed,
    )
    summary = run_label(lc)
    _free_accelerator()  # the reward models train next, in this process
    return _align(data_dir, d, summary)


def _free_accelerator():
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _align(data_dir: Path, d: Path, summary) -> dict:
    """Undo the swaps and write the two training files with the same ids in the same order:
    train-human.jsonl (human labels) and train-ai.jsonl (judge labels, human label as prior)."""
    from cai.judge import flip_label

    human = read_rows(data_dir / "human.jsonl")
    swaps = json.loads((data_dir / "swaps.json").read_text())
    labelled = {str(r["id"]): r for r in read_rows(d / "labelled.jsonl")}
    h_out, a_out, missing, null = [], [], 0, 0
    for h in human:
        lab = labelled.get(h["id"])
        if lab is None:
            missing += 1
            continue
        label = dict(lab.get("label") or {})
        p = label.get("p_chosen")
        if p is None:  # the judge's output could not be read: counted, kept out of both files
            null += 1
            continue
        if swaps[h["id"]]:  # the judged row's chosen is our rejected: the same judgement, reoriented
            label = flip_label(label)
            p = label["p_chosen"]
        label.update(p_chosen=p, source="ai", prior=h["label"], swapped_for_judge=bool(swaps[h["id"]]))
        h_out.append(h)
        a_out.append(
            {
                **h,
                "label": label,
                "meta": lab.get("meta"),
                **({"trace": lab["trace"]} if "trace" in lab else {}),
            }
        )
    if not a_out:
        raise InputError(
            "the judge produced no usable label; see the labelling summary", d / "labelled.jsonl"
        )
    write_jsonl(d / "train-human.jsonl", h_out)
    write_jsonl(d / "train-ai.jsonl", a_out)
    from cai.feedback import summarize

    run = {k: getattr(summary, k, None) for k in ("labelled", "resumed", "seconds", "pairs_per_s")}
    # cai label's own summary, now against the real human labels (they are the priors of train-ai.jsonl)
    stats = summarize(a_out)
    write_json(d / "train-ai.summary.json", stats)
    return {
        "n": len(a_out),
        "missing": missing,
        "null_labels": null,
        "run": run,
        "warnings": stats.get("warnings", []),
        "per_principle": stats.get("per_principle", {}),
    }


def _train(cfg: CompareConfig, pairs: Path | str, limit, d: Path) -> dict:
    from cai.artifact import checkpoints
    from cai.train import train_reward_model

    out = d / "model"
    resume = out.exists() and bool(checkpoints(out))
    if out.exists() and not resume:
        shutil.rmtree(out)  # killed before its first checkpoint: nothing worth keeping
    tc = dataclasses.replace(_train_config(cfg, pairs, limit, out), resume=resume)
    return train_reward_model(tc, progress=True)


def _train_config(cfg: CompareConfig, pairs, limit, out):
    """One RM's TrainConfig: the study's template with this RM's data filled in."""
    return dataclasses.replace(
        cfg.train, pairs=str(pairs), out=str(out), limit=limit, seed=cfg.seed, skip_bad=cfg.skip_bad
    )


def _train_key(cfg: CompareConfig, pairs, limit) -> dict:
    """The step key of a training run: the data's content and every setting but paths/resume."""
    tc = asdict(_train_config(cfg, pairs, limit, "-"))
    for k in ("pairs", "out", "resume"):
        tc.pop(k)
    base = tc.get("base")
    if base and Path(base).expanduser().exists():  # a local folder: key on its config, not its path
        tc["base"] = {"path": base, "config_sha256": file_sha256(Path(base).expanduser() / "config.json")}
    return {"pairs_sha256": file_sha256(pairs), "config": tc}


# ============================================================================ the study


def run_compare(cfg: CompareConfig) -> dict:
    from cai.guard import claim_output
    from cai.options import check_config

    for c in (cfg, cfg.train, cfg.eval):
        check_config(c)
    inputs = [cfg.human_train, cfg.test, cfg.generated_pairs, cfg.eval.shift_pairs]
    with claim_output(cfg.out, inputs=inputs, kind="folder", marker=("steps", "study folder")):
        return _run_compare(cfg)


def _run_compare(cfg: CompareConfig) -> dict:
    """The study's steps, each cached by content (cai.steps): data, label, train ×2–3, eval;
    then the report."""
    from cai.report import write_report

    out = Path(cfg.out)
    constitution, test, shift, train_preview, gen_n = _load_inputs(cfg)
    n_principles = min(cfg.principles or len(constitution.principles), len(constitution.principles))
    est = _estimate(cfg, train_preview, test, gen_n, n_principles)
    if cfg.dry_run:
        return {"estimate": est, "dry_run": True}

    plan = (
        ["data", "label", "train-human", "train-ai"]
        + (["train-revision"] if cfg.generated_pairs else [])
        + ["eval"]
    )
    steps = Steps(out, plan, est["seconds"])
    judge_desc = _judge_desc(cfg)
    data_dir, data = steps.run(
        "data",
        {"human_train_sha256": file_sha256(cfg.human_train), "limit": cfg.limit, "seed": cfg.seed},
        lambda d: _prepare(cfg, d),
    )
    if data["skipped"]:
        _log(f"{data['skipped']} malformed training rows skipped (first: {data['first_skipped']})")
    label_inputs = {
        "judge_input_sha256": file_sha256(data_dir / "judge-input.jsonl"),
        "constitution_sha256": constitution.sha256,
        "judge": judge_desc,
        "backend_options": {
            k: v for k, v in cfg.backend_options.items() if k not in ("batch_size", "concurrency")
        },
        "seed": cfg.seed,
    }
    label_dir, lab = steps.run("label", label_inputs, lambda d: _judge(cfg, data_dir, d))
    ai_rows = read_rows(label_dir / "train-ai.jsonl")
    rm_dirs, train_keys = _train_models(cfg, steps, label_dir)
    eval_dir = _eval_models(cfg, steps, rm_dirs, train_keys, test, shift)

    metrics = annotate(json.loads((eval_dir / "metrics.full.json").read_text()))
    c_desc = f"{constitution.name} (sha256 {constitution.sha256[:12]})"
    prov = _provenance(cfg, lab, judge_desc, c_desc, n_principles, gen_n)
    for n, p in rm_dirs.items():  # provenance is words about paths: added here, outside the cached step
        metrics["models"][n]["source"] = {**rm_provenance(p), **prov[n]}

    from cai.feedback import summarize

    ag = summarize(ai_rows)  # `cai label`'s own summary: one measure of judge-human agreement
    metrics["study"] = _study_section(cfg, metrics, ag, lab, judge_desc, c_desc, est, steps)
    metrics["config"] = {k: v for k, v in asdict(cfg).items() if k != "backend_options"}
    metrics["rm_dirs"] = {n: str(p) for n, p in rm_dirs.items()}
    write_report(metrics, out)
    return metrics


def _load_inputs(cfg: CompareConfig):
    """Fail on a bad constitution, judge or base before any work; then the test (and shift)
    pairs, the training pairs and the number of generated pairs, as the estimate needs them."""
    from cai.constitution import load_constitution
    from cai.models import check_model, resolve_model, resolve_reward_base

    constitution = load_constitution(cfg.constitution)
    from cai.backends import resolve_backend

    judge = resolve_backend(
        cfg.backend, cfg.model, device=cfg.device, base_url=cfg.backend_options.get("base_url")
    )
    if judge == "hf":
        check_model(resolve_model(cfg.model)[0])
    check_model(resolve_reward_base(cfg.train.base)[0], "--base")
    test = load_pairset(cfg.test, cfg.test_limit if cfg.test_limit is not None else cfg.limit, cfg.skip_bad)
    shift = load_pairset(cfg.eval.shift_pairs, cfg.limit, cfg.skip_bad) if cfg.eval.shift_pairs else None
    train_preview = read_pairs(cfg.human_train, limit=cfg.limit, skip_bad=cfg.skip_bad, need_label=True)
    gen_n = (
        len(read_pairs(cfg.generated_pairs, limit=cfg.limit, skip_bad=cfg.skip_bad, need_label=True))
        if cfg.generated_pairs
        else 0
    )
    return constitution, test, shift, train_preview, gen_n


def _estimate(cfg: CompareConfig, train_preview: list[dict], test, gen_n: int, n_principles: int) -> dict:
    """The up-front cost estimate (cai.estimate), logged before any step runs."""
    test_chars = sum(
        len(json.dumps(r["prompt"])) + (len(test.pref_text(i)) + len(test.other_text(i))) / 2
        for i, r in enumerate(test.rows)
    ) / max(1, test.n)
    est = estimate(cfg, train_preview, test.n, test_chars, gen_n, n_principles)
    _log(f"{len(train_preview)} training pairs, {test.n} test pairs; up-front estimate:")
    for line in estimate_lines(est):
        _log("  " + line)
    return est


def _judge_desc(cfg: CompareConfig) -> dict:
    """The judge as the label step's cache key and the report name it."""
    judge_desc = {
        "model": cfg.model or "smollm2-135m-instruct (embedded default)",
        "backend": cfg.backend,
        "principles": cfg.principles,
        "cot": cfg.cot,
    }
    if cfg.model and Path(cfg.model).expanduser().exists():
        judge_desc["config_sha256"] = file_sha256(Path(cfg.model).expanduser() / "config.json")
    return judge_desc


def _train_models(cfg: CompareConfig, steps: Steps, label_dir: Path) -> tuple[dict, dict]:
    """One training step per reward model (human labels, AI labels, and the generated pairs
    when given); their folders and their steps' cache keys, by model name."""
    trains = {"human": (label_dir / "train-human.jsonl", None), "ai": (label_dir / "train-ai.jsonl", None)}
    if cfg.generated_pairs:
        trains["revision"] = (Path(cfg.generated_pairs), cfg.limit)
    rm_dirs, train_keys = {}, {}
    for kind, (pairs, limit) in trains.items():
        inputs = _train_key(cfg, pairs, limit)
        d, _ = steps.run(f"train-{kind}", inputs, lambda d, p=pairs, lim=limit: _train(cfg, p, lim, d))
        rm_dirs[NAMES[kind]] = d / "model"
        train_keys[NAMES[kind]] = steps.records[-1]["key"]
    return rm_dirs, train_keys


def _eval_models(cfg: CompareConfig, steps: Steps, rm_dirs: dict, train_keys: dict, test, shift) -> Path:
    """The eval step: every reward model on the test pairs (metrics.full.json in its folder)."""

    def do_eval(d: Path) -> dict:
        models = {
            n: rm_scorer(
                p,
                batch_size=cfg.eval.rm_batch_size,
                max_length=cfg.train.max_length,
                device=cfg.device,
                length_correct=cfg.eval.length_correct,
            )
            for n, p in rm_dirs.items()
        }
        m = evaluate(
            models,
            test,
            shift=shift,
            n_boot=cfg.eval.bootstrap,
            seed=cfg.seed,
            probes=cfg.eval.probes,
            probe_limit=cfg.eval.probe_limit or None,
        )
        write_json(d / "metrics.full.json", m)
        return {"file": str(d / "metrics.full.json")}

    eval_inputs = {
        "test_sha256": test.source["sha256"],
        "test_n": test.n,
        "models": train_keys,
        "shift_sha256": shift.source["sha256"] if shift else None,
        "bootstrap": cfg.eval.bootstrap,
        "seed": cfg.seed,
        "probes": cfg.eval.probes,
        "probe_limit": cfg.eval.probe_limit,
        "max_length": cfg.train.max_length,
        "length_correct": cfg.eval.length_correct,
    }
    eval_dir, _ = steps.run("eval", eval_inputs, do_eval)
    return eval_dir


def _provenance(cfg: CompareConfig, lab: dict, judge_desc: dict, c_desc: str, n_principles: int, gen_n: int):
    """Who produced each model's training labels, in words, for the report."""
    judge_txt = (
        f"AI judge {judge_desc['model']} ({cfg.backend}), constitution {c_desc}, "
        "both answer orders averaged, "
        f"{n_principles} principle(s) per pair" + (", chain of thought" if cfg.cot else "")
    )
    prov = {
        NAMES["human"]: {
            "labels_from": f"human annotators (the labels in {cfg.human_train})",
            "trained_on": f"{lab['n']} pairs of {cfg.human_train}",
        },
        NAMES["ai"]: {
            "labels_from": judge_txt,
            "trained_on": f"the same {lab['n']} pairs, human labels withheld from the judge",
        },
    }
    if cfg.generated_pairs:
        prov[NAMES["revision"]] = {
            "labels_from": f"`cai generate` pairs in {cfg.generated_pairs} "
            "(their own labels: revision over initial, or the judge's)",
            "trained_on": f"{gen_n} pairs of {cfg.generated_pairs}",
        }
    return prov


def _study_section(cfg, metrics, ag, lab, judge_desc, c_desc, est, steps) -> dict:
    models = metrics["models"]
    h, a = models[NAMES["human"]], models[NAMES["ai"]]
    h_ag = ag.get("human") or {"n": 0, "agreement": None, "ci95": [None, None]}
    agv, (lo, hi) = h_ag["agreement"], h_ag["ci95"] or (None, None)
    notes = [w[0].upper() + w[1:] + "." for w in ag.get("warnings", [])]
    if lab.get("null_labels"):
        notes.append(
            f"{lab['null_labels']} pairs got no usable AI label and were left out of both training sets."
        )
    headlines = [
        f"On {h['accuracy']['n']} test pairs: {NAMES['ai']} (AI labels) {_pct(a['accuracy']['value'])} "
        f"(95% CI {_pct(a['accuracy']['ci'][0])}–{_pct(a['accuracy']['ci'][1])}) "
        f"vs {NAMES['human']} (human labels) {_pct(h['accuracy']['value'])} "
        f"(95% CI {_pct(h['accuracy']['ci'][0])}–{_pct(h['accuracy']['ci'][1])}).",
        f"AI labels agreed with the human labels on {_pct(agv)} (95% CI {_pct(lo)}–{_pct(hi)}) of the "
        f"{h_ag['n']} training pairs; judge: {judge_desc['model']}, constitution {c_desc}.",
    ]
    total = sum(r["seconds"] or 0 for r in steps.records if not r["cached"])
    return {
        "description": (
            "Two reward models with the same base "
            f"({cfg.train.base or 'all-MiniLM-L6-v2 (embedded default)'}), "
            f"the same {lab['n']} training pairs from `{cfg.human_train}` and the same budget "
            f"({cfg.train.epochs:g} epoch(s), {cfg.train.labels} labels, seed {cfg.seed}); "
            "they differ only in who labelled the pairs. The judge saw each pair with its human label "
            "removed and its order shuffled. Test pairs carry human labels."
            + (f" A third model trains on `{cfg.generated_pairs}`." if cfg.generated_pairs else "")
        ),
        "headlines": headlines,
        "labels": {
            "judge": f"{judge_desc['model']} ({cfg.backend})",
            "constitution": c_desc,
            **ag,
            "null_labels": lab.get("null_labels", 0),
            "notes": notes,
        },
        "steps": steps.records,
        "estimate": est,
        "estimate_note": (
            f"Estimated up front from {est['how']}. This run took {duration(total)} for the steps it ran "
            f"(cached steps cost nothing)."
        ),
        "command": cfg.command,
    }


def summary_line(metrics: dict, out) -> str:
    if metrics.get("dry_run"):
        return "cai compare: dry run; nothing was computed"
    m = metrics["models"]
    parts = ", ".join(f"{n} {_pct(v['accuracy']['value'])}" for n, v in m.items())
    ag = (metrics["study"]["labels"].get("human") or {}).get("agreement")
    return f"cai compare: {parts}; AI-human label agreement {_pct(ag)} -> {out}/report.html"


def command_line() -> str:
    return "cai " + " ".join(shlex.quote(a) for a in sys.argv[1:])
