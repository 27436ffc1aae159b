"""Reward-model training on CPU: cai's trainer against TRL's RewardTrainer, same model, data and settings.

Trains the default base (all-MiniLM-L6-v2) on the shared HH-RLHF harmless human pairs, scores the
500 dev pairs, then trains TRL's RewardTrainer on the very same token ids (cai renders and
truncates them once; TRL gets them pre-tokenised, so tokenisation differences cannot blur the
comparison) with the same batch size, learning-rate schedule, precision and seed. Prints wall
time, samples/s (pairs per second, the Trainer's own figure), pairs per CPU-second (steadier on a
shared machine), dev accuracy, and the speed ratio; writes the same text to bench/RESULTS-train.md.

    .venv/bin/python bench/bench_train.py                    # all 1,300 pairs at 128 tokens: ~12 min
                                                             # on 2 idle cores (by CPU time); 27 min
                                                             # on a loaded, shared box
    .venv/bin/python bench/bench_train.py --max-length 256   # the base's trained length (~2x longer)
    .venv/bin/python bench/bench_train.py --limit 300        # a quick look (~4 min)

Where the speed difference comes from: cai samples length-grouped batches, TRL random ones, and
both pad each batch to its longest sequence, so cai pads less; the loss, the single forward pass
over [chosen; rejected] and everything else are the same.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line  # noqa: E402

sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def padded_tokens(train_file, limit, max_length, batch_size) -> dict:
    """Tokens one epoch pushes through the model with cai's batches and with random ones (seed 0)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from cai.encode import PairEncoder
    from cai.models import default_reward_base
    from cai.records import read_pairs

    enc = PairEncoder(AutoTokenizer.from_pretrained(default_reward_base()), max_length)
    pairs = [enc(r) for r in read_pairs(train_file, limit=limit, skip_bad=True)]
    lengths = [max(len(c), len(r)) for c, r in pairs]

    def cost(order):
        batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        return sum(2 * len(b) * max(lengths[i] for i in b) for b in batches)

    torch.manual_seed(0)
    grouped = cost(get_length_grouped_indices(lengths, batch_size))
    torch.manual_seed(0)
    rand = cost(torch.randperm(len(lengths)).tolist())
    return {
        "grouped": grouped,
        "random": rand,
        "real": sum(len(c) + len(r) for c, r in pairs),
        "truncated": enc.truncated,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="training pairs (0 = all 1,300)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--dev-limit", type=int, default=0, help="dev pairs to score (0 = all 500)")
    ap.add_argument(
        "--trl-dev",
        action="store_true",
        help="also score the dev pairs with TRL's model (a check that both learn alike)",
    )
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-train.md"))
    a = ap.parse_args()

    train_file, dev_file = DATA / "train.jsonl.gz", DATA / "dev.jsonl.gz"
    if not train_file.exists():
        print(f"skipped: shared HH-RLHF data not found at {DATA} (see docs/pairs-contract.md)")
        return

    import torch
    import transformers
    from transformers import TrainerCallback

    from cai.configs import TrainConfig
    from cai.models import default_reward_base
    from cai.pairmetrics import pair_metrics
    from cai.records import read_pairs
    from cai.score import score_pairs
    from cai.train import train_reward_model

    class CpuClock(TrainerCallback):
        """CPU seconds of the training loop only (not loading, tokenising or saving)."""

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.cpu_s = time.process_time() - self.t

    limit = a.limit or None
    dev_rows = read_pairs(dev_file, limit=a.dev_limit or None, skip_bad=True)
    work = Path(tempfile.mkdtemp(prefix="cai-bench-train-"))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say("# Reward-model training benchmark (CPU)")
    say()
    say(f"command: `{' '.join(['.venv/bin/python', 'bench/bench_train.py', *sys.argv[1:]])}`")
    say(
        f"{cpu_line()}; "
        f"torch threads {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    say(
        f"data: {train_file.name} ({f'first {limit}' if limit else 'all'} pairs), "
        f"dev {dev_file.name} ({len(dev_rows)} pairs); "
        f"base all-MiniLM-L6-v2; max_length {a.max_length}, batch {a.batch_size} pairs, "
        f"lr {a.lr}, {a.epochs} epoch(s), fp32"
    )
    say()

    # -- padding: the contention-free part of the comparison -----------------------------------
    pad = padded_tokens(train_file, limit, a.max_length, a.batch_size)
    say(
        f"tokens per epoch after padding (both sides of each pair): cai (length-grouped) {pad['grouped']:,}, "
        f"TRL (random batches) {pad['random']:,}, unpadded {pad['real']:,} -> TRL computes "
        f"{pad['random'] / pad['grouped']:.2f}x the tokens; "
        f"{pad['truncated']} pairs truncated to {a.max_length}"
    )
    say()

    # -- cai ----------------------------------------------------------------------------------
    clock = CpuClock()
    t0 = time.time()
    cfg = TrainConfig(
        pairs=str(train_file),
        out=str(work / "rm-cai"),
        limit=limit,
        epochs=a.epochs,
        max_length=a.max_length,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=0,
        skip_bad=True,  # the shared train file has rows with an empty response
        save_steps=10_000,
        gradient_checkpointing=False,  # cai's CPU default is on; TRL runs without it (below)
    )
    m = train_reward_model(cfg, progress=False, callbacks=[clock])
    wall_cai = time.time() - t0
    t1 = time.time()
    acc = pair_metrics(
        score_pairs(cfg.out, dev_rows, batch_size=64), [r["label"]["p_chosen"] for r in dev_rows]
    )
    score_s = time.time() - t1
    cai_sps = m["train_samples_per_second"]
    rows_used = len(read_pairs(train_file, limit=limit, skip_bad=True))
    cai_cpu = rows_used * a.epochs / clock.cpu_s
    say("| trainer | wall (s) | train loop (s) | pairs/s | pairs per CPU-s | dev accuracy | dev margin |")
    say("|---|---|---|---|---|---|---|")
    say(
        f"| cai | {wall_cai:.0f} | {m['train_runtime']:.0f} | {cai_sps:.2f} | {cai_cpu:.2f} | "
        f"{acc['accuracy']:.3f} | {acc['margin']:.3f} |"
    )
    sys.stdout.flush()

    # -- TRL ----------------------------------------------------------------------------------
    if not a.skip_trl:
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trl import RewardConfig, RewardTrainer

        from cai.encode import PairEncoder

        base = str(default_reward_base())
        tok = AutoTokenizer.from_pretrained(base)
        enc = PairEncoder(tok, a.max_length)
        rows = read_pairs(train_file, limit=limit, skip_bad=True)
        ds = Dataset.from_list([dict(zip(("chosen_ids", "rejected_ids"), enc(r))) for r in rows])
        transformers.set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        args = RewardConfig(
            output_dir=str(work / "rm-trl"),
            per_device_train_batch_size=a.batch_size,
            num_train_epochs=a.epochs,
            learning_rate=a.lr,
            warmup_steps=0.1,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            seed=0,
            # TRL's defaults differ from cai's here; set them equal (speed is what is compared)
            bf16=False,
            gradient_checkpointing=False,
            disable_dropout=False,
            max_length=None,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=10,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        clock_trl = CpuClock()
        t2 = time.time()
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock_trl]
        )
        res = trainer.train()
        wall_trl = time.time() - t2
        trl_sps = res.metrics["train_samples_per_second"]
        trl_cpu = len(rows) * a.epochs / clock_trl.cpu_s
        trl_acc = ""
        if a.trl_dev:
            trainer.save_model(str(work / "rm-trl"))
            t = pair_metrics(
                score_pairs(work / "rm-trl", dev_rows, batch_size=64, max_length=a.max_length),
                [r["label"]["p_chosen"] for r in dev_rows],
            )
            trl_acc = f"{t['accuracy']:.3f} | {t['margin']:.3f}"
        else:
            trl_acc = "— | —"
        say(
            f"| TRL RewardTrainer | {wall_trl:.0f} | {res.metrics['train_runtime']:.0f} | "
            f"{trl_sps:.2f} | {trl_cpu:.2f} | {trl_acc} |"
        )
        say()
        say(
            f"speed ratio cai / TRL: {cai_sps / trl_sps:.2f}x pairs/s (wall), "
            f"{cai_cpu / trl_cpu:.2f}x pairs per CPU-second"
        )
    say()
    say(
        f"cai wall time includes loading, tokenising ({rows_used} pairs, {m['steps']} steps) "
        "and saving the artifact; "
        f"dev scoring took {score_s:.0f}s. Load average at end {os.getloadavg()[0]:.1f} "
        "(other jobs share these cores: pairs per CPU-second is the steadier comparison)."
    )
    say(
        "Reference points (docs/judge.md): shorter-answer rule 55.3%; "
        "frozen MiniLM + linear head on 1,300 pairs ~60%; reward models on the full 42k human pairs ~72-74%."
    )
    # the recipe sweep (bench_train_sweep.py) keeps its notes and table below its markers: keep them
    res = Path(a.results)
    old = res.read_text() if res.exists() else ""
    keep = old[old.index("<!-- SWEEP") :] if "<!-- SWEEP" in old else ""
    res.write_text("\n".join(lines) + "\n" + ("\n" + keep if keep else ""))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwritten to {a.results}")


if __name__ == "__main__":
    main()
