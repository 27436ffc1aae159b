"""`cai train`: a reward model trained on a pairs file and written as a Hugging Face folder.

The objective and the Trainer subclass are cai/reward.py; how pairs become tokens is
cai/encode.py; the folder's record and model card are cai/artifact.py. This module is the stage:
check the options and the hardware, read and weigh the pairs, load the base, train, fit the
length correction, and write the artifact.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import TrainingArguments

from cai import __version__
from cai.artifact import CONFIG_NAME, check_out, checkpoints, model_card
from cai.configs import LENGTH_ROBUST, TrainConfig
from cai.encode import PairEncoder, default_max_length, tokenize_pairs
from cai.errors import InputError
from cai.guard import claim_output
from cai.models import check_model, resolve_reward_base
from cai.options import check_config
from cai.pairmetrics import length_metrics, pair_metrics
from cai.recheck import has_regression
from cai.records import file_sha256, read_pairs, write_json
from cai.reward import (
    KeepLastEval,
    PairCollator,
    PairDataset,
    RewardModelTrainer,
    SkipFinalCheckpoint,
    drop_length_head,
)
from cai.score import score_sequences


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


def _log(msg: str):
    print(f"cai: {msg}", file=sys.stderr, flush=True)


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
    """`cai train`'s steps, in order: every check before the model loads, then train and write."""
    t0 = time.time()
    precision = _check_hardware(cfg)
    odin = "odin" in cfg.length_robust
    out = Path(cfg.out)
    prev = check_out(out, cfg.resume)
    base_path, base_name = resolve_reward_base(cfg.base)
    check_model(base_path, "--base")  # safetensors, whole, with a tokenizer that fits: before loading
    tok = _load_tokenizer(base_path, base_name, cfg.trust_remote_code)
    rows, train_info, eval_rows, eval_info = _read_data(cfg, prev)
    model_config, max_length = _base_config(cfg, base_path, base_name, tok, odin)
    train_ds, eval_ds = _datasets(cfg, rows, eval_rows, PairEncoder(tok, max_length), train_info, eval_info)
    model = _load_model(cfg, base_path, base_name, model_config, tok, odin)
    checkpointing = _use_checkpointing(cfg, model)
    keep_eval = KeepLastEval()
    trainer = _trainer(
        cfg,
        model,
        tok,
        train_ds,
        eval_ds,
        precision=precision,
        checkpointing=checkpointing,
        length_sign=-1.0 if train_info["pref_shorter"] > train_info["pref_longer"] else 1.0,
        keep_eval=keep_eval,
        progress=progress,
        callbacks=callbacks,
    )
    resolved = {
        "base": base_name,
        "base_path": base_path,
        "max_length": max_length,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
    }
    record = _record(cfg, tok, resolved, train_info, eval_info)
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a finished earlier artifact being replaced: its checkpoints go too
            for c in checkpoints(out):
                shutil.rmtree(c)
        write_json(out / CONFIG_NAME, record)
    metrics = _run_trainer(cfg, trainer, model, tok, train_ds, keep_eval, record, odin, main)
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    metrics["wall_s"] = round(time.time() - t0, 1)
    if main:
        if not cfg.keep_checkpoints:
            for c in checkpoints(out):
                shutil.rmtree(c)
        record.update(status="done", metrics=metrics)
        write_json(out / CONFIG_NAME, record)
        (out / "README.md").write_text(model_card(record))
    return metrics


def _read_data(
    cfg: TrainConfig, prev: dict | None
) -> tuple[list[dict], dict, list[dict] | None, dict | None]:
    """The training rows and the eval rows, each with its data record; a resume must see the
    training file it began with."""
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
    return rows, train_info, eval_rows, eval_info


def _base_config(cfg: TrainConfig, base_path: str, base_name: str, tok, odin: bool):
    """The base's config with a 1-output head (2 with ODIN), and the max length it allows."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(
            base_path, num_labels=2 if odin else 1, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load base model {base_name!r} ({str(e).splitlines()[0][:160]})") from None
    max_length = cfg.max_length or default_max_length(base_path, model_config, tok)
    pos_limit = getattr(model_config, "max_position_embeddings", None)
    if pos_limit and max_length > pos_limit:
        raise InputError(
            f"--max-length {max_length} exceeds the base's {pos_limit} positions; use at most {pos_limit}"
        )
    return model_config, max_length


def _datasets(cfg: TrainConfig, rows, eval_rows, enc: PairEncoder, train_info: dict, eval_info: dict | None):
    """Tokenised training pairs (length-balanced weights with `balance`) and eval pairs; the
    records get the length strata and the truncation counts."""
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
        f"{len(train_ds)} training pairs ({train_info['truncated']} truncated to {enc.max_length} tokens)"
        + (f", {len(eval_ds)} eval pairs" if eval_ds else "")
    )
    return train_ds, eval_ds


def _load_model(cfg: TrainConfig, base_path: str, base_name: str, model_config, tok, odin: bool):
    """The base with a new reward head (seeded), in fp32, set up for training."""
    import transformers
    from transformers import AutoModelForSequenceClassification

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
    return model


def _use_checkpointing(cfg: TrainConfig, model) -> bool:
    """--gradient-checkpointing, or by default: on for the CPU where the model supports it."""
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        # On the CPU the step's activations, not the weights, fill memory (MiniLM, 32 sequences of
        # 256 tokens: 3.1 GB, most of it attention probabilities and their dropout, which the CPU's
        # SDPA materialises whenever dropout is on). Recomputing them layer by layer in the
        # backward pass keeps one layer's worth; dropout is replayed from the saved RNG state, so
        # losses and gradients are the same. The price is a second forward pass.
        checkpointing = not _on_gpu(cfg) and getattr(model, "supports_gradient_checkpointing", False)
    return checkpointing


def _trainer(
    cfg: TrainConfig,
    model,
    tok,
    train_ds,
    eval_ds,
    *,
    precision: str,
    checkpointing: bool,
    length_sign: float,
    keep_eval: KeepLastEval,
    progress: bool,
    callbacks: list | None,
) -> RewardModelTrainer:
    """transformers' TrainingArguments from the config, and the reward-model Trainer over them."""
    has_eval = eval_ds is not None
    args = TrainingArguments(
        output_dir=str(Path(cfg.out)),
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
    return RewardModelTrainer(
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
        odin="odin" in cfg.length_robust,
        return_freed_memory=checkpointing and not _on_gpu(cfg),
        length_weight=cfg.length_weight,
        length_sign=length_sign,
        callbacks=list(callbacks or []) + ([] if cfg.keep_checkpoints else [SkipFinalCheckpoint()]),
    )


def _record(cfg: TrainConfig, tok, resolved: dict, train_info: dict, eval_info: dict | None) -> dict:
    """cai_train_config.json as training starts: the config (with what was resolved: base, max
    length, precision, checkpointing), the data and the versions."""
    import transformers

    return {
        "cai_version": __version__,
        "status": "training",
        "config": asdict(cfg) | resolved,
        "seed": cfg.seed,
        "data": {"train": train_info, "eval": eval_info},
        "render": "chat_template" if getattr(tok, "chat_template", None) else "transcript",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _run_trainer(
    cfg: TrainConfig, trainer, model, tok, train_ds, keep_eval, record: dict, odin: bool, main: bool
):
    """Run the Trainer, gather the final metrics, save the model (the quality head alone with
    ODIN) and fit the length correction; returns the metrics (unrounded)."""
    out = Path(cfg.out)
    # The Trainer prints log dicts to stdout; stdout is for data only (docs/style.md).
    with contextlib.redirect_stdout(sys.stderr):
        result = trainer.train(resume_from_checkpoint=True if cfg.resume else None)
        metrics = {k: v for k, v in result.metrics.items()}
        metrics["train_loss"] = result.training_loss
        metrics["steps"] = result.global_step
        if trainer.eval_dataset is not None:
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
            record["length_head"] = drop_length_head(model) | {"sign": trainer.length_sign}
        trainer.save_model(str(out))  # safetensors + tokenizer + config (num_labels=1, pad id)
        if main and cfg.length_correction:
            record["length_correction"] = _fit_length_correction(
                trainer, model, tok, train_ds, keep_eval.last, metrics
            )
    # a pickle, redundant with cai_train_config.json; model hubs flag pickles, so leave none behind
    (out / "training_args.bin").unlink(missing_ok=True)
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
