"""`cai compare`: the whole human-vs-AI label study in one resumable, cached command.

    human train pairs ──strip labels──> judge (AI labels) ──> AI-label RM ──┐
            └──────────────────────────────────────────────> human-label RM ┼─> eval on test pairs
    optional `cai generate` revision pairs ───────────────> revision RM ───┘    (+ label agreement)

Every step's output lives in ``<out>/steps/<step>-<key>/`` where the key is a hash of the step's
inputs (file contents, not paths) and settings. A finished step writes ``step.json`` last; a rerun
finds it and skips the step. A step killed half-way has no ``step.json`` and is run again —
labelling resumes by id (cai.feedback's writer), training resumes from its last checkpoint — and
changing one setting changes only the keys downstream of it. Old step folders stay as a cache.
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cai.errors import InputError
from cai.evaluate import _pct, annotate, evaluate, load_pairset, mean_ci, rm_provenance, rm_scorer
from cai.records import file_sha256, read_pairs, read_rows, response_text, write_json, write_jsonl

STEP_VERSION = 1  # bump when a step's code changes what it writes: old caches are then ignored
WITHHELD = {
    "p_chosen": 0.5,
    "source": "withheld",
}  # what the judge's input carries instead of the human label
NAMES = {"human": "rm-human", "ai": "rm-ai", "revision": "rm-revision"}


@dataclass
class CompareConfig:
    human_train: str  # human-labelled training pairs (any pairs format; raw HH-RLHF works)
    test: str  # human-labelled test pairs
    constitution: str  # the judge's constitution folder
    out: str  # study folder: report + steps/ cache
    model: str | None = None  # judge model (default: the embedded SmolLM2-135M-Instruct)
    backend: str = "hf"
    backend_options: dict = field(default_factory=dict)
    base: str | None = None  # reward-model base, the same for every RM (default all-MiniLM-L6-v2)
    limit: int | None = None  # training pairs (and test pairs, unless test_limit)
    test_limit: int | None = None
    generated_pairs: str | None = None  # `cai generate` output: a third RM on revision pairs
    shift_pairs: str | None = None  # pairs from another source for the distribution-shift probe
    principles: int = 1  # principles the judge averages over per pair
    cot: bool = False
    labels: str = "soft"  # loss labels for every RM (human labels are p = 1 either way)
    epochs: float = 1.0
    lr: float = 5e-5  # reward-model peak learning rate (cai train's default)
    max_length: int | None = None
    train_batch_size: int = 16  # RM training pairs per step
    score_batch_size: int = 32  # sequences per forward pass when scoring
    seed: int = 0
    bootstrap: int = 2000
    probes: bool = True
    probe_limit: int | None = 200  # refusal/format probes on the first N test pairs
    device: str = "auto"  # reward-model training and scoring
    dry_run: bool = False  # print the estimate and stop
    command: str | None = None  # recorded in the report


def _key(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _log(msg: str):
    print(f"cai compare: {msg}", file=sys.stderr, flush=True)






# ============================================================================ the step cache


class Steps:
    """Runs named steps once per content key; prints progress over the whole plan."""

    def __init__(self, out: Path, plan: list[str], estimates: dict):
        self.root = out / "steps"
        self.plan, self.estimates = plan, estimates
        self.records: list[dict] = []

    def run(self, name: str, inputs: dict, fn) -> tuple[Path, dict]:
        key = _key({"step": name, "version": STEP_VERSION, **inputs})
        d = self.root / f"{name}-{key[:12]}"
        marker = d / "step.json"
        i = len(self.records) + 1
        est = self.estimates.get(name)
        if marker.exists():
            rec = json.loads(marker.read_text())
            if rec.get("key") == key:
                _log(f"[{i}/{len(self.plan)}] {name}: cached ({d})")
                self.records.append(
                    {
                        "name": name,
                        "key": key,
                        "dir": str(d),
                        "cached": True,
                        "estimate_s": est,
                        "seconds": rec.get("seconds"),
                    }
                )
                return d, rec["result"]
        resumed = d.exists()
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "inputs.json", {"step": name, "key": key, **inputs})
        _log(
            f"[{i}/{len(self.plan)}] {name}: {'resuming' if resumed else 'running'}"
            + (f" (estimate ~{_dur(est)})" if est else "")
            + f" -> {d}"
        )
        t0 = time.time()
        result = fn(d)
        secs = round(time.time() - t0, 1)
        write_json(
            marker,
            {
                "name": name,
                "key": key,
                "result": result,
                "seconds": secs,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )  # written last: the step is done
        self.records.append(
            {"name": name, "key": key, "dir": str(d), "cached": False, "estimate_s": est, "seconds": secs}
        )
        return d, result


def _dur(s) -> str:
    if s is None:
        return "unknown"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


# ============================================================================ steps


def _prepare(cfg: CompareConfig, d: Path) -> dict:
    """The training pairs twice: as they are (human labels) and as the judge will see them.

    The judge must not see the human label. In a pairs file the label is also in the
    *orientation* (chosen = the human pick), so each row is swapped by a seeded coin flip and
    its label replaced by WITHHELD; the swap is undone after judging.
    """
    stats: dict = {}
    rows = read_pairs(cfg.human_train, limit=cfg.limit, skip_bad=True, stats=stats)
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
    from cai.feedback import LabelConfig, run_label

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
    from cai.feedback import flip_label

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


def label_agreement(ai_rows: list[dict], n_boot: int, seed: int) -> dict:
    """Judge vs human on the same pairs: agreement (ties ½), position consistency, confidence,
    and how often the 'shorter answer' rule agrees with humans on the same pairs (for scale)."""
    agree, consistent, conf, shorter = [], [], [], []
    for r in ai_rows:
        p, ph = r["label"]["p_chosen"], r["label"]["prior"]["p_chosen"]
        if ph == 0.5:
            continue
        human_first = ph > 0.5
        agree.append(0.5 if p == 0.5 else float((p > 0.5) == human_first))
        conf.append(abs(p - 0.5))
        o = (r["label"].get("judge") or {}).get("orders")
        if isinstance(o, list) and len(o) == 2 and None not in o:
            consistent.append(float((o[0] - 0.5) * (o[1] - 0.5) > 0))
        lc, lr = len(response_text(r["chosen"])), len(response_text(r["rejected"]))
        shorter.append(0.5 if lc == lr else float((lc < lr) == human_first))
    return {
        "agreement": mean_ci(agree, n_boot, seed),
        "position_consistency": mean_ci(consistent, n_boot, seed + 1) if consistent else None,
        "mean_confidence": float(np.mean(conf)) if conf else None,
        "shorter_rule_agreement": mean_ci(shorter, n_boot, seed + 2),
    }


def _train(cfg: CompareConfig, pairs: Path | str, limit, d: Path) -> dict:
    from cai.reward import _checkpoints, train_reward_model

    out = d / "model"
    resume = out.exists() and bool(_checkpoints(out))
    if out.exists() and not resume:
        shutil.rmtree(out)  # killed before its first checkpoint: nothing worth keeping
    tc = _train_config(cfg, pairs, limit, out)
    tc.resume = resume
    return train_reward_model(tc, progress=True)


def _train_config(cfg: CompareConfig, pairs, limit, out):
    from cai.reward import TrainConfig

    return TrainConfig(
        pairs=str(pairs),
        out=str(out),
        base=cfg.base,
        labels=cfg.labels,
        epochs=cfg.epochs,
        lr=cfg.lr,
        max_length=cfg.max_length,
        limit=limit,
        batch_size=cfg.train_batch_size,
        seed=cfg.seed,
        device=cfg.device,
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


# ============================================================================ estimate


def _param_count(model_dir) -> int | None:
    """Exact parameter count from the safetensors headers (no weights are read)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if model_dir and Path(model_dir).is_dir() else []
    if not files:
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                n += int(np.prod(v["shape"]))
    return n


def _cached_speed(cache: Path, path: str, kind: str, device: str, seq_len: int, batch: int) -> float:
    """_probe_speed, remembered per (machine, model, shape) in the study folder: a rerun whose
    steps are all cached should not spend half a minute re-timing the same model."""
    import platform

    key = _key(
        [
            platform.node(),
            str(Path(path).resolve()) if Path(path).exists() else path,
            kind,
            device,
            seq_len,
            batch,
        ]
    )
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        known[key] = _probe_speed(path, kind, device, seq_len, batch)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, known)
    return known[key]


def _probe_speed(path: str, kind: str, device: str, seq_len: int, batch: int) -> float:
    """Forward tokens per second of a model on this machine, from a tiny timing probe:
    load it, run a warm-up batch of random tokens, then time one full batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from cai.models import pick_device, pick_dtype

    dev = pick_device(device)
    cls = AutoModelForCausalLM if kind == "judge" else AutoModelForSequenceClassification
    kw = {"num_labels": 1} if kind == "rm" else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(path, dtype=pick_dtype(dev), **kw).to(dev).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    ids = torch.randint(100, 1000, (batch, seq_len), device=dev)
    extra = {"logits_to_keep": 1} if kind == "judge" else {}
    with torch.inference_mode():
        model(input_ids=ids[:, : max(8, seq_len // 4)], **extra)  # warm-up, short
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        model(input_ids=ids, **extra)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
    return batch * seq_len / (time.time() - t0)


TRAIN_COST = 3.5  # a training token costs ~3x a forward one (backward ≈ 2 forwards) plus the optimizer
JUDGE_OVERHEAD_TOKENS = 150  # the compare template, the question and the chat template's markers


def estimate(
    cfg: CompareConfig, train: list[dict], test_n: int, test_chars: float, gen_n: int, n_principles: int = 1
) -> dict:
    """Tokens per step from the data (≈ characters / 4); seconds from a timing probe of each model
    on this machine (forward tokens/s on random tokens of the typical length)."""
    from cai.models import resolve_model, resolve_reward_base

    chars = [
        len(json.dumps(r["prompt"])) + len(response_text(r["chosen"])) + len(response_text(r["rejected"]))
        for r in train
    ]
    orders = 2 * n_principles
    judge_len = int(np.mean(chars) / 4 + JUDGE_OVERHEAD_TOKENS) if chars else 256
    judge_tokens = judge_len * len(train) * orders
    cap = cfg.max_length or 256
    resp = [
        min(cap, (len(json.dumps(r["prompt"])) + len(response_text(r[k]))) / 4)
        for r in train
        for k in ("chosen", "rejected")
    ]
    train_tokens = int(sum(resp) * cfg.epochs)
    gen_tokens = int(np.mean(resp) * 2 * gen_n * cfg.epochs) if resp else 0
    per_seq = min(cap, test_chars / 4)
    n_models = 3 if cfg.generated_pairs else 2
    probed = min(test_n, cfg.probe_limit or test_n) if cfg.probes else 0
    eval_tokens = int((2 * test_n + 4 * probed) * per_seq * n_models)
    est = {
        "tokens": {"judge": judge_tokens, "train_each": train_tokens, "eval": eval_tokens},
        "params": {},
        "tokens_per_s": {},
        "seconds": {},
    }
    s, speed, problems = est["seconds"], est["tokens_per_s"], []
    cache = Path(cfg.out) / "steps" / "speed.json"
    if cfg.backend == "hf":
        try:
            path = resolve_model(cfg.model)[0]
            est["params"]["judge"] = _param_count(path)
            speed["judge"] = _cached_speed(cache, path, "judge", cfg.device, min(judge_len, 1024), 1)
            s["label"] = judge_tokens / speed["judge"]
            if cfg.cot:  # decoding ~128 reasoning tokens per order is memory-bound: ~10x a prompt token
                s["label"] += len(train) * orders * 128 * 10 / speed["judge"]
        except Exception as e:  # an estimate must never stop the study
            problems.append(f"judge probe failed ({str(e).splitlines()[0][:80]})")
    try:
        path = resolve_reward_base(cfg.base)[0]
        est["params"]["reward_base"] = _param_count(path)
        rm_len = int(min(cap, max(32, np.mean(resp) if resp else 128)))
        speed["rm"] = _cached_speed(cache, path, "rm", cfg.device, rm_len, 8)
        s["train-human"] = s["train-ai"] = TRAIN_COST * train_tokens / speed["rm"]
        if cfg.generated_pairs:
            s["train-revision"] = TRAIN_COST * gen_tokens / speed["rm"]
        s["eval"] = eval_tokens / speed["rm"] + 5 * n_models  # + loading each model
    except Exception as e:
        problems.append(f"reward-model probe failed ({str(e).splitlines()[0][:80]})")
    est["total_s"] = sum(s.values()) if s else None
    how = (
        "a timing probe: each model's forward tokens/s measured on this machine (once per study folder) ("
        + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in speed.items())
        + f"), times the tokens each step needs (≈ characters / 4; a training token counts {TRAIN_COST}×)"
    )
    if cfg.backend != "hf":
        how += "; the judge runs on a server, so its time is not estimated (tokens only)"
    if problems:
        how += "; " + "; ".join(problems)
    est["how"] = how
    return est


def _estimate_lines(est: dict) -> list[str]:
    t, s = est["tokens"], est["seconds"]
    lines = [
        f"judge: ~{t['judge']:,} prompt tokens" + (f", ~{_dur(s.get('label'))}" if "label" in s else ""),
        f"reward models: ~{t['train_each']:,} training tokens each"
        + (f", ~{_dur(s.get('train-human'))} each" if "train-human" in s else ""),
        f"evaluation: ~{t['eval']:,} tokens" + (f", ~{_dur(s.get('eval'))}" if "eval" in s else ""),
        f"total ~{_dur(est['total_s'])} (estimated from {est['how']})",
    ]
    return lines


# ============================================================================ the study


def run_compare(cfg: CompareConfig) -> dict:
    from cai.constitution import load_constitution
    from cai.models import resolve_model, resolve_reward_base
    from cai.report import write_report

    out = Path(cfg.out)
    # fail on a bad constitution, judge or base before any work
    constitution = load_constitution(cfg.constitution)
    if cfg.backend == "hf":
        resolve_model(cfg.model)
    resolve_reward_base(cfg.base)
    test = load_pairset(cfg.test, cfg.test_limit if cfg.test_limit is not None else cfg.limit)
    shift = load_pairset(cfg.shift_pairs, cfg.limit) if cfg.shift_pairs else None
    train_preview = read_pairs(cfg.human_train, limit=cfg.limit, skip_bad=True)
    gen_n = len(read_pairs(cfg.generated_pairs, limit=cfg.limit, skip_bad=True)) if cfg.generated_pairs else 0
    test_chars = float(
        np.mean(
            [
                len(json.dumps(r["prompt"])) + (len(test.pref_text(i)) + len(test.other_text(i))) / 2
                for i, r in enumerate(test.rows)
            ]
        )
    )

    n_principles = min(cfg.principles or len(constitution.principles), len(constitution.principles))
    est = estimate(cfg, train_preview, test.n, test_chars, gen_n, n_principles)
    _log(f"{len(train_preview)} training pairs, {test.n} test pairs; up-front estimate:")
    for line in _estimate_lines(est):
        _log("  " + line)
    if cfg.dry_run:
        return {"estimate": est, "dry_run": True}

    plan = (
        ["data", "label", "train-human", "train-ai"]
        + (["train-revision"] if cfg.generated_pairs else [])
        + ["eval"]
    )
    steps = Steps(out, plan, est["seconds"])
    judge_desc = {
        "model": cfg.model or "smollm2-135m-instruct (embedded default)",
        "backend": cfg.backend,
        "principles": cfg.principles,
        "cot": cfg.cot,
    }
    if cfg.model and Path(cfg.model).expanduser().exists():
        judge_desc["config_sha256"] = file_sha256(Path(cfg.model).expanduser() / "config.json")

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
        "backend_options": {k: v for k, v in cfg.backend_options.items() if k not in ("batch_size",)},
        "seed": cfg.seed,
    }
    label_dir, lab = steps.run("label", label_inputs, lambda d: _judge(cfg, data_dir, d))
    ai_rows = read_rows(label_dir / "train-ai.jsonl")

    trains = {"human": (label_dir / "train-human.jsonl", None), "ai": (label_dir / "train-ai.jsonl", None)}
    if cfg.generated_pairs:
        trains["revision"] = (Path(cfg.generated_pairs), cfg.limit)
    rm_dirs, train_keys = {}, {}
    for kind, (pairs, limit) in trains.items():
        inputs = _train_key(cfg, pairs, limit)
        d, _ = steps.run(f"train-{kind}", inputs, lambda d, p=pairs, lim=limit: _train(cfg, p, lim, d))
        rm_dirs[NAMES[kind]] = d / "model"
        train_keys[NAMES[kind]] = steps.records[-1]["key"]

    # who produced each model's training labels, in words, for the report
    c_desc = f"{constitution.name} (sha256 {constitution.sha256[:12]})"
    judge_txt = (
        f"AI judge {judge_desc['model']} ({cfg.backend}), constitution {c_desc}, both answer orders averaged, "
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

    def do_eval(d: Path) -> dict:
        models = {
            n: rm_scorer(p, batch_size=cfg.score_batch_size, max_length=cfg.max_length, device=cfg.device)
            for n, p in rm_dirs.items()
        }
        m = evaluate(
            models,
            test,
            shift=shift,
            n_boot=cfg.bootstrap,
            seed=cfg.seed,
            probes=cfg.probes,
            probe_limit=cfg.probe_limit,
        )
        write_json(d / "metrics.full.json", m)
        return {"file": str(d / "metrics.full.json")}

    eval_inputs = {
        "test_sha256": test.source["sha256"],
        "test_n": test.n,
        "models": train_keys,
        "shift_sha256": shift.source["sha256"] if shift else None,
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
        "probes": cfg.probes,
        "probe_limit": cfg.probe_limit,
        "max_length": cfg.max_length,
    }
    eval_dir, _ = steps.run("eval", eval_inputs, do_eval)
    metrics = annotate(json.loads((eval_dir / "metrics.full.json").read_text()))
    for n, p in rm_dirs.items():  # provenance is words about paths: added here, outside the cached step
        metrics["models"][n]["source"] = {**rm_provenance(p), **prov[n]}

    ag = label_agreement(ai_rows, cfg.bootstrap, cfg.seed)
    metrics["study"] = _study_section(cfg, metrics, ag, lab, judge_desc, c_desc, est, steps)
    metrics["config"] = {k: v for k, v in asdict(cfg).items() if k != "backend_options"}
    metrics["rm_dirs"] = {n: str(p) for n, p in rm_dirs.items()}
    write_report(metrics, out)
    return metrics


def _study_section(cfg, metrics, ag, lab, judge_desc, c_desc, est, steps) -> dict:
    models = metrics["models"]
    h, a = models[NAMES["human"]], models[NAMES["ai"]]
    notes = []
    agv, (lo, hi) = ag["agreement"]["value"], ag["agreement"]["ci"]
    if lo is not None and lo <= 0.5 <= hi:
        notes.append(
            f"The judge's labels are within noise of coin flips: agreement with humans {_pct(agv)} "
            f"(95% CI {_pct(lo)}–{_pct(hi)})."
        )
    sh = ag["shorter_rule_agreement"]["value"]
    if sh is not None and agv is not None and agv <= sh:
        notes.append(
            f"The judge agrees with humans no more often than the 'pick the shorter answer' rule does on the "
            f"same pairs ({_pct(agv)} vs {_pct(sh)})."
        )
    pc = ag["position_consistency"]
    if pc and pc["value"] is not None and pc["value"] < 0.6:
        notes.append(
            f"Low position consistency: the judge prefers the same response in both answer orders on only "
            f"{_pct(pc['value'])} of pairs, so most of its labels are near ½ after averaging."
        )
    if lab.get("null_labels"):
        notes.append(
            f"{lab['null_labels']} pairs got no usable AI label and were left out of both training sets."
        )
    headlines = [
        f"On {h['accuracy']['n']} test pairs: {NAMES['ai']} (AI labels) {_pct(a['accuracy']['value'])} "
        f"(95% CI {_pct(a['accuracy']['ci'][0])}–{_pct(a['accuracy']['ci'][1])}) vs {NAMES['human']} (human labels) "
        f"{_pct(h['accuracy']['value'])} (95% CI {_pct(h['accuracy']['ci'][0])}–{_pct(h['accuracy']['ci'][1])}).",
        f"AI labels agreed with the human labels on {_pct(agv)} (95% CI {_pct(lo)}–{_pct(hi)}) of the "
        f"{ag['agreement']['n']} training pairs; judge: {judge_desc['model']}, constitution {c_desc}.",
    ]
    total = sum(r["seconds"] or 0 for r in steps.records if not r["cached"])
    return {
        "description": (
            f"Two reward models with the same base ({cfg.base or 'all-MiniLM-L6-v2 (embedded default)'}), "
            f"the same {lab['n']} training pairs from `{cfg.human_train}` and the same budget "
            f"({cfg.epochs:g} epoch(s), {cfg.labels} labels, seed {cfg.seed}); they differ only in who "
            "labelled the pairs. The judge saw each pair with its human label removed and its order "
            "shuffled. Test pairs carry human labels."
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
            f"Estimated up front from {est['how']}. This run took {_dur(total)} for the steps it ran "
            f"(cached steps cost nothing)."
        ),
        "command": cfg.command,
    }


def summary_line(metrics: dict, out) -> str:
    if metrics.get("dry_run"):
        return "cai compare: dry run; nothing was computed"
    m = metrics["models"]
    parts = ", ".join(f"{n} {_pct(v['accuracy']['value'])}" for n, v in m.items())
    ag = metrics["study"]["labels"]["agreement"]["value"]
    return f"cai compare: {parts}; AI-human label agreement {_pct(ag)} -> {out}/report.html"


def command_line() -> str:
    return "cai " + " ".join(shlex.quote(a) for a in sys.argv[1:])
