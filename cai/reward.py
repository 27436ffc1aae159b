"""The reward objective: the soft-label Bradley–Terry loss in a transformers `Trainer` subclass.

The objective is the soft-label Bradley–Terry loss on label.p_chosen (`compute_loss`). Everything
else (checkpoints, resume, gradient accumulation, mixed precision, DDP/FSDP under `accelerate
launch` / `torchrun`) is transformers' Trainer, so this module holds only what is specific to
reward models: how a batch is laid out (`PairCollator`), the loss (with ODIN's length head), what
the Trainer measures (`reward_metrics`) and the CPU memory habit of checkpointed training steps.
The `cai train` stage around it is cai/train.py.

Imports torch and transformers at the top (the Trainer subclass needs them); cli.py imports the
stage modules inside the commands, so `cai --help` stays instant.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from cai.encode import pad_batch
from cai.errors import InputError
from cai.pairmetrics import length_metrics, pair_metrics


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


class SkipFinalCheckpoint(TrainerCallback):
    """The artifact is saved right after the last step, so the Trainer's end-of-training checkpoint
    (optimizer state included: ~3x the model) would be written only to be deleted."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False


def reward_metrics(pred) -> dict:
    """Trainer's compute_metrics: predictions are the (n, 2) rewards, label_ids (p_chosen, lengths)."""
    labels = pred.label_ids
    p, lengths = labels if isinstance(labels, (tuple, list)) else (labels, None)
    m = pair_metrics(pred.predictions, p)
    if lengths is not None:
        m.update(length_metrics(pred.predictions, p, lengths))
    return m


class KeepLastEval:
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


def drop_length_head(model) -> dict:
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
