"""Scoring with a trained reward model: `score_pairs` (rows -> rewards) and `cai score`.

Sequences are encoded exactly as in training (cai/encode.py) and scored in length-sorted
batches. `cai score` writes raw rewards and, when the artifact carries a length fit
(cai/lengthfit.py), length-corrected ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cai.artifact import CONFIG_NAME, read_marker
from cai.configs import ScoreConfig
from cai.encode import PairEncoder, default_max_length, pad_batch
from cai.errors import InputError
from cai.guard import claim_output
from cai.models import check_reward_model, pick_device, pick_dtype, quiet_transformers
from cai.options import check_config
from cai.pairmetrics import length_metrics, pair_metrics
from cai.records import read_pairs, response_text, skip_note, write_text


def _load_reward_model(rm_dir, device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = Path(rm_dir)
    check_reward_model(rm, "--rm")  # config.json, one output, safetensors: from the files, before loading
    device = pick_device(device)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(rm)
            model = AutoModelForSequenceClassification.from_pretrained(
                rm, dtype=torch.float32, use_safetensors=True
            )
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the reward model ({str(e).splitlines()[0][:160]})", rm) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    if device.startswith("cuda"):
        model = model.to(pick_dtype(device))
    return tok, model.to(device).eval(), device


def score_pairs(
    rm_dir,
    rows: list[dict],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | None = None,
    stats: dict | None = None,
) -> list[tuple[float, float]]:
    """(reward of chosen, reward of rejected) for each pairs-contract row, in row order.

    Sequences are scored in length-sorted batches (little padding). `max_length` defaults to the
    length the model was trained at. `stats`, when given, receives {"truncated": n}.
    """
    tok, model, device = _load_reward_model(rm_dir, device)
    if max_length is None:
        rec = read_marker(Path(rm_dir)) or {}
        max_length = rec.get("config", {}).get("max_length") or default_max_length(
            str(rm_dir), model.config, tok
        )
    enc = PairEncoder(tok, max_length)
    seqs = [s for r in rows for s in enc(r)]  # chosen_0, rejected_0, chosen_1, …
    if stats is not None:
        stats["truncated"] = enc.truncated
    scores = score_sequences(model, tok.pad_token_id, seqs, device, batch_size)
    return [(scores[2 * k], scores[2 * k + 1]) for k in range(len(rows))]


def score_sequences(model, pad_id: int, seqs: list[list[int]], device, batch_size: int = 32, progress=None):
    """The reward (output 0) of each token-id sequence, in input order; length-sorted batches."""
    from tqdm.auto import tqdm

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = [0.0] * len(seqs)
    bar = tqdm(
        total=len(seqs) // 2,
        desc="scoring",
        unit="pair",
        disable=True if progress is False else None,
        file=sys.stderr,
    )
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
            logits = (
                model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
            )
            for i, v in zip(idx, logits):
                scores[i] = v
            bar.update(len(idx) / 2)
    bar.close()
    return scores


def length_correction(rm_dir) -> dict | None:
    """The artifact's fitted length correction (cai/lengthfit.py), or None when it has none."""
    from cai import lengthfit

    return lengthfit.from_artifact(rm_dir, CONFIG_NAME)


def run_score(cfg: ScoreConfig) -> dict:
    """`cai score`: per-row rewards as JSONL (id, r_chosen, r_rejected, margin; and, when the
    artifact carries a length fit, the same three with ``_corrected``); `out` may be '-'.

    Returns a summary: pairs scored, rows skipped, rows truncated, and against the rows' labels
    (rows labelled 0.5 left out) accuracy, mean margin, length-balanced accuracy and the length
    gap, raw and (with a length fit) corrected.
    """
    from cai import lengthfit

    check_config(cfg)
    check_reward_model(cfg.rm, "--rm")
    fit = length_correction(cfg.rm)  # a broken record is an error before any scoring
    with claim_output(cfg.out, inputs=[cfg.pairs]):
        stats: dict = {}
        rows = read_pairs(cfg.pairs, limit=cfg.limit, skip_bad=cfg.skip_bad, stats=stats)
        sc: dict = {}
        scores = score_pairs(cfg.rm, rows, batch_size=cfg.rm_batch_size, device=cfg.device, stats=sc)
        lengths = np.array(
            [[len(response_text(r["chosen"])), len(response_text(r["rejected"]))] for r in rows]
        )
        fixed = lengthfit.correct(fit, scores, lengths) if fit else None

        def line(k: int, r: dict) -> str:
            c, j = scores[k]
            out = {"id": r["id"], "r_chosen": c, "r_rejected": j, "margin": c - j}
            if fixed is not None:
                fc, fj = (float(v) for v in fixed[k])
                out |= {"r_chosen_corrected": fc, "r_rejected_corrected": fj, "margin_corrected": fc - fj}
            return json.dumps(out, ensure_ascii=False) + "\n"

        text = "".join(line(k, r) for k, r in enumerate(rows))
        if str(cfg.out) == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_text(cfg.out, text)  # all or nothing: a killed run never leaves half a file
    p = [r["label"]["p_chosen"] for r in rows]
    m = pair_metrics(scores, p)
    summary = {
        "pairs": len(rows),
        "skipped": len(stats.get("skipped", [])),
        "skip_note": skip_note(stats),
        "truncated": sc.get("truncated", 0),
        "accuracy": m["accuracy"],
        "margin": m["margin"],
        "labelled": m["pairs"],
        "length": length_metrics(scores, p, lengths) if m["pairs"] else {},
        "corrected": None,
        "out": str(cfg.out),
    }
    if fixed is not None and m["pairs"]:
        summary["corrected"] = pair_metrics(fixed, p) | length_metrics(fixed, p, lengths)
    return summary


def score_summary(s: dict, out) -> list[str]:
    """The lines `cai score` prints: counts, then accuracy, length-balanced accuracy and the length
    gap against the rows' labels, raw and (with the artifact's length fit) corrected."""

    def figures(m: dict) -> str:
        txt = f"{m['accuracy']:.3f}"
        if "balanced_accuracy" in m:
            txt += f" (length-balanced {m['balanced_accuracy']:.3f}, gap {100 * m['length_gap']:+.1f} points)"
        return txt

    skipped = f"; {s['skip_note']}" if s.get("skip_note") else ""
    lines = [f"cai: scored {s['pairs']} pairs -> {out} ({s['truncated']} truncated){skipped}"]
    if s["labelled"]:
        line = f"cai: accuracy vs labels on {s['labelled']} pairs: raw {figures(s | s['length'])}"
        if s.get("corrected"):
            line += f"; length-corrected {figures(s['corrected'])}"
        else:
            line += "; no length fit in this reward model (cai train --length-correction makes one)"
        lines.append(line)
    return lines
