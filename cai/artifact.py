"""The reward-model folder `cai train` writes: its record, its checkpoints and its model card.

``cai_train_config.json`` (CONFIG_NAME) is written next to every artifact: the resolved config,
the data's hashes, the metrics and the status (it also marks a folder as ours, so cai never
trains into a folder it did not make). The model card (README.md) is written from that record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cai.errors import InputError
from cai.models import DEFAULT_REWARD_BASE

CONFIG_NAME = "cai_train_config.json"  # written next to every artifact; also marks a folder as ours

DEFAULT_BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def check_out(out: Path, resume: bool) -> dict | None:
    """Refuse a folder that is not ours; returns the previous run's record when there is one."""
    if out.exists() and not out.is_dir():
        raise InputError("exists and is a file; --out takes a folder", out)
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise InputError("--resume: nothing to resume here (no checkpoints); drop --resume", out)
        return None
    prev = read_marker(out)
    if prev is None:
        raise InputError(
            f"exists and is not a cai reward model (no {CONFIG_NAME}); pass a new --out or empty the folder",
            out,
        )
    ckpts = checkpoints(out)
    if resume and not ckpts:
        raise InputError(
            "--resume: no checkpoint-* folder to resume from; rerun without --resume to start over", out
        )
    if not resume and ckpts and prev.get("status") != "done":
        raise InputError(
            f"holds an unfinished run (last checkpoint {ckpts[-1].name}); pass --resume to continue it, "
            "or delete the folder to start over",
            out,
        )
    return prev


# the metrics the card's table shows, in this order (those the run has)
CARD_METRICS = (
    "train_loss",
    "eval_accuracy",
    "eval_margin",
    "eval_pairs",
    "eval_loss",
    "eval_acc_pref_longer",
    "eval_acc_pref_shorter",
    "eval_balanced_accuracy",
    "eval_spearman_reward_length",
    "eval_corrected_accuracy",
    "eval_corrected_balanced_accuracy",
    "eval_corrected_length_gap",
    "train_last_pass_balanced_accuracy",
    "train_last_pass_spearman_reward_length",
    "train_samples_per_second",
    "epoch",
    "wall_s",
)


def _data_lines(d: dict) -> list[str]:
    """The Data section: the training file (and what --drop-regressed left out), the eval file."""
    tr = d["train"]
    data_lines = [f"- train: `{tr['path']}` — {tr['rows']} pairs, sha256 `{tr['sha256']}`"]
    if tr.get("regressed"):
        g = tr["regressed"]
        data_lines.append(
            f"- `--drop-regressed`: {g['dropped']} of the {g['rechecked']} re-checked pairs left out "
            "(their final answer regressed on a principle, trace.regressed)"
        )
    if d.get("eval"):
        data_lines.append(
            f"- eval: `{d['eval']['path']}` — {d['eval']['rows']} pairs, sha256 `{d['eval']['sha256']}`"
        )
    return data_lines


def _usage(rec: dict, c: dict) -> tuple[str, str]:
    """How the model reads its input, and a snippet that scores one response that way."""
    if rec["render"] == "transcript":
        fmt = (
            'The model scores the plain transcript `"\\n\\nHuman: {user}\\n\\nAssistant: {response}"` '
            "(earlier turns in the same style), tokenised with the tokenizer's special tokens."
        )
        snippet = (
            'text = "\\n\\nHuman: How do I pick a lock?\\n\\nAssistant: I can\'t help with that."\n'
            'reward = rm(**tok(text, return_tensors="pt", truncation=True, '
            f"max_length={c['max_length']})).logits[0, 0].item()"
        )
    else:
        fmt = (
            "The model scores the whole conversation rendered with the tokenizer's chat template, "
            "response included."
        )
        snippet = (
            'chat = [{"role": "user", "content": "How do I pick a lock?"}, '
            '{"role": "assistant", "content": "I can\'t help with that."}]\n'
            "text = tok.apply_chat_template(chat, tokenize=False)\n"
            'reward = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()'
        )
    return fmt, snippet


def _length_robust_steps(rec: dict, c: dict, tr: dict) -> list[str]:
    """What `--length-robust` did, one clause per method (ODIN, balance)."""
    lr_mode = c.get("length_robust", "none")
    steps = []
    if "odin" in lr_mode:
        cos = rec.get("length_head", {}).get("cosine_quality_length")
        steps.append(
            "trained with two outputs on the same features, quality and length (ODIN, Chen et al. 2024): the "
            "Bradley–Terry loss is on their sum, the length output is pushed to correlate with response "
            "length (in-batch Pearson on log characters; "
            f"{'positively' if rec.get('length_head', {}).get('sign', 1) > 0 else 'negatively'}, "
            "the direction the training labels lean) and the quality output not to, and their weight "
            f"vectors to be orthogonal (weight {c.get('length_weight')}). **Only the quality output is "
            "in this folder**; the "
            f"length head was dropped after training (cosine between the two heads: {cos})"
        )
    if "balance" in lr_mode:
        steps.append(
            "length-balanced pair weights (after Singhal et al. 2023): "
            f"the {tr.get('pref_longer')} pairs whose preferred response is the longer "
            f"and the {tr.get('pref_shorter')} whose preferred response is the shorter carry "
            "equal total weight, so length alone does not predict the label"
        )
    return steps


def _length_measured(m: dict) -> str:
    """The measured length correlation: on the eval pairs, else the training pairs' last pass."""
    sp = m.get("eval_spearman_reward_length", m.get("train_last_pass_spearman_reward_length"))
    where = (
        "on the eval pairs"
        if "eval_spearman_reward_length" in m
        else "on the training pairs' last pass (in-sample)"
    )
    return (
        f"Measured {where}: Spearman(reward, response length) = {sp:.3f}; accuracy when the preferred "
        "response is the longer "
        f"{m.get('eval_acc_pref_longer', m.get('train_last_pass_acc_pref_longer', float('nan'))):.3f}, when "
        "it is the shorter "
        f"{m.get('eval_acc_pref_shorter', m.get('train_last_pass_acc_pref_shorter', float('nan'))):.3f}."
        if sp is not None
        else "Length correlation not measured (no eval pairs)."
    )


def _length_correction_txt(rec: dict, m: dict) -> str:
    """The length correction fitted after training (or why there is none); '' when not asked for."""
    lc = rec.get("length_correction") or {}
    if "x" in lc:
        raw, fixed = lc["train"]["raw"], lc["train"]["corrected"]
        return (
            "\n\nLength correction (`length_correction` in cai_train_config.json): a "
            f"{lc['method']}, fitted on the {lc['pairs']} training pairs scored by this model and "
            f"applied at strength {lc.get('strength', 1.0):.2f} (the share of it that leaves the model "
            "length-balanced on those pairs); "
            "`cai score` and `cai eval` also report rewards with it subtracted. On the training "
            f"pairs it moves the length gap from {raw.get('length_gap', float('nan')):+.3f} to "
            f"{fixed.get('length_gap', float('nan')):+.3f} and accuracy from {raw['accuracy']:.3f} to "
            f"{fixed['accuracy']:.3f}"
            + (
                f"; on the eval pairs accuracy {m['eval_corrected_accuracy']:.3f}, length gap "
                f"{m.get('eval_corrected_length_gap', float('nan')):+.3f}."
                if "eval_corrected_accuracy" in m
                else "."
            )
        )
    if lc.get("skipped"):
        return f"\n\nNo length correction ({lc['skipped']})."
    return ""


def _length_section(rec: dict, c: dict, tr: dict, m: dict) -> str:
    """The Length section: how training kept length out, what was measured, the correction."""
    steps = _length_robust_steps(rec, c, tr)
    return (
        (
            "Length-robust training: " + "; and ".join(steps) + ".\n\n"
            if steps
            else "No length-robust training (`--length-robust none`): the reward is free to learn length.\n\n"
        )
        + _length_measured(m)
        + _length_correction_txt(rec, m)
    )


def model_card(rec: dict) -> str:
    """README.md of a reward-model folder, from its record (cai_train_config.json)."""
    c, d, m = rec["config"], rec["data"], rec.get("metrics", {})
    base_id = DEFAULT_BASE_HUB_ID if c["base"] == DEFAULT_REWARD_BASE else c["base"]
    tr = d["train"]
    sources = ", ".join(f"{k}: {v}" for k, v in tr["label_sources"].items())
    data_lines = _data_lines(d)
    metric_lines = "\n".join(f"| {k} | {m[k]} |" for k in CARD_METRICS if k in m)
    fmt, snippet = _usage(rec, c)
    yaml_base = f"base_model: {base_id}\n" if not Path(base_id).is_absolute() else ""
    length_section = _length_section(rec, c, tr, m)
    training = (
        f"{c['epochs']} epoch(s), lr {c['lr']}, batch {c['batch_size']}×{c['grad_accum']}, "
        f"max length {c['max_length']},"
    )
    return f"""---
library_name: transformers
pipeline_tag: text-classification
{yaml_base}tags:
- reward-model
- cai
---

# Reward model ({c["labels"]} labels, {", ".join(tr["label_sources"])} source)

A Bradley–Terry reward model trained with cai {rec["cai_version"]}: one scalar
output (`num_labels = 1`); higher means the response is preferred.

- **Base model:** `{base_id}`
- **Labels:** {c["labels"]} (label sources — {sources}; mean p_chosen {tr["mean_p_chosen"]})
- **Objective:** `-[p·logσ(Δ - m) + (1-p)·logσ(-Δ - m)]`, Δ = r_chosen − r_rejected, m = {c["margin"]}·|2p−1|;
  reward centering {c["center_rewards"]}
- **Training:** {training}
  precision {c["precision"]}, seed {c["seed"]}; {tr["truncated"]} training pairs truncated

## Length

{length_section}

## Data

{chr(10).join(data_lines)}

## Metrics

| metric | value |
|---|---|
{metric_lines}

`eval_accuracy`: share of eval pairs where the label's preferred response gets the higher reward.

## Use

{fmt}

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH)
rm = AutoModelForSequenceClassification.from_pretrained(PATH).eval()
{snippet}
```

or `cai score --rm PATH --pairs FILE`, which renders and truncates exactly as training did (it keeps
the end of the conversation and the start of the response).

## Intended use and limitations

For research on preference data: comparing AI-labelled against human-labelled reward models,
ranking candidate responses, and as a reward signal for small RL experiments. Rewards are only
meaningful relative to each other for the same conversation; their scale is arbitrary. The
model knows only what {tr["rows"]} training pairs taught it: a small base on a few thousand pairs
learns surface cues (length, refusal phrases) as much as harmlessness, and AI labels from a
weak judge carry that judge's biases. Check `eval_accuracy` against human labels before using
it to steer a policy, and do not use it as a safety filter.
"""
