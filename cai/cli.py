"""The `cai` command line: parse options, call one stage function, print a one-line summary.

Stage modules never import click; they raise cai.errors.CaiError, which becomes a one-line
message and exit code 2 here. Heavy imports (torch, transformers) happen inside the stage
functions so `cai --help` is instant.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys

import click

from cai import __version__
from cai.configs import (
    EVAL_IN_STUDY,
    TRAIN_RENAMED,
    TRAIN_SET_BY_STUDY,
    AgreementConfig,
    CalibrateConfig,
    CompareConfig,
    EvalConfig,
    GenerateConfig,
    LabelConfig,
    ModelOptions,
    ReviewConfig,
    ScoreConfig,
    ServeConfig,
    TrainConfig,
)
from cai.errors import CaiError
from cai.options import check_config, click_options, pick


def _fail(msg: str):
    click.echo(f"Error: {msg}", err=True)
    sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the run unwinds as on Ctrl-C (a row being written is
    rolled back, locks and temp files go) and exits 143."""


def _terminate(signum, frame):
    raise Terminated


# a disk that refuses a write, where no stage turned it into an OutputError first
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def handle_errors(fn):
    """Library errors -> 'Error: ...' on stderr, exit 2, no traceback. Ctrl-C exits 130 and
    SIGTERM 143 (interrupted is not success), after the stage has kept what it wrote."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            old = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (an embedding caller): leave signals alone
            old = None
        try:
            return fn(*args, **kwargs)
        except CaiError as e:
            _fail(str(e))
        except KeyboardInterrupt as e:
            how = "stopped (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            click.echo(
                f"\ncai: {how}; rows written so far are kept — rerun the same command to resume",
                err=True,
            )
            sys.exit(143 if isinstance(e, Terminated) else 130)
        except OSError as e:
            if e.errno not in _DISK_ERRNOS:
                raise
            from cai.records import write_error

            _fail(str(write_error(e, e.filename or "the output")))
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    return wrapper


# -- options: built from the stage configs (cai/configs.py is their one source) ------------------


def _config(cls, kw: dict, rename: dict | None = None, **extra):
    """A stage config from the parsed options, bounds checked (cai.options.check_config)."""
    cfg = cls(**(pick(cls, kw, rename) | extra))  # `extra`: values the command sets itself
    check_config(cfg, rename)
    return cfg


def _model(kw: dict) -> dict:
    """model, backend and backend_options for a stage config, from the shared model options."""
    m = _config(ModelOptions, kw)
    return dict(model=m.model, backend=m.backend, backend_options=m.backend_options())


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
    click.echo(
        f"{c.name}: {len(c.principles)} principles, {len(c.fewshot)} few-shot examples, "
        f"sha256 {c.sha256[:12]}"
    )
    click.echo(f"principles: {', '.join(c.ids)}")
    for name, msgs in examples(c).items():
        click.echo(f"\n=== templates/{name}.jinja ===")
        for m in msgs:
            click.echo(f"[{m['role']}] {m['content']}")
    click.echo("\nOK")


# -- generate / label -----------------------------------------------------------------------------


@cli.command()
@click_options(GenerateConfig)
@click_options(ModelOptions)
@handle_errors
def generate(**kw):
    """Run critique -> revision loops and write preference pairs.

    \b
    Example:
      cai generate --constitution constitutions/harmless \\
          --prompts constitutions/harmless/prompts.jsonl --out outputs/pairs.jsonl --rounds 2 --seed 0
    """
    from cai.revise import run_generate

    summary = run_generate(_config(GenerateConfig, kw, **_model(kw)))
    for line in summary.lines():
        click.echo(line, err=True)
    if summary.interrupted:  # stopped by Ctrl-C with prompts left: not success (`... && cai train` stops)
        sys.exit(130)


@cli.command()
@click_options(LabelConfig)
@click_options(ModelOptions)
@handle_errors
def label(**kw):
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
    from cai.feedback import run_label

    summary = run_label(_config(LabelConfig, kw, **_model(kw)))
    for line in summary.lines():
        click.echo(line, err=True)


@cli.command()
@click_options(ServeConfig)
@handle_errors
def serve(**kw):
    """Start a local fleet: N llama.cpp servers for a GGUF file behind nginx (least_conn).

    Prints the options that point `cai generate` / `cai label` at it (stdout), restarts a
    replica that exits, and stops nginx and every replica on Ctrl-C. Needs nginx on PATH.

    \b
    Example:
      cai serve --model model.gguf --replicas 2 --port 8080
      # then, in another shell, with the options it printed:
      cai generate --backend langchain --base-url http://127.0.0.1:8080/v1 --model model \\
          --constitution constitutions/harmless --prompts prompts.jsonl --out pairs.jsonl
    """
    from cai.fleet import serve_fleet

    serve_fleet(_config(ServeConfig, kw), out=click.echo)


# -- train / score ---------------------------------------------------------------------------------


@cli.command()
@click_options(TrainConfig)
@handle_errors
def train(**kw):
    """Train a reward model on soft AI labels or human labels.

    Writes a standard Hugging Face folder (safetensors, tokenizer, model card,
    cai_train_config.json) that loads with AutoModelForSequenceClassification.

    \b
    Examples:
      cai train --pairs outputs/labelled.jsonl --out outputs/rm-ai
      cai train --pairs ../shared/data/hh-rlhf-harmless/train.jsonl.gz --out outputs/rm-human \\
          --eval-pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz
      accelerate launch --multi_gpu -m cai train --pairs labelled.jsonl --base Qwen/Qwen2.5-1.5B --out outputs/rm
    """  # noqa: E501 -- help text shown verbatim (\b block): one example command per line
    from cai.train import train_reward_model

    cfg = _config(TrainConfig, kw)
    m = train_reward_model(cfg)
    ev = (
        f", eval accuracy {m['eval_accuracy']:.3f}, margin {m['eval_margin']:.3f}"
        if "eval_accuracy" in m
        else ""
    )
    click.echo(
        f"cai: reward model -> {cfg.out} (train loss {m['train_loss']:.4f}{ev}, {m['wall_s']:.0f}s)", err=True
    )


@cli.command()
@click_options(ScoreConfig)
@handle_errors
def score(**kw):
    """Score pairs with a reward model: one row of rewards per pair.

    \b
    Example:
      cai score --rm outputs/rm-human --pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz \\
          --out outputs/dev-scores.jsonl
    """
    from cai.score import run_score, score_summary

    cfg = _config(ScoreConfig, kw)
    for line in score_summary(run_score(cfg), cfg.out):
        click.echo(line, err=True)


# -- eval / compare --------------------------------------------------------------------------------


@cli.command("eval")
@click_options(EvalConfig)
@handle_errors
def eval_cmd(**kw):
    """Evaluate reward models on preference pairs: accuracy, calibration, paired tests, probes.

    Writes metrics.json, report.md, a self-contained report.html and PNG plots. Trivial
    baselines (always-first, shorter answer, longer answer) are in the same table.

    \b
    Example:
      cai eval --rm outputs/rm-ai --rm outputs/rm-human \\
          --pairs ../shared/data/hh-rlhf-harmless/dev.jsonl.gz --out outputs/report
    """
    from cai.evaluate import run_eval, summary_line

    cfg = _config(EvalConfig, kw)
    metrics = run_eval(cfg)
    click.echo(summary_line(metrics, cfg.out), err=True)


@cli.command()
@click_options(CompareConfig)
@click_options(ModelOptions)
@click_options(TrainConfig, exclude=TRAIN_SET_BY_STUDY, rename=TRAIN_RENAMED)
@click_options(EvalConfig, only=EVAL_IN_STUDY)
@handle_errors
def compare(**kw):
    """The study: AI-label the human train pairs, train an AI-label and a human-label
    reward model alike, evaluate both on the test pairs, and report.

    The judge never sees the human labels. Every step is cached by content hash under
    OUT/steps/, so a rerun after a crash, or with one setting changed, redoes only what
    changed. An estimate of tokens and time is printed first (--dry-run stops there).
    Every `cai train` option (but paths, seed and device) applies to all the reward models.

    \b
    Example (about 20 minutes on 2 busy CPU cores with the default models):
      cai compare --human-train ../shared/data/hh-rlhf-harmless/train.jsonl.gz \\
          --test ../shared/data/hh-rlhf-harmless/dev.jsonl.gz \\
          --constitution constitutions/harmless --out outputs/study \\
          --limit 100 --test-limit 300 --probe-limit 100
    """
    from cai.compare import command_line, run_compare, summary_line

    model = _model(kw)
    shared = dict(pairs="-", out="-", seed=kw["seed"], device=kw["device"])  # RMs run where the judge does
    train_t = _config(TrainConfig, kw, TRAIN_RENAMED, **shared, trust_remote_code=kw["trust_remote_code"])
    eval_t = _config(EvalConfig, kw, rms=[], **shared)
    cfg = _config(CompareConfig, kw, **model, train=train_t, eval=eval_t, command=command_line())
    metrics = run_compare(cfg)
    click.echo(summary_line(metrics, cfg.out), err=True)


# -- review / agreement ----------------------------------------------------------------------------
@cli.command()
@click_options(ReviewConfig)
@handle_errors
def review(**kw):
    """Label pairs blind in a local web page (human labels for `cai agreement`, `train`, `compare`).

    Prints a URL with a random token; open it in a browser. Keys: 1 / 2 (the better response),
    t (tie), s (skip), u (undo), r (show the AI label after answering). Every answer is saved at
    once; stop with Ctrl-C and rerun the same command to continue where you stopped.

    \b
    Example:
      cai review --pairs outputs/pairs.jsonl --out outputs/human.jsonl --sample 100 --seed 0
    """
    from cai.review import run_review

    s = run_review(_config(ReviewConfig, kw))
    click.echo(
        f"cai review: {s['done']}/{s['total']} pairs answered by {s['annotator']} -> {s['out']}", err=True
    )


@cli.command("agreement")
@click_options(AgreementConfig, required=("human",))
@handle_errors
def agreement_cmd(**kw):
    """AI-human agreement: 95% CI, Cohen's kappa, between annotators, per principle, by judge confidence.

    \b
    Example:
      cai agreement --ai outputs/pairs.jsonl --human outputs/human.jsonl --out outputs/agreement
    """
    import shlex

    from cai.agreement import run_agreement, summary_line

    cfg = _config(AgreementConfig, kw, command="cai " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    click.echo(summary_line(run_agreement(cfg), cfg.out), err=True)


@cli.command()
@click_options(CalibrateConfig, required=("human",))
@handle_errors
def calibrate(**kw):
    """Calibrate the judge on the pairs people labelled; report preference rates with PPI intervals.

    Fits a monotone map from the judge's p_chosen to P(a person prefers chosen) (isotonic
    regression; Platt scaling below 100 shared pairs), reports its held-out log loss, Brier score
    and ECE, and how often people prefer the revisions: human labels alone, AI labels alone and
    prediction-powered. Label with the map: cai label --calibration OUT/calibration.json.

    \b
    Example:
      cai calibrate --ai outputs/pairs.jsonl --human outputs/human.jsonl --out outputs/calib
    """
    import shlex

    from cai.calibrate import run_calibrate, summary_line

    cfg = _config(CalibrateConfig, kw, command="cai " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    click.echo(summary_line(run_calibrate(cfg), cfg.out), err=True)


@cli.command()
@handle_errors
def backends():
    """List the model backends installed (cai's and other packages') and their -o options."""
    from cai.backends import listing

    click.echo("\n".join(listing()))


def main():
    cli(prog_name="cai")


if __name__ == "__main__":
    main()
