"""The study's up-front cost estimate: tokens per step from the data, seconds from a timing
probe of each model on this machine. It never stops a study: a failed probe is reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cai.fmt import duration
from cai.records import response_text, write_json
from cai.steps import content_key


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

    key = content_key(
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
    if kind == "judge-llamacpp":
        return _probe_llamacpp(path, seq_len)
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
        model = cls.from_pretrained(path, dtype=pick_dtype(dev), use_safetensors=True, **kw).to(dev).eval()
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


def _probe_llamacpp(path: str, seq_len: int) -> float:
    """Prompt tokens per second of the llama.cpp engine: 4 distinct prompts of ~seq_len tokens,
    next-token log-probs only (what the judge asks of it)."""
    from cai.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(path, batch_size=4)
    words = " ".join(f"w{i % 97}" for i in range(max(8, seq_len // 2)))
    prompts = [[{"role": "user", "content": f"{k} {words}"}] for k in range(5)]
    b.option_logprobs(prompts[:1], ["A", "B"])  # warm-up
    before = b.stats["computed_tokens"]
    t0 = time.time()
    b.option_logprobs(prompts[1:], ["A", "B"])
    return (b.stats["computed_tokens"] - before) / (time.time() - t0)


TRAIN_COST = 3.5  # a training token costs ~3x a forward one (backward ≈ 2 forwards) plus the optimizer
JUDGE_OVERHEAD_TOKENS = 150  # the compare template, the question and the chat template's markers


def estimate(
    cfg, train: list[dict], test_n: int, test_chars: float, gen_n: int, n_principles: int = 1
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
    cap = cfg.train.max_length or 256
    resp = [
        min(cap, (len(json.dumps(r["prompt"])) + len(response_text(r[k]))) / 4)
        for r in train
        for k in ("chosen", "rejected")
    ]
    train_tokens = int(sum(resp) * cfg.train.epochs)
    gen_tokens = int(np.mean(resp) * 2 * gen_n * cfg.train.epochs) if resp else 0
    per_seq = min(cap, test_chars / 4)
    n_models = 3 if cfg.generated_pairs else 2
    probed = min(test_n, cfg.eval.probe_limit or test_n) if cfg.eval.probes else 0
    eval_tokens = int((2 * test_n + 4 * probed) * per_seq * n_models)
    est = {
        "tokens": {"judge": judge_tokens, "train_each": train_tokens, "eval": eval_tokens},
        "params": {},
        "tokens_per_s": {},
        "seconds": {},
    }
    s, speed, problems = est["seconds"], est["tokens_per_s"], []
    cache = Path(cfg.out) / "steps" / "speed.json"
    from cai.backends import resolve_backend

    backend = resolve_backend(
        cfg.backend, cfg.model, device=cfg.device, base_url=cfg.backend_options.get("base_url")
    )
    if backend in ("hf", "llamacpp"):
        try:
            if backend == "hf":
                path, kind = resolve_model(cfg.model)[0], "judge"
                est["params"]["judge"] = _param_count(path)
            else:
                from cai.backends.llamacpp import resolve_gguf

                path, kind = resolve_gguf(cfg.model)[0], "judge-llamacpp"
            speed["judge"] = _cached_speed(cache, path, kind, cfg.device, min(judge_len, 1024), 1)
            s["label"] = judge_tokens / speed["judge"]
            if cfg.cot:  # decoding ~128 reasoning tokens per order is memory-bound: ~10x a prompt token
                s["label"] += len(train) * orders * 128 * 10 / speed["judge"]
        except Exception as e:  # an estimate must never stop the study
            problems.append(f"judge probe failed ({str(e).splitlines()[0][:80]})")
    try:
        path = resolve_reward_base(cfg.train.base)[0]
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
    if backend not in ("hf", "llamacpp"):
        how += "; the judge runs on a server, so its time is not estimated (tokens only)"
    if problems:
        how += "; " + "; ".join(problems)
    est["how"] = how
    return est


def estimate_lines(est: dict) -> list[str]:
    t, s = est["tokens"], est["seconds"]
    lines = [
        f"judge: ~{t['judge']:,} prompt tokens" + (f", ~{duration(s.get('label'))}" if "label" in s else ""),
        f"reward models: ~{t['train_each']:,} training tokens each"
        + (f", ~{duration(s.get('train-human'))} each" if "train-human" in s else ""),
        f"evaluation: ~{t['eval']:,} tokens" + (f", ~{duration(s.get('eval'))}" if "eval" in s else ""),
        f"total ~{duration(est['total_s'])} (estimated from {est['how']})",
    ]
    return lines
