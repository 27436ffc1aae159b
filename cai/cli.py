"""The `cai` command line: parse options, call one stage function, print a one-line summary.

Stage modules never import click; they raise cai.errors.CaiError, which becomes a one-line
message and exit code 2 here. Heavy imports (torch, transformers) happen inside the stage
functions so `cai --help` is instant.
"""

from __future__ import annotations

import functools
import sys

import click

from cai import __version__
from cai.errors import CaiError


def _fail(msg: str):
    click.echo(f"Error: {msg}", err=True)
    sys.exit(2)


def handle_errors(fn):
    """Library errors -> 'Error: ...' on stderr, exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CaiError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("\ncai: interrupted; rows written so far are kept — rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


# -- options several commands share ----------------------------------------------------------

def model_options(fn):
    opts = [
        click.option("--model", "-m", default=None, help="HF id or local folder (hf), or provider:model (langchain). Default: the embedded SmolLM2-135M-Instruct."),
        click.option("--backend", type=click.Choice(["hf", "langchain"]), default="hf", show_default=True, help="Model backend."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per forward pass (hf) or requests in flight (langchain)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."),
        click.option("--trust-remote-code", is_flag=True, help="Allow a model's own Python code to run (off by default)."),
        click.option("--base-url", default=None, help="langchain: an OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM, TGI, llama.cpp)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def backend_kwargs(backend, batch_size, device, trust_remote_code, base_url) -> dict:
    if backend == "hf":
        return dict(batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
    return dict(batch_size=batch_size, base_url=base_url)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cai")
def cli():
    """cai: Constitutional-AI feedback — critique/revision data, AI preference labels, reward models.

    \b
    Quick start:
      cai constitution check constitutions/harmless
      cai generate --constitution constitutions/harmless --prompts prompts.jsonl --out outputs/pairs.jsonl
      cai label --pairs pairs.jsonl --constitution constitutions/harmless --out outputs/labelled.jsonl
      cai train --pairs outputs/labelled.jsonl --out outputs/rm-ai
      cai eval --rm outputs/rm-ai --pairs test.jsonl --out outputs/report
    """


# -- constitution ------------------------------------------------------------------------------

@cli.group()
def constitution():
    """Inspect and validate constitution folders."""


@constitution.command("check")
@click.argument("folder", type=click.Path())
@handle_errors
def constitution_check(folder):
    """Validate a constitution folder and print one rendered example of each template.

    \b
    Example:
      cai constitution check constitutions/harmless
    """
    from cai.constitution import examples, load_constitution

    c = load_constitution(folder)
    click.echo(f"{c.name}: {len(c.principles)} principles, {len(c.fewshot)} few-shot examples, sha256 {c.sha256[:12]}")
    click.echo(f"principles: {', '.join(c.ids)}")
    for name, msgs in examples(c).items():
        click.echo(f"\n=== templates/{name}.jinja ===")
        for m in msgs:
            click.echo(f"[{m['role']}] {m['content']}")
    click.echo("\nOK")


def _principles_option(ctx, param, value):
    if value is None or str(value).lower() == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise click.BadParameter(f"{value!r}: pass a number of principles (1, 2, ...) or 'all'")
    return k


# -- generate ----------------------------------------------------------------------------------

@cli.command()
@click.option("--constitution", "constitution_dir", required=True, type=click.Path(), help="Constitution folder.")
@click.option("--prompts", required=True, type=click.Path(), help=".jsonl/.jsonl.gz (prompt, id), .txt (one per line) or HH-RLHF rows.")
@click.option("--out", required=True, type=click.Path(), help="Pairs JSONL to write (appended and resumable by id).")
@model_options
@click.option("--rounds", type=int, default=None, help="Critique -> revision rounds (default: the constitution's, else 2).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--limit", type=int, default=None, help="Only the first N prompts.")
@click.option("--chunk-size", type=int, default=None, help="Prompts per checkpoint (default 4x batch size); a kill loses at most one chunk.")
@click.option("--early-stop/--no-early-stop", default=True, show_default=True, help="Stop a prompt's loop when the critique finds nothing to fix.")
@click.option("--pair-mode", type=click.Choice(["revision", "samples"]), default="revision", show_default=True,
              help="revision: initial response vs final revision; samples: two sampled responses (CAI RL stage).")
@click.option("--label/--no-label", default=True, show_default=True,
              help="Judge every pair against the constitution (AI label). --no-label keeps revision > initial, p_chosen = 1.")
@click.option("--principles", "judge_principles", default="1", show_default=True, callback=_principles_option,
              help="Principles the judge averages over per pair: K (a seeded draw per pair) or 'all'.")
@click.option("--overwrite", is_flag=True, help="Start the output file afresh instead of resuming.")
@handle_errors
def generate(constitution_dir, prompts, out, model, backend, batch_size, device, trust_remote_code, base_url,
             rounds, seed, max_new_tokens, temperature, limit, chunk_size, early_stop, pair_mode, label,
             judge_principles, overwrite):
    """Run critique -> revision loops and write preference pairs.

    \b
    Example:
      cai generate --constitution constitutions/harmless \\
          --prompts constitutions/harmless/prompts.jsonl --out outputs/pairs.jsonl --rounds 2 --seed 0
    """
    from cai.revise import GenerateConfig, run_generate

    cfg = GenerateConfig(
        constitution=constitution_dir, prompts=prompts, out=out, model=model, backend=backend,
        backend_options=backend_kwargs(backend, batch_size, device, trust_remote_code, base_url),
        rounds=rounds, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, limit=limit,
        chunk_size=chunk_size, early_stop=early_stop, overwrite=overwrite, pair_mode=pair_mode, label=label,
        judge_principles=judge_principles,
    )
    summary = run_generate(cfg)
    click.echo(summary.line(), err=True)


# -- label (issue 3: feedback.py) --------------------------------------------------------------
@cli.command()
@click.option("--pairs", required=True, type=click.Path(), help="Pairs to label: cai rows, TRL preference rows or raw HH-RLHF (.jsonl/.jsonl.gz).")
@click.option("--constitution", "constitution_dir", required=True, type=click.Path(), help="Constitution folder (its compare template and principles judge).")
@click.option("--out", required=True, type=click.Path(), help="Labelled pairs JSONL (appended and resumable by id); <out-stem>.summary.json is written beside it.")
@model_options
@click.option("--principles", default="1", show_default=True, callback=_principles_option, help="Principles averaged per pair: K (a seeded draw per pair) or 'all'.")
@click.option("--cot", is_flag=True, help="Chain of thought: the judge reasons first, then its answer probabilities are clamped to --clamp.")
@click.option("--clamp", nargs=2, type=float, default=(0.4, 0.6), show_default=True, help="With --cot: the band each probability is clamped to (the CAI paper's 40-60%).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="With --cot: length of the reasoning.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the per-pair principle draw.")
@click.option("--limit", type=int, default=None, help="Only the first N pairs.")
@click.option("--chunk-size", type=int, default=16, show_default=True, help="Pairs per checkpoint; a kill loses at most one chunk.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed rows (counted and reported) instead of stopping at the first.")
@click.option("--overwrite", is_flag=True, help="Start the output file afresh instead of resuming.")
@handle_errors
def label(pairs, constitution_dir, out, model, backend, batch_size, device, trust_remote_code, base_url,
          principles, cot, clamp, max_new_tokens, seed, limit, chunk_size, skip_bad, overwrite):
    """Label preference pairs with the constitution as judge (AI feedback).

    Keeps each row's orientation, writes the judge's probability that `chosen` is better into
    `label` (both presentation orders under `label.judge.orders`) and moves the old label to
    `label.prior`, so agreement with human labels is read straight off the file.

    \b
    Examples:
      cai label --pairs pairs.jsonl --constitution constitutions/harmless --out outputs/labelled.jsonl
      cai label --pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz \\
          --constitution constitutions/harmless --out outputs/dev-ai.jsonl --principles 3
    """
    from cai.feedback import LabelConfig, run_label

    cfg = LabelConfig(
        pairs=pairs, constitution=constitution_dir, out=out, model=model, backend=backend,
        backend_options=backend_kwargs(backend, batch_size, device, trust_remote_code, base_url),
        principles=principles, cot=cot, clamp=tuple(clamp), max_new_tokens=max_new_tokens, seed=seed,
        limit=limit, chunk_size=chunk_size, skip_bad=skip_bad, overwrite=overwrite,
    )
    summary = run_label(cfg)
    for line in summary.lines():
        click.echo(line, err=True)


# -- train / score (issue 4: reward.py) ---------------------------------------------------------
@cli.command()
@click.option("--pairs", required=True, type=click.Path(), help="Pairs: our rows (label.p_chosen), TRL rows or raw HH-RLHF; .jsonl/.jsonl.gz.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the reward model (a standard Hugging Face folder).")
@click.option("--base", default=None, help="HF id or folder of the backbone. Default: the embedded all-MiniLM-L6-v2.")
@click.option("--labels", type=click.Choice(["soft", "hard"]), default="soft", show_default=True, help="soft: train on p_chosen; hard: on p rounded (0.5 rows dropped).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-length", type=int, default=None, help="Tokens per conversation+response (default: the base's limit, at most 512).")
@click.option("--eval-pairs", type=click.Path(), default=None, help="Pairs to evaluate on each epoch (accuracy, mean margin).")
@click.option("--limit", type=int, default=None, help="Only the first N valid pairs.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Pairs per device per step.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Peak learning rate.")
@click.option("--margin", type=float, default=0.0, show_default=True, help="Margin scaled by label strength, m·|2p-1|.")
@click.option("--center-rewards", type=float, default=0.0, show_default=True, help="Weight of the reward-centering term (TRL suggests 0.01).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bf16", "precision", flag_value="bf16", help="bf16 mixed precision (GPU only).")
@click.option("--fp16", "precision", flag_value="fp16", help="fp16 mixed precision (GPU only).")
@click.option("--fp32", "precision", flag_value="fp32", help="Full precision even on a GPU.")
@click.option("--gradient-checkpointing", is_flag=True, help="Save memory at the cost of compute.")
@click.option("--fsdp", default="", help="FSDP mode for multi-GPU runs, e.g. 'full_shard auto_wrap'.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--save-steps", type=int, default=200, show_default=True, help="Checkpoint every N steps (for --resume).")
@click.option("--max-steps", type=int, default=-1, help="Stop after N steps (smoke tests).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep checkpoint-* folders after the run finishes.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the base model's own Python code to run.")
@handle_errors
def train(pairs, out, base, labels, epochs, max_length, eval_pairs, limit, batch_size, grad_accum, lr, margin,
          center_rewards, seed, precision, gradient_checkpointing, fsdp, device, save_steps, max_steps, resume,
          keep_checkpoints, trust_remote_code):
    """Train a reward model on soft AI labels or human labels.

    Writes a standard Hugging Face folder (safetensors, tokenizer, model card,
    cai_train_config.json) that loads with AutoModelForSequenceClassification.

    \b
    Examples:
      cai train --pairs outputs/labelled.jsonl --out outputs/rm-ai
      cai train --pairs ../shared/data/hh-rlhf-harmless/train.jsonl.gz --out outputs/rm-human \\
          --eval-pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz
      accelerate launch --multi_gpu -m cai train --pairs labelled.jsonl --base Qwen/Qwen2.5-1.5B --out outputs/rm
    """
    from cai.reward import TrainConfig, train_reward_model

    cfg = TrainConfig(
        pairs=pairs, out=out, base=base, labels=labels, epochs=epochs, max_length=max_length, eval_pairs=eval_pairs,
        limit=limit, batch_size=batch_size, grad_accum=grad_accum, lr=lr, margin=margin, center_rewards=center_rewards,
        seed=seed, precision=precision or "auto", gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
        device=device, save_steps=save_steps, max_steps=max_steps, resume=resume, keep_checkpoints=keep_checkpoints,
        trust_remote_code=trust_remote_code,
    )
    m = train_reward_model(cfg)
    ev = f", eval accuracy {m['eval_accuracy']:.3f}, margin {m['eval_margin']:.3f}" if "eval_accuracy" in m else ""
    click.echo(f"cai: reward model -> {out} (train loss {m['train_loss']:.4f}{ev}, {m['wall_s']:.0f}s)", err=True)


@cli.command()
@click.option("--rm", "rm_dir", required=True, type=click.Path(), help="Reward-model folder (from `cai train`, or any 1-output HF classifier).")
@click.option("--pairs", required=True, type=click.Path(), help="Pairs to score (any format `cai train` reads).")
@click.option("--out", required=True, help="JSONL of per-row rewards (id, r_chosen, r_rejected, margin); '-' for stdout.")
@click.option("--limit", type=int, default=None, help="Only the first N valid pairs.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@handle_errors
def score(rm_dir, pairs, out, limit, batch_size, device):
    """Score pairs with a reward model: one row of rewards per pair.

    \b
    Example:
      cai score --rm outputs/rm-human --pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz --out outputs/dev-scores.jsonl
    """
    from cai.reward import run_score

    s = run_score(rm_dir, pairs, out, limit, batch_size=batch_size, device=device)
    acc = f", accuracy vs labels {s['accuracy']:.3f} on {s['labelled']}" if s["labelled"] else ""
    click.echo(
        f"cai: scored {s['pairs']} pairs -> {out} ({s['skipped']} skipped, {s['truncated']} truncated{acc})", err=True
    )


# -- eval / compare (issue 5: evaluate.py) ------------------------------------------------------
def eval_options(fn):
    """Options `eval` and `compare` share: how the report's numbers are computed."""
    opts = [
        click.option("--shift-pairs", type=click.Path(), default=None, help="Pairs from another source (distribution-shift probe)."),
        click.option("--bootstrap", type=int, default=2000, show_default=True, help="Bootstrap resamples per interval."),
        click.option("--probes/--no-probes", default=True, show_default=True, help="Robustness probes (length, refusal, formatting)."),
        click.option("--probe-limit", type=int, default=200, show_default=True, help="Refusal/format probes score 4 extra responses per pair: on the first N pairs only (0 = all)."),
        click.option("--rm-batch-size", type=int, default=32, show_default=True, help="Sequences per forward pass when scoring."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@cli.command("eval")
@click.option("--rm", "rms", required=True, multiple=True, type=click.Path(), help="Reward-model folder; repeat to compare several.")
@click.option("--name", "names", multiple=True, help="Display name per --rm, in the same order (default: folder names).")
@click.option("--pairs", required=True, type=click.Path(), help="Test pairs: our rows, TRL rows or raw HH-RLHF.")
@click.option("--out", required=True, type=click.Path(), help="Report folder: metrics.json, report.md, report.html, *.png.")
@click.option("--limit", type=int, default=None, help="Only the first N test pairs (and N shift pairs).")
@eval_options
@click.option("--max-length", type=int, default=None, help="Tokens per sequence (default: what each model was trained with).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@handle_errors
def eval_cmd(rms, names, pairs, out, limit, shift_pairs, bootstrap, probes, probe_limit, rm_batch_size, max_length,
             device, seed):
    """Evaluate reward models on preference pairs: accuracy, calibration, paired tests, probes.

    Writes metrics.json, report.md, a self-contained report.html and PNG plots. Trivial
    baselines (always-first, shorter answer, longer answer) are in the same table.

    \b
    Example:
      cai eval --rm outputs/rm-ai --rm outputs/rm-human \\
          --pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz --out outputs/report
    """
    from cai.evaluate import EvalConfig, run_eval, summary_line

    cfg = EvalConfig(rms=list(rms), names=list(names) or None, pairs=pairs, out=out, limit=limit,
                     shift_pairs=shift_pairs, batch_size=rm_batch_size, max_length=max_length, device=device,
                     bootstrap=bootstrap, seed=seed, probes=probes, probe_limit=probe_limit or None)
    metrics = run_eval(cfg)
    click.echo(summary_line(metrics, out), err=True)


@cli.command()
@click.option("--human-train", required=True, type=click.Path(), help="Human-labelled training pairs (raw HH-RLHF works).")
@click.option("--test", required=True, type=click.Path(), help="Human-labelled test pairs.")
@click.option("--constitution", "constitution_dir", required=True, type=click.Path(), help="The judge's constitution folder.")
@click.option("--out", required=True, type=click.Path(), help="Study folder: report files and the steps/ cache.")
@model_options
@click.option("--base", default=None, help="Reward-model base for every RM (default: the embedded all-MiniLM-L6-v2).")
@click.option("--limit", type=int, default=None, help="Only the first N training pairs (and N test pairs, unless --test-limit).")
@click.option("--test-limit", type=int, default=None, help="Only the first N test pairs.")
@click.option("--generated-pairs", type=click.Path(), default=None, help="`cai generate` pairs: train a third RM on them.")
@click.option("--principles", type=int, default=1, show_default=True, help="Principles the judge averages over per pair.")
@click.option("--cot", is_flag=True, help="The judge reasons before answering (slower).")
@click.option("--labels", type=click.Choice(["soft", "hard"]), default="soft", show_default=True, help="Loss labels for every RM.")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Reward-model peak learning rate.")
@click.option("--max-length", type=int, default=None, help="RM tokens per sequence (default: the base's, at most 512).")
@click.option("--train-batch-size", type=int, default=16, show_default=True, help="RM training pairs per step.")
@eval_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the up-front estimate of tokens and time, then stop.")
@handle_errors
def compare(human_train, test, constitution_dir, out, model, backend, batch_size, device, trust_remote_code, base_url,
            base, limit, test_limit, generated_pairs, principles, cot, labels, epochs, lr, max_length, train_batch_size,
            shift_pairs, bootstrap, probes, probe_limit, rm_batch_size, seed, dry_run):
    """The study: AI-label the human train pairs, train an AI-label and a human-label
    reward model alike, evaluate both on the test pairs, and report.

    The judge never sees the human labels. Every step is cached by content hash under
    OUT/steps/, so a rerun after a crash, or with one setting changed, redoes only what
    changed. An estimate of tokens and time is printed first (--dry-run stops there).

    \b
    Example (about 20 minutes on 2 busy CPU cores with the default models):
      cai compare --human-train ../shared/data/hh-rlhf-harmless/train.jsonl.gz \\
          --test ../shared/data/hh-rlhf-harmless/dev.jsonl.gz \\
          --constitution constitutions/harmless --out outputs/study \\
          --limit 100 --test-limit 300 --probe-limit 100
    """
    from cai.compare import CompareConfig, command_line, run_compare, summary_line

    cfg = CompareConfig(
        human_train=human_train, test=test, constitution=constitution_dir, out=out, model=model, backend=backend,
        backend_options=backend_kwargs(backend, batch_size, device, trust_remote_code, base_url), base=base,
        limit=limit, test_limit=test_limit, generated_pairs=generated_pairs, shift_pairs=shift_pairs,
        principles=principles, cot=cot, labels=labels, epochs=epochs, lr=lr, max_length=max_length,
        train_batch_size=train_batch_size, score_batch_size=rm_batch_size, seed=seed, bootstrap=bootstrap, probes=probes,
        probe_limit=probe_limit or None, device=device,
        dry_run=dry_run, command=command_line(),
    )
    metrics = run_compare(cfg)
    click.echo(summary_line(metrics, out), err=True)
# EVAL-COMMANDS-END


def main():
    cli(prog_name="cai")


if __name__ == "__main__":
    main()
