"""Reward models: train them on soft AI labels or human labels, and score pairs with them.

The objective is the soft-label Bradley–Terry loss on label.p_chosen (`compute_loss`). Everything
else (checkpoints, resume, gradient accumulation, mixed precision, DDP/FSDP under `accelerate
launch` / `torchrun`) is transformers' Trainer, so this module holds only what is specific to
reward models: how a pair becomes tokens, how a batch is laid out, the loss, and the artifact's
paperwork.

Imports torch and transformers at the top (the Trainer subclass needs them); cli.py imports this
module inside the commands, so `cai --help` stays instant.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from cai import __version__
from cai.configs import LENGTH_ROBUST, ScoreConfig, TrainConfig
from cai.errors import InputError
from cai.guard import claim_output
from cai.models import (
    DEFAULT_REWARD_BASE,
    check_model,
    check_reward_model,
    pick_device,
    pick_dtype,
    quiet_transformers,
    resolve_reward_base,
)
from cai.options import check_config
from cai.recheck import has_regression
from cai.records import (
    file_sha256,
    read_pairs,
    response_text,
    skip_note,
    to_transcript,
    write_json,
    write_text,
)

CONFIG_NAME = "cai_train_config.json"  # written next to every artifact; also marks a folder as ours
DEFAULT_BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------- configuration


# TrainConfig (every `cai train` option, its default and help) lives in cai/configs.py: the CLI
# builds `train`'s and `compare`'s options from it. Add training options there.


# ----------------------------------------------------------------------------- rendering


def render_pair_texts(tokenizer, row: dict) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text); a sequence is prompt_text + response_text.

    With a chat template the conversation is rendered by it; otherwise as the plain
    "\\n\\nHuman: …\\n\\nAssistant: …" transcript. Training and scoring both come through here,
    so a reward model always sees text laid out the way it was trained on.
    """
    prompt = row["prompt"]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = [
            tokenizer.apply_chat_template(prompt + row[k], tokenize=False) for k in ("chosen", "rejected")
        ]
        # Usually `head` is a prefix of both; templates that rewrite earlier turns (e.g. strip
        # reasoning) are split at the common prefix instead, so prompt + response == full text.
        k = min(len(os.path.commonprefix([head, f])) for f in full)
        return full[0][:k], full[0][k:], full[1][k:]
    head = to_transcript(prompt) + "\n\nAssistant:"
    return head, " " + row["chosen"][-1]["content"], " " + row["rejected"][-1]["content"]


class PairEncoder:
    """Renders a pair and turns it into two token-id lists of at most `max_length`.

    Truncation keeps the end of the conversation and the whole response where it fits: the
    conversation is cut from the left; the response keeps its beginning and is cut only when it
    would leave the conversation less than a quarter of the window (so the model still sees the
    question). `truncated` counts rows where either side was cut.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length
        self.truncated = 0
        if getattr(tokenizer, "chat_template", None):
            self.prefix, self.suffix = [], []  # the template already writes BOS/EOS and turn markers
        else:
            # The tokenizer's own special tokens ([CLS] … [SEP], <s> …), found around a probe,
            # because transformers 5 tokenizers no longer expose build_inputs_with_special_tokens.
            probe = tokenizer("a", add_special_tokens=False)["input_ids"]
            full = tokenizer("a", add_special_tokens=True)["input_ids"]
            i = next((i for i in range(len(full)) if full[i : i + len(probe)] == probe), None)
            self.prefix, self.suffix = ([], []) if i is None else (full[:i], full[i + len(probe) :])
        self.budget = max_length - len(self.prefix) - len(self.suffix)
        if self.budget < 8:
            raise InputError(f"--max-length {max_length} leaves no room for text; use at least 16")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _fit(self, p: list[int], r: list[int]) -> tuple[list[int], bool]:
        if len(p) + len(r) <= self.budget:
            return self.prefix + p + r + self.suffix, False
        keep_r = min(len(r), self.budget - min(len(p), self.budget // 4))
        keep_p = self.budget - keep_r
        return self.prefix + (p[-keep_p:] if keep_p else []) + r[:keep_r] + self.suffix, True

    def __call__(self, row: dict) -> tuple[list[int], list[int]]:
        head, ch, rj = render_pair_texts(self.tok, row)
        p = self._ids(head)
        c, cut_c = self._fit(p, self._ids(ch))
        r, cut_r = self._fit(p, self._ids(rj))
        self.truncated += cut_c or cut_r
        return c, r


def pad_batch(seqs: list[list[int]], pad_id: int, multiple_of: int | None = None):
    """Right-pad to the longest sequence in the batch (dynamic padding): (input_ids, attention_mask)."""
    n = max(len(s) for s in seqs)
    if multiple_of:
        n = math.ceil(n / multiple_of) * multiple_of
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- data for the Trainer


class PairDataset(torch.utils.data.Dataset):
    """Tokenised pairs; `lengths` feed the length-grouped sampler."""

    def __init__(self, items: list[dict]):
        self.items = items
        self.lengths = [max(len(it["chosen_ids"]), len(it["rejected_ids"])) for it in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@dataclass
class PairCollator:
    """One batch = [chosen_1 … chosen_B; rejected_1 … rejected_B], padded to the batch's longest.

    Stacking both sides lets the loss score them in one forward pass (one weight read, one DDP
    all-reduce per step) and keeps the pair's two sequences at the same padded length.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        seqs = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        ids, mask = pad_batch(seqs, self.pad_token_id, self.pad_to_multiple_of)
        p = torch.tensor([f["p_chosen"] for f in features], dtype=torch.float32)
        # response lengths in characters (as the length probe of `cai eval` counts them), (B, 2)
        lengths = torch.tensor(
            [[f.get("len_chosen", 0), f.get("len_rejected", 0)] for f in features], dtype=torch.float32
        )
        weight = torch.tensor([f.get("weight", 1.0) for f in features], dtype=torch.float32)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "p_chosen": p,
            "pair_lengths": lengths,
            "pair_weight": weight,
        }


# ----------------------------------------------------------------------------- the trainer


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def _mmap_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold (process-wide); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # musl and other C libraries: nothing to set
        return False


@contextlib.contextmanager
def freed_memory_returned():
    """While inside, glibc hands every freed block of 1 MiB or more back to the OS at once.

    glibc serves a request above its mmap threshold with a mapping of its own, unmapped on free,
    and smaller ones from its heaps, which keep freed memory resident for reuse. The threshold is
    dynamic: each freed mapping raises it to that block's size (up to 32 MiB), so after the first
    activation tensors are freed the rest (12.5 MB each at 32 x 256 tokens x 384) come from the
    heaps, and the holes they leave as a training step's tensors come and go hold ~0.8 GB above
    the live peak: `cai train`'s defaults with checkpointing peak at 2.2 GiB RSS, 1.4 GiB with a
    1 MiB threshold. The price is fresh pages, so page faults, for every big tensor: +20% time
    per training step, +25-50% in inference, hence only around training steps, and only with
    checkpointing (without it the activations alone are over 3 GB, and the trade is poor). On
    leaving, the threshold is set to 32 MiB, where the dynamic one ends up (glibc has no way
    back to the dynamic threshold itself).
    """
    on = _mmap_threshold(1 << 20)
    try:
        yield
    finally:
        if on:
            _mmap_threshold(32 << 20)


def torch_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable Pearson correlation of two 1-d tensors (0 when either is constant)."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm() + 1e-8)


class RewardModelTrainer(Trainer):
    """transformers' Trainer with the soft-label Bradley–Terry objective.

    With ``odin`` the model has two outputs, quality and length (ODIN, Chen et al. 2024): the
    Bradley–Terry loss is on their sum; the length output is pushed to correlate with response
    length, the quality output to not correlate with it (both as in-batch Pearson correlations),
    and the two output weight vectors to be orthogonal. Only the quality output ships.
    """

    def __init__(
        self,
        *args,
        labels: str = "soft",
        margin: float = 0.0,
        center_rewards: float = 0.0,
        odin: bool = False,
        return_freed_memory: bool = False,
        length_weight: float = 1.0,
        length_sign: float = 1.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.hard_labels = labels == "hard"
        self.margin = margin
        self.center_rewards = center_rewards
        self.odin = odin
        self.length_weight = length_weight
        self.length_sign = length_sign
        self.return_freed_memory = return_freed_memory  # checkpointed CPU training: see freed_memory_returned
        self.seen = (
            collections.deque(maxlen=len(self.train_dataset)) if self.train_dataset is not None else None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p = inputs["p_chosen"]
        if self.hard_labels:
            p = p.round()
        # One forward pass over [chosen; rejected] (see PairCollator); rewards in fp32 under autocast.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        total = (
            out.sum(-1) if self.odin else out[:, 0]
        )  # ODIN: the preference is explained by quality + length
        r_c, r_r = total.chunk(2)
        delta = r_c - r_r
        # Cross-entropy between the label p and the model's P(chosen > rejected) = σ(Δ):
        #   -[p·logσ(Δ - m) + (1-p)·logσ(-Δ - m)]
        # p = 1 gives the usual -logσ(Δ); p = 0.5 pulls Δ towards 0 (a tie). The margin m grows
        # with label strength, so uncertain AI labels ask for small gaps.
        m = self.margin * (2 * p - 1).abs()
        per_pair = -(p * F.logsigmoid(delta - m) + (1 - p) * F.logsigmoid(-delta - m))
        w = inputs.get("pair_weight")
        loss = (per_pair * w).sum() / w.sum() if w is not None else per_pair.mean()
        if self.center_rewards:
            # Keeps rewards near zero; BT alone is blind to a shared offset (Eisenstein et al. 2023).
            loss = loss + self.center_rewards * (r_c + r_r).pow(2).mean()
        if self.odin and model.training:
            # log length: response lengths are heavy-tailed, and Pearson is sensitive to the tail
            length = torch.log1p(inputs["pair_lengths"].t().reshape(-1))  # [chosen…; rejected…] like `out`
            if length.std() > 0:
                # ODIN pushes the length head towards +length (its data favoured long answers); here the
                # sign follows the training labels' own lean, so the length head can absorb "shorter is
                # preferred" too (HH harmlessness), instead of fighting it.
                rho_l = self.length_sign * torch_pearson(out[:, 1], length)
                loss = loss + self.length_weight * (torch_pearson(out[:, 0], length).abs() - rho_l)
            w_q, w_l = _reward_head(getattr(model, "module", model)).weight[:2]
            loss = loss + self.length_weight * (w_q * w_l).sum().abs()
        q_c, q_r = out[:, 0].chunk(2)  # what is reported and shipped: the quality output alone
        if model.training and self.seen is not None:  # the last pass's rewards, for the model card
            self.seen.extend(
                torch.stack([q_c, q_r, inputs["p_chosen"], *inputs["pair_lengths"].t()], -1)
                .detach()
                .cpu()
                .tolist()
            )
        return (loss, {"rewards": torch.stack([q_c, q_r], dim=-1)}) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        with freed_memory_returned() if self.return_freed_memory else contextlib.nullcontext():
            return super().training_step(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # The library's length-grouped sampler (random mega-batches, sorted inside), fed lengths
        # we already know: its own lookup wants an `input_ids` column, which pairs do not have.
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=ds.lengths
        )


def pair_metrics(rewards, p) -> dict:
    """Accuracy against the label (a reward tie counts half) and mean margin toward the preferred side.

    `rewards` is (n, 2): chosen, rejected. Rows labelled exactly 0.5 prefer neither side and are left
    out, and so are rows without a label (``p_chosen`` null): no accuracy is made of them.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    p = np.array([np.nan if x is None else x for x in np.asarray(p, dtype=object).reshape(-1)], np.float64)
    sign = np.sign(p - 0.5)
    keep = np.isfinite(sign) & (sign != 0)  # rows without a label (p_chosen null) say nothing
    d = (r[:, 0] - r[:, 1])[keep] * sign[keep]
    if not len(d):
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    return {
        "accuracy": float(np.mean((d > 0) + 0.5 * (d == 0))),
        "margin": float(d.mean()),
        "pairs": int(len(d)),
    }


class _SkipFinalCheckpoint(TrainerCallback):
    """The artifact is saved right after the last step, so the Trainer's end-of-training checkpoint
    (optimizer state included: ~3x the model) would be written only to be deleted."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def length_metrics(rewards, p, lengths) -> dict:
    """How much of the reward is length: accuracy when the preferred response is the longer /
    the shorter one, their mean (length-balanced accuracy), their gap, and Spearman(reward,
    length) over every response. Same definitions as the length probe of `cai eval`."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    ln = np.asarray(lengths, dtype=np.float64).reshape(-1, 2)
    sign = np.sign(np.asarray(p, dtype=np.float64).reshape(-1) - 0.5)
    d = (r[:, 0] - r[:, 1]) * sign
    correct = (d > 0) + 0.5 * (d == 0)
    longer = (ln[:, 0] - ln[:, 1]) * sign > 0
    shorter = (ln[:, 0] - ln[:, 1]) * sign < 0
    out = {}
    if longer.any() and shorter.any():
        a_l, a_s = float(correct[longer].mean()), float(correct[shorter].mean())
        out = {
            "acc_pref_longer": a_l,
            "acc_pref_shorter": a_s,
            "balanced_accuracy": (a_l + a_s) / 2,
            "length_gap": a_l - a_s,
        }
    x, y = r.reshape(-1), ln.reshape(-1)
    if x.std() > 0 and y.std() > 0:
        out["spearman_reward_length"] = float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])
    return out


def _fit_length_correction(trainer, model, tok, train_ds, last_eval, metrics: dict) -> dict:
    """Score the training pairs with the final model and fit reward against response length
    (cai/lengthfit.py); add the corrected eval figures to ``metrics``. Returns the artifact's
    ``length_correction`` record (None with a reason when it cannot be fitted)."""
    from cai import lengthfit

    if trainer.args.world_size > 1 or getattr(trainer, "is_fsdp_enabled", False):
        _log("length correction skipped: it is fitted in single-process training only")
        return {"skipped": "multi-process training"}
    t0 = time.time()
    _log(f"length correction: scoring the {len(train_ds)} training pairs with the final model")
    device = next(model.parameters()).device
    seqs = [s for it in train_ds.items for s in (it["chosen_ids"], it["rejected_ids"])]
    was_training = model.training
    model.eval()
    try:
        scores = score_sequences(model, tok.pad_token_id, seqs, device, batch_size=32, progress=False)
    finally:
        model.train(was_training)
    rewards = np.array(scores).reshape(-1, 2)
    lengths = np.array([[it["len_chosen"], it["len_rejected"]] for it in train_ds.items], float)
    p = np.array([it["p_chosen"] for it in train_ds.items])
    rec = lengthfit.fit(rewards, lengths)
    if rec is None:
        _log("length correction skipped: fewer than 5 distinct response lengths, or constant rewards")
        return {"skipped": "too few distinct lengths or constant rewards"}
    rec = lengthfit.choose_strength(
        rec, rewards, lengths, lambda r: length_metrics(r, p, lengths).get("length_gap")
    )
    corrected = lengthfit.correct(rec, rewards, lengths)
    rec["train"] = {
        "raw": pair_metrics(rewards, p) | length_metrics(rewards, p, lengths),
        "corrected": pair_metrics(corrected, p) | length_metrics(corrected, p, lengths),
    }
    if last_eval is not None:
        er, ep, el = last_eval
        ec = lengthfit.correct(rec, er, el)
        m = pair_metrics(ec, ep) | length_metrics(ec, ep, el)
        metrics.update({f"eval_corrected_{k}": v for k, v in m.items() if k != "pairs"})
    rec["seconds"] = round(time.time() - t0, 1)
    _log(
        f"length correction fitted (strength {rec['strength']:.2f}): training pairs' length gap "
        f"{rec['train']['raw'].get('length_gap', float('nan')):+.3f} -> "
        f"{rec['train']['corrected'].get('length_gap', float('nan')):+.3f}"
    )
    return rec


def reward_metrics(pred) -> dict:
    """Trainer's compute_metrics: predictions are the (n, 2) rewards, label_ids (p_chosen, lengths)."""
    labels = pred.label_ids
    p, lengths = labels if isinstance(labels, (tuple, list)) else (labels, None)
    m = pair_metrics(pred.predictions, p)
    if lengths is not None:
        m.update(length_metrics(pred.predictions, p, lengths))
    return m


class _KeepLastEval:
    """``reward_metrics`` that also keeps the last evaluation's rewards, labels and lengths, so
    the length-corrected eval figures need no second pass over the eval pairs."""

    def __init__(self):
        self.last = None

    def __call__(self, pred) -> dict:
        labels = pred.label_ids
        if isinstance(labels, (tuple, list)) and len(labels) == 2:
            self.last = (np.asarray(pred.predictions), np.asarray(labels[0]), np.asarray(labels[1]))
        return reward_metrics(pred)


def _reward_head(model) -> torch.nn.Linear:
    """The final linear layer of a sequence-classification model (BERT's `classifier`, Llama's
    `score`, RoBERTa's `classifier.out_proj`, …): the last Linear with num_labels outputs."""
    n = model.config.num_labels
    found = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not found:
        raise InputError(
            f"cannot find the {n}-output head of {type(model).__name__}; use --length-robust none or balance"
        )
    return found[-1]


def _drop_length_head(model) -> dict:
    """Keep only output 0 (quality) of an ODIN model: the artifact is then a plain 1-output reward
    model. Returns the dropped length head's weights (for the record)."""
    head = _reward_head(model)
    new = torch.nn.Linear(
        head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype, device=head.weight.device
    )
    with torch.no_grad():
        new.weight.copy_(head.weight[:1])
        if head.bias is not None:
            new.bias.copy_(head.bias[:1])
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if child is head:
                setattr(mod, child_name, new)
    w = head.weight.detach().float()
    dropped = {"cosine_quality_length": round(float(F.cosine_similarity(w[0], w[1], dim=0)), 4)}
    model.config.num_labels = 1
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    if hasattr(model, "num_labels"):
        model.num_labels = 1
    return dropped


# ----------------------------------------------------------------------------- checks


def _on_gpu(cfg: TrainConfig) -> bool:
    return torch.cuda.is_available() and cfg.device != "cpu"


def _check_hardware(cfg: TrainConfig) -> str:
    """The precision to use; options that need a GPU fail here, before anything loads."""
    gpu = _on_gpu(cfg)
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"precision {cfg.precision!r} is not one of auto, fp32, bf16, fp16")
    if cfg.length_robust not in LENGTH_ROBUST:
        raise InputError(f"--length-robust {cfg.length_robust!r}: use one of {', '.join(LENGTH_ROBUST)}")
    if cfg.labels not in ("soft", "hard"):
        raise InputError(f"--labels {cfg.labels!r}: use soft or hard")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {cfg.device} asked for a GPU but none is available; use --device cpu")
    if not gpu:
        if cfg.precision in ("bf16", "fp16"):
            raise InputError(
                f"--{cfg.precision} needs a GPU and this run is on the CPU; "
                f"drop --{cfg.precision} (CPU trains in fp32)"
            )
        if cfg.fsdp:
            raise InputError(
                "--fsdp needs GPUs and a multi-process launch (accelerate launch / torchrun); "
                "drop it on this machine"
            )
        return "fp32"
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise InputError("--bf16: this GPU has no bf16 support; use --fp16")
    return cfg.precision


def checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def _check_out(out: Path, resume: bool) -> dict | None:
    """Refuse a folder that is not ours; returns the previous run's record when there is one."""
    if out.exists() and not out.is_dir():
        raise InputError("exists and is a file; --out takes a folder", out)
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise InputError("--resume: nothing to resume here (no checkpoints); drop --resume", out)
        return None
    prev = _read_marker(out)
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


# ----------------------------------------------------------------------------- loading


def read_training_rows(
    path, limit, labels: str, what: str, skip_bad: bool = False, drop_regressed: bool = False
) -> tuple[list[dict], dict]:
    stats: dict = {}
    rows = read_pairs(path, limit=limit, skip_bad=skip_bad, stats=stats, need_label=True)
    good, bad, ties = [], list(stats.get("skipped", [])), 0
    regressed = None
    if drop_regressed:
        checked = sum(1 for r in rows if (r.get("trace") or {}).get("recheck"))
        if not checked:
            raise InputError(
                "--drop-regressed: no row carries a re-check (trace.recheck); make the pairs with "
                "`cai generate --recheck` or `cai label --recheck`, or drop the option",
                path,
            )
        kept = [r for r in rows if not has_regression(r)]
        regressed = {"rechecked": checked, "dropped": len(rows) - len(kept)}
        rows = kept
    for r in rows:
        p = r["label"].get("p_chosen")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            bad.append((None, f"{r['id']}: label.p_chosen {p!r} is not a probability in [0, 1]"))
            continue
        if labels == "hard" and p == 0.5:
            ties += 1
            continue
        good.append(r)
    if not good:
        hint = (
            "every row had a regression and --drop-regressed left it out"
            if regressed and not rows
            else "the rows all had label 0.5"
            if ties
            else "every row was malformed"
        )
        raise InputError(
            f"no usable {what} pairs ({hint}); first problem: {bad[0][1] if bad else 'n/a'}", path
        )
    if what == "training" and all(r["label"]["p_chosen"] == 0.5 for r in good):
        raise InputError(
            "every label is 0.5 (no preference either way), so there is nothing to learn; "
            "check the labelling run (a judge that always hedges?) or train on human pairs",
            path,
        )
    info = {
        "path": str(path),
        "sha256": file_sha256(path),
        "rows": len(good),
        "skipped_malformed": len(bad),
        "skipped_ties": ties,
        "duplicates": stats.get("duplicates", 0),
        "label_sources": dict(Counter(str(r["label"].get("source", "unknown")) for r in good)),
        "mean_p_chosen": round(float(np.mean([r["label"]["p_chosen"] for r in good])), 4),
    }
    if regressed is not None:
        info["regressed"] = regressed
        _log(
            f"{path}: --drop-regressed leaves out {regressed['dropped']} of {regressed['rechecked']} "
            "re-checked rows (a regression in trace.regressed)"
        )
    if bad:
        _log(f"{path}: skipped {len(bad)} malformed rows (first: {bad[0][1]})")
    if ties:
        _log(f"{path}: --labels hard drops {ties} rows labelled exactly 0.5")
    return good, info


def _load_tokenizer(path: str, name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load base model {name!r} ({str(e).splitlines()[0][:160]}); pass a local model folder, "
            "or a Hugging Face id that is in the local cache (or reachable online)"
        ) from None
    if tok.pad_token is None:
        # Decoder-only bases often lack a pad token; any id works because the mask hides it,
        # and the sequence-classification head reads the last non-pad token.
        if tok.eos_token is None and tok.unk_token is None:
            raise InputError(f"base {name!r}: the tokenizer has no pad, eos or unk token to pad with")
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _default_max_length(base_path: str, model_config, tok) -> int:
    limits = [512, getattr(model_config, "max_position_embeddings", None), tok.model_max_length]
    sbert = Path(base_path) / "sentence_bert_config.json"
    if sbert.exists():
        limits.append(json.loads(sbert.read_text()).get("max_seq_length"))
    return min(int(x) for x in limits if x and x < 1_000_000)


def _log(msg: str):
    print(f"cai: {msg}", file=sys.stderr, flush=True)


def tokenize_pairs(rows: list[dict], enc: PairEncoder) -> list[dict]:
    items = []
    for r in rows:
        c, j = enc(r)
        items.append(
            {
                "chosen_ids": c,
                "rejected_ids": j,
                "p_chosen": float(r["label"]["p_chosen"]),
                "len_chosen": len(response_text(r["chosen"])),
                "len_rejected": len(response_text(r["rejected"])),
            }
        )
    return items


def length_strata(items: list[dict]) -> np.ndarray:
    """Per pair: +1 when the labelled-preferred response is the longer, -1 when it is the shorter,
    0 when neither side is preferred (p = 0.5) or both have the same length."""
    p = np.array([it["p_chosen"] for it in items], dtype=np.float64)
    d = np.array([it["len_chosen"] - it["len_rejected"] for it in items], dtype=np.float64)
    return np.sign(p - 0.5) * np.sign(d)


def balance_weights(items: list[dict]) -> np.ndarray:
    """Length-balanced pair weights (Singhal et al. 2023 balance the data; this reweights instead
    of dropping pairs): the 'preferred is longer' and 'preferred is shorter' strata get equal total
    weight, so length alone no longer predicts the label; pairs in neither stratum keep weight 1.
    Normalised to mean 1, so the learning rate means the same with and without it."""
    s = length_strata(items)
    w = np.ones(len(items))
    n_long, n_short = int((s > 0).sum()), int((s < 0).sum())
    if n_long and n_short:
        half = (n_long + n_short) / 2
        w[s > 0], w[s < 0] = half / n_long, half / n_short
    return w / w.mean()


# ----------------------------------------------------------------------------- training


def train_reward_model(cfg: TrainConfig, progress: bool = True, *, callbacks: list | None = None) -> dict:
    """Train a reward model and write a Hugging Face folder to `cfg.out`; returns the final metrics.

    `callbacks`: extra transformers TrainerCallbacks (timing, early stopping, …). The options
    are checked and the output folder claimed (cai.guard.claim_output) before any model loads.
    """
    check_config(cfg)
    with claim_output(
        cfg.out, inputs=[cfg.pairs, cfg.eval_pairs], kind="folder", marker=(CONFIG_NAME, "reward model")
    ):
        return _train_reward_model(cfg, progress, callbacks=callbacks)


def _train_reward_model(cfg: TrainConfig, progress: bool, *, callbacks: list | None) -> dict:
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    t0 = time.time()
    precision = _check_hardware(cfg)
    odin = "odin" in cfg.length_robust
    out = Path(cfg.out)
    prev = _check_out(out, cfg.resume)
    base_path, base_name = resolve_reward_base(cfg.base)
    check_model(base_path, "--base")  # safetensors, whole, with a tokenizer that fits: before loading
    tok = _load_tokenizer(base_path, base_name, cfg.trust_remote_code)
    rows, train_info = read_training_rows(
        cfg.pairs, cfg.limit, cfg.labels, "training", cfg.skip_bad, cfg.drop_regressed
    )
    eval_rows, eval_info = (None, None)
    if cfg.eval_pairs:
        eval_rows, eval_info = read_training_rows(cfg.eval_pairs, None, "soft", "evaluation", cfg.skip_bad)
    if (
        cfg.resume
        and prev
        and prev.get("data", {}).get("train", {}).get("sha256") not in (None, train_info["sha256"])
    ):
        raise InputError(
            "--resume: the training file changed since this run began; resume with the same --pairs",
            cfg.pairs,
        )

    try:
        model_config = AutoConfig.from_pretrained(
            base_path, num_labels=2 if odin else 1, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load base model {base_name!r} ({str(e).splitlines()[0][:160]})") from None
    max_length = cfg.max_length or _default_max_length(base_path, model_config, tok)
    pos_limit = getattr(model_config, "max_position_embeddings", None)
    if pos_limit and max_length > pos_limit:
        raise InputError(
            f"--max-length {max_length} exceeds the base's {pos_limit} positions; use at most {pos_limit}"
        )

    enc = PairEncoder(tok, max_length)
    train_ds = PairDataset(tokenize_pairs(rows, enc))
    strata = length_strata(train_ds.items)
    train_info["pref_longer"], train_info["pref_shorter"] = int((strata > 0).sum()), int((strata < 0).sum())
    if "balance" in cfg.length_robust:
        for it, w in zip(train_ds.items, balance_weights(train_ds.items)):
            it["weight"] = float(w)
    train_info["truncated"], enc.truncated = enc.truncated, 0
    eval_ds = None
    if eval_rows:
        items = tokenize_pairs(eval_rows, enc)
        # Evaluation order does not matter to the metrics: sort once so batches pad little.
        eval_ds = PairDataset(
            sorted(items, key=lambda it: max(len(it["chosen_ids"]), len(it["rejected_ids"])))
        )
        eval_info["truncated"] = enc.truncated
    _log(
        f"{len(train_ds)} training pairs ({train_info['truncated']} truncated to {max_length} tokens)"
        + (f", {len(eval_ds)} eval pairs" if eval_ds else "")
    )

    transformers.set_seed(cfg.seed)  # before loading: the new head's initialisation depends on it
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report would flag the new head as "missing"
    try:
        # fp32 master weights even for bf16 checkpoints (transformers 5 loads "auto" dtype by default);
        # mixed precision comes from autocast below.
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path,
            config=model_config,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load base model {base_name!r} ({str(e).splitlines()[0][:160]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    _log(
        f"base {base_name} with a new "
        f"{'2-output (quality, length; ODIN)' if odin else '1-output'} reward head"
    )
    model.config.pad_token_id = tok.pad_token_id
    if odin:
        model.config.id2label, model.config.label2id = {0: "reward", 1: "length"}, {"reward": 0, "length": 1}
    else:
        model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache in training; it also clashes with checkpointing
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        # On the CPU the step's activations, not the weights, fill memory (MiniLM, 32 sequences of
        # 256 tokens: 3.1 GB, most of it attention probabilities and their dropout, which the CPU's
        # SDPA materialises whenever dropout is on). Recomputing them layer by layer in the
        # backward pass keeps one layer's worth; dropout is replayed from the saved RNG state, so
        # losses and gradients are the same. The price is a second forward pass.
        checkpointing = not _on_gpu(cfg) and getattr(model, "supports_gradient_checkpointing", False)

    has_eval = eval_ds is not None
    keep_eval = _KeepLastEval()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
        **_checkpointing_arg(checkpointing),
        fsdp=cfg.fsdp,
        seed=cfg.seed,
        data_seed=cfg.seed,
        eval_strategy=("steps" if cfg.eval_steps else "epoch") if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,  # our columns are not the model's forward arguments
        label_names=["p_chosen", "pair_lengths"],
        dataloader_num_workers=0,
    )
    trainer = RewardModelTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        data_collator=PairCollator(tok.pad_token_id, 8 if precision != "fp32" else None),
        compute_metrics=keep_eval if has_eval else None,
        labels=cfg.labels,
        margin=cfg.margin,
        center_rewards=cfg.center_rewards,
        odin=odin,
        return_freed_memory=checkpointing and not _on_gpu(cfg),
        length_weight=cfg.length_weight,
        length_sign=-1.0 if train_info["pref_shorter"] > train_info["pref_longer"] else 1.0,
        callbacks=list(callbacks or []) + ([] if cfg.keep_checkpoints else [_SkipFinalCheckpoint()]),
    )

    resolved = asdict(cfg) | {
        "base": base_name,
        "base_path": base_path,
        "max_length": max_length,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
    }
    record = {
        "cai_version": __version__,
        "status": "training",
        "config": resolved,
        "seed": cfg.seed,
        "data": {"train": train_info, "eval": eval_info},
        "render": "chat_template" if getattr(tok, "chat_template", None) else "transcript",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a finished earlier artifact being replaced: its checkpoints go too
            for c in checkpoints(out):
                shutil.rmtree(c)
        write_json(out / CONFIG_NAME, record)

    # The Trainer prints log dicts to stdout; stdout is for data only (docs/style.md).
    with contextlib.redirect_stdout(sys.stderr):
        result = trainer.train(resume_from_checkpoint=True if cfg.resume else None)
        metrics = {k: v for k, v in result.metrics.items()}
        metrics["train_loss"] = result.training_loss
        metrics["steps"] = result.global_step
        if has_eval:
            # the end-of-epoch evaluation of the last step is the final one: do not score the eval set twice
            last = [
                h
                for h in trainer.state.log_history
                if "eval_loss" in h and h.get("step") == result.global_step
            ]
            metrics.update(
                {k: v for k, v in last[-1].items() if k.startswith("eval_")} if last else trainer.evaluate()
            )
        if trainer.seen:
            seen = np.array(trainer.seen)
            lm = length_metrics(seen[:, :2], seen[:, 2], seen[:, 3:])
            metrics.update({f"train_last_pass_{k}": v for k, v in lm.items()})
        if odin:  # ship the quality output alone: a plain 1-output reward model
            record["length_head"] = _drop_length_head(model) | {"sign": trainer.length_sign}
        trainer.save_model(str(out))  # safetensors + tokenizer + config (num_labels=1, pad id)
        if main and cfg.length_correction:
            record["length_correction"] = _fit_length_correction(
                trainer, model, tok, train_ds, keep_eval.last, metrics
            )
    # a pickle, redundant with cai_train_config.json; model hubs flag pickles, so leave none behind
    (out / "training_args.bin").unlink(missing_ok=True)

    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    metrics["wall_s"] = round(time.time() - t0, 1)
    if main:
        if not cfg.keep_checkpoints:
            for c in checkpoints(out):
                shutil.rmtree(c)
        record.update(status="done", metrics=metrics)
        write_json(out / CONFIG_NAME, record)
        (out / "README.md").write_text(_model_card(record))
    return metrics


def _checkpointing_arg(on: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing
    (4.x has only the old name)."""
    if not on:
        return {}
    names = TrainingArguments.__dataclass_fields__
    return {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": True
    }


def _model_card(rec: dict) -> str:
    c, d, m = rec["config"], rec["data"], rec.get("metrics", {})
    base_id = DEFAULT_BASE_HUB_ID if c["base"] == DEFAULT_REWARD_BASE else c["base"]
    tr = d["train"]
    sources = ", ".join(f"{k}: {v}" for k, v in tr["label_sources"].items())
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
    shown = (
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
    metric_lines = "\n".join(f"| {k} | {m[k]} |" for k in shown if k in m)
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
    yaml_base = f"base_model: {base_id}\n" if not Path(base_id).is_absolute() else ""
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
    sp = m.get("eval_spearman_reward_length", m.get("train_last_pass_spearman_reward_length"))
    where = (
        "on the eval pairs"
        if "eval_spearman_reward_length" in m
        else "on the training pairs' last pass (in-sample)"
    )
    measured = (
        f"Measured {where}: Spearman(reward, response length) = {sp:.3f}; accuracy when the preferred "
        "response is the longer "
        f"{m.get('eval_acc_pref_longer', m.get('train_last_pass_acc_pref_longer', float('nan'))):.3f}, when "
        "it is the shorter "
        f"{m.get('eval_acc_pref_shorter', m.get('train_last_pass_acc_pref_shorter', float('nan'))):.3f}."
        if sp is not None
        else "Length correlation not measured (no eval pairs)."
    )
    length_section = (
        "Length-robust training: " + "; and ".join(steps) + ".\n\n"
        if steps
        else "No length-robust training (`--length-robust none`): the reward is free to learn length.\n\n"
    ) + measured
    lc = rec.get("length_correction") or {}
    if "x" in lc:
        raw, fixed = lc["train"]["raw"], lc["train"]["corrected"]
        length_section += (
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
    elif lc.get("skipped"):
        length_section += f"\n\nNo length correction ({lc['skipped']})."
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


# ----------------------------------------------------------------------------- scoring


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
        rec = _read_marker(Path(rm_dir)) or {}
        max_length = rec.get("config", {}).get("max_length") or _default_max_length(
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
