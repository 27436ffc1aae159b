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
@click.option("--overwrite", is_flag=True, help="Start the output file afresh instead of resuming.")
@handle_errors
def generate(constitution_dir, prompts, out, model, backend, batch_size, device, trust_remote_code, base_url,
             rounds, seed, max_new_tokens, temperature, limit, chunk_size, early_stop, overwrite):
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
        chunk_size=chunk_size, early_stop=early_stop, overwrite=overwrite,
    )
    summary = run_generate(cfg)
    click.echo(summary.line(), err=True)


# -- label (issue 3: feedback.py) --------------------------------------------------------------
# LABEL-COMMANDS-HERE


# -- train / score (issue 4: reward.py) ---------------------------------------------------------
# TRAIN-COMMANDS-HERE


# -- eval / compare (issue 5: evaluate.py) ------------------------------------------------------
# EVAL-COMMANDS-HERE


def main():
    cli(prog_name="cai")


if __name__ == "__main__":
    main()
