"""The critique -> revision engine behind `cai generate`.

For each prompt: an initial response, then N rounds of (critique under a principle, revision).
Prompts advance *stage by stage in batches* — all initial responses of a chunk in one batched
call, then all critiques, then all revisions — because batching is where the speed is. Chunks
are checkpoints: each finished chunk is appended to the output as it completes, so a kill loses
at most the chunks in flight (one; two side by side on a server, see cai/chunks.py) and a rerun
resumes by id.

The principle for (prompt, round) is drawn by an RNG keyed on (seed, prompt id, round), so the
same arguments reproduce the same rows whatever the chunking or resume history.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cai import __version__
from cai.backends.base import note_retries, warn_truncation
from cai.chunks import chunks_in_flight, run_chunks
from cai.configs import PAIR_MODES, GenerateConfig
from cai.errors import InputError
from cai.recheck import regressed, summary_lines
from cai.recheck import stats as recheck_stats


@dataclass
class GenerateSummary:
    out: str
    written: int = 0
    skipped_existing: int = 0
    early_stopped: int = 0
    identical: int = 0
    judge_preferred_original: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0
    interrupted: bool = False
    truncated: int = 0  # prompts longer than the backend's input window, cut to their last tokens
    recheck: dict | None = None  # cai.recheck.stats over the output's rows of these prompts (--recheck)

    @property
    def rows_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        s = (
            f"cai generate: {self.written} rows -> {self.out} ({self.skipped_existing} already there) in "
            f"{self.seconds:.1f}s; {self.rows_per_s:.2f} rows/s, {self.tokens_per_s:.1f} tokens/s; "
            f"{self.early_stopped} stopped early, {self.identical} unrevised (chosen == rejected)"
        )
        if self.judge_preferred_original:
            s += f", judge preferred the original in {self.judge_preferred_original}"
        if self.truncated:
            s += f"; {self.truncated} prompts were cut to fit the model's input window (their ends kept)"
        if self.interrupted:
            s += " — interrupted; rerun the same command to resume"
        return s

    def lines(self) -> list[str]:
        """The summary line, then the re-check's per-principle rates and conflicts (--recheck)."""
        return [self.line(), *summary_lines(self.recheck)]


_LABEL_PREFIX = re.compile(
    r"^\s*(\*\*)?(revision(request)?|revised response|rewritten "
    r"response|response|critique(request)?)\s*(\*\*)?\s*:\s*",
    re.IGNORECASE,
)


def clean_output(text: str) -> str:
    """Drop a leading 'Revision:'-style label small models like to add."""
    return _LABEL_PREFIX.sub("", text, count=1).strip()


class _Interrupt:
    """First Ctrl-C: finish the chunk in flight, then stop. Second Ctrl-C: stop now."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ncai: stopping after the chunk in flight (Ctrl-C again to stop now)", file=sys.stderr)

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _validate(cfg: GenerateConfig, rounds: int):
    if rounds < 1:
        raise InputError(f"--rounds must be >= 1, not {rounds}")
    if cfg.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, not {cfg.max_new_tokens}")
    if cfg.pair_mode not in PAIR_MODES:
        raise InputError(f"--pair-mode must be one of {', '.join(PAIR_MODES)}, not {cfg.pair_mode!r}")
    if cfg.pair_mode == "samples" and not cfg.label:
        raise InputError("--pair-mode samples needs the judge to order the pair; drop --no-label")
    if cfg.recheck and cfg.pair_mode != "revision":
        raise InputError(
            "--recheck judges the final revision against the initial response; use it with "
            "--pair-mode revision (or re-check sampled pairs with `cai label --recheck`)"
        )
    if cfg.repair_rounds and not cfg.recheck:
        raise InputError(
            f"--repair-rounds {cfg.repair_rounds} repairs what the re-check finds; add --recheck"
        )


def run_generate(cfg: GenerateConfig, progress: bool = True) -> GenerateSummary:
    from cai.constitution import load_constitution
    from cai.guard import claim_output
    from cai.options import check_config
    from cai.records import read_prompts
    from cai.rowwriter import RowWriter

    # Validate everything before touching the model or the output file.
    check_config(cfg)
    const = load_constitution(cfg.constitution)
    rounds = cfg.rounds if cfg.rounds is not None else int(const.defaults.get("rounds", 2))
    _validate(cfg, rounds)
    from cai.backends import resolve_config

    cfg = resolve_config(cfg)  # the engine --backend stands for here, before anything loads
    if cfg.backend == "hf":
        from cai.models import check_model, resolve_model

        check_model(resolve_model(cfg.model)[0])  # weights whole, tokenizer fits: before any work
    with claim_output(cfg.out, inputs=[cfg.prompts, *(Path(const.path) / f for f in const.files)]):
        prompts = read_prompts(cfg.prompts, limit=cfg.limit)
        writer = RowWriter(cfg.out, overwrite=cfg.overwrite)
        return _generate(cfg, const, rounds, prompts, writer, progress)


def _generate(cfg: GenerateConfig, const, rounds: int, prompts: list[dict], writer, progress: bool):
    from tqdm.auto import tqdm

    from cai.backends import load_backend, runtime
    from cai.models import fingerprint
    from cai.records import file_sha256
    from cai.rowwriter import check_resume_meta

    params = {
        "rounds": rounds,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "early_stop": cfg.early_stop,
        "pair_mode": cfg.pair_mode,
        "label": cfg.label,
        "judge_principles": cfg.judge_principles,
    }
    if cfg.pair_mode == "samples":
        params["sample_temperature"] = cfg.sample_temperature
    if cfg.recheck:  # only when on, so files made before the option existed still resume
        from cai.judge import recheck_params

        params["recheck"] = recheck_params(const, cfg.recheck_margin, cfg.repair_rounds)
    check_resume_meta(
        writer,
        {"constitution": {"name": const.name, "sha256": const.sha256}, "seed": cfg.seed, "params": params},
        keys=("constitution", "seed", "params"),
    )  # before loading a model
    backend = load_backend(cfg.backend, cfg.model, **cfg.backend_options)
    meta = {
        "model": backend.model_id,
        "model_sha256": fingerprint(getattr(backend, "model_path", None) or ""),
        "backend": backend.name,
        "constitution": {"name": const.name, "sha256": const.sha256},
        "seed": cfg.seed,
        "params": params,
        "version": __version__,
        "prompts": {"path": str(cfg.prompts), "sha256": file_sha256(cfg.prompts)},
        "runtime": runtime(backend),
    }
    check_resume_meta(writer, meta)

    todo = [p for p in prompts if p["id"] not in writer.done]
    summary = GenerateSummary(out=str(cfg.out), skipped_existing=len(prompts) - len(todo))
    # requests a stage keeps busy: the server path's in-flight count, else the engine's batch
    width = getattr(backend, "concurrency", None) or int(cfg.backend_options.get("batch_size", 16))
    workers = chunks_in_flight(backend)
    # one chunk at a time: 4 waves per stage; two side by side (a server), each one wave
    chunk_size = cfg.chunk_size or (max(width, 8) if workers > 1 else max(width * 4, 8))
    no_change = re.compile(const.defaults.get("no_change_pattern", r"^\W*no changes? needed"), re.IGNORECASE)

    engine = _Engine(const, backend, cfg, rounds, no_change)
    stages_per_prompt = engine.stages_per_prompt
    t0 = time.perf_counter()
    tokens0 = getattr(backend, "stats", {}).get("generated_tokens", 0)
    bar = tqdm(
        total=len(todo) * stages_per_prompt,
        unit="step",
        desc="generate",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def done(chunk, rows):
        writer.write_many(rows)  # one whole line per row, fsynced: the checkpoint
        summary.written += len(rows)
        summary.early_stopped += sum(
            1 for r in rows if any(x.get("early_stop") for x in r["trace"]["rounds"])
        )
        summary.identical += sum(1 for r in rows if r["label"].get("tie"))
        summary.judge_preferred_original += sum(
            1 for r in rows if r["label"].get("revision_side") == "rejected"
        )
        summary.seconds = time.perf_counter() - t0
        summary.generated_tokens = getattr(backend, "stats", {}).get("generated_tokens", 0) - tokens0
        bar.set_postfix_str(f"{summary.rows_per_s:.2f} rows/s, {summary.tokens_per_s:.0f} tok/s")
        summary.truncated = warn_truncation(backend, summary.truncated)

    chunks = [todo[s : s + chunk_size] for s in range(0, len(todo), chunk_size)]
    with bar, _Interrupt() as stop, writer:  # the bar closes (ends its line) on an error too
        n = run_chunks(
            chunks,
            lambda chunk: engine.run_chunk(chunk, meta, bar),
            done,
            workers=workers,
            stop=lambda: stop.requested,
            cancel=getattr(backend, "cancel", None),
        )
        summary.interrupted = n < len(chunks)
    note_retries(backend)
    bar.close()
    summary.seconds = time.perf_counter() - t0
    if cfg.recheck and Path(cfg.out).exists():  # over every row of these prompts, resumed ones too
        from cai.records import read_rows

        ids = {p["id"] for p in prompts}
        summary.recheck = recheck_stats([r for r in read_rows(cfg.out) if str(r.get("id")) in ids])
    return summary


class _Engine:
    """Runs one chunk of prompts through the stages, each stage as one batched call."""

    def __init__(self, const, backend, cfg: GenerateConfig, rounds: int, no_change):
        self.c, self.b, self.cfg, self.rounds, self.no_change = const, backend, cfg, rounds, no_change
        sampling = cfg.pair_mode == "samples"
        self.stages_per_prompt = (
            (2 if sampling else 1)
            + 2 * (0 if sampling else rounds)
            + (1 + 3 * cfg.repair_rounds if cfg.recheck else 0)
            + (1 if cfg.label else 0)
        )

    def _gen(self, convs, stage: int, temperature=None):
        t = self.cfg.temperature if temperature is None else temperature
        gens = self.b.generate(
            convs, max_new_tokens=self.cfg.max_new_tokens, temperature=t, seed=self.cfg.seed * 1000 + stage
        )
        return [clean_output(g.text) for g in gens]

    def run_chunk(self, chunk: list[dict], meta: dict, bar) -> list[dict]:
        n = len(chunk)
        convs = [p["prompt"] for p in chunk]
        if self.cfg.pair_mode == "samples":
            a = self._gen(convs, 0, self.cfg.sample_temperature)
            bar.update(n)
            b = self._gen(convs, 1, self.cfg.sample_temperature)
            bar.update(n)
            traces = [{"samples": [x, y], "rounds": []} for x, y in zip(a, b)]
            pairs = list(zip(a, b))
        else:
            initial = self._gen(convs, 0)
            bar.update(n)
            current = list(initial)
            traces = [{"initial": x, "rounds": []} for x in initial]
            active = list(range(n))
            for r in range(self.rounds):
                if not active:
                    bar.update(2 * n * (self.rounds - r))
                    break
                principles = {i: self.c.draw(self.cfg.seed, chunk[i]["id"], r) for i in active}
                crit_prompts = [
                    self.c.render(
                        "critique", conversation=convs[i], response=current[i], principle=principles[i]
                    )
                    for i in active
                ]
                critiques = dict(zip(active, self._gen(crit_prompts, 10 + 2 * r)))
                bar.update(n)
                to_revise = []
                for i in active:
                    done = self.cfg.early_stop and bool(self.no_change.search(critiques[i]))
                    if done:
                        traces[i]["rounds"].append(
                            {
                                "principle": principles[i].id,
                                "critique": critiques[i],
                                "revision": None,
                                "early_stop": True,
                            }
                        )
                    else:
                        to_revise.append(i)
                rev_prompts = [
                    self.c.render(
                        "revision",
                        conversation=convs[i],
                        response=current[i],
                        critique=critiques[i],
                        principle=principles[i],
                    )
                    for i in to_revise
                ]
                revisions = dict(zip(to_revise, self._gen(rev_prompts, 11 + 2 * r))) if to_revise else {}
                bar.update(n)
                for i in to_revise:
                    rev = revisions[i]
                    traces[i]["rounds"].append(
                        {"principle": principles[i].id, "critique": critiques[i], "revision": rev}
                    )
                    if rev:  # an empty revision keeps the previous response (recorded as such)
                        current[i] = rev
                active = to_revise
            if self.cfg.recheck:
                self._recheck(chunk, convs, initial, current, traces, bar)
            pairs = list(zip(current, initial))  # (final revision, initial response)

        labels = self._label(chunk, pairs, bar)
        rows = []
        for p, (x, y), trace, label in zip(chunk, pairs, traces, labels):
            swapped = bool(label.pop("swap", None))
            chosen, rejected = (y, x) if swapped else (x, y)
            if "recheck" in trace:  # which response p_final_better is about
                trace["recheck_side"] = "rejected" if swapped else "chosen"
            rows.append(
                {
                    "id": p["id"],
                    "prompt": p["prompt"],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "label": label,
                    "trace": trace,
                    "meta": meta,
                }
            )
        return rows

    def _recheck(self, chunk, convs, initial, current, traces, bar):
        """Judge (initial, final) under every principle; then up to --repair-rounds rounds of one
        more critique -> revision for each row's worst regressed principle not yet tried on its
        current final, each re-checked, keeping the answer with fewer regressions. All rows of
        the chunk go through each step together (one backend call per step)."""
        from cai.judge import recheck_pairs

        margin = self.cfg.recheck_margin

        def check(rows_texts):
            items = [(convs[i], text, initial[i]) for i, text in rows_texts]
            results = recheck_pairs(self.b, self.c, items, seed=self.cfg.seed)
            return [(res, regressed(res, margin)) for res in results]

        n = len(chunk)
        revised = [i for i in range(n) if current[i].strip() != initial[i].strip()]
        for i in range(n):  # an unrevised row has nothing to re-check: final and initial are one text
            traces[i]["recheck"], traces[i]["regressed"] = [], []
        for i, (res, reg) in zip(revised, check([(i, current[i]) for i in revised])):
            traces[i]["recheck"], traces[i]["regressed"] = res, reg
        bar.update(n)
        tried: dict[int, set] = {i: set() for i in revised}  # principles repaired on the current final
        for j in range(self.cfg.repair_rounds):
            target = {}
            for i in revised:
                todo = [pid for pid in traces[i]["regressed"] if pid not in tried[i]]
                if todo:
                    target[i] = self.c.principles[todo[0]]  # the worst regression not yet tried
            if not target:
                bar.update(3 * n * (self.cfg.repair_rounds - j))
                break
            idx = list(target)
            crit = self._gen(
                [
                    self.c.render("critique", conversation=convs[i], response=current[i], principle=target[i])
                    for i in idx
                ],
                500 + 2 * j,
            )
            bar.update(n)
            critiques = dict(zip(idx, crit))
            to_revise = [i for i in idx if not (self.cfg.early_stop and self.no_change.search(critiques[i]))]
            revs = (
                self._gen(
                    [
                        self.c.render(
                            "revision",
                            conversation=convs[i],
                            response=current[i],
                            critique=critiques[i],
                            principle=target[i],
                        )
                        for i in to_revise
                    ],
                    501 + 2 * j,
                )
                if to_revise
                else []
            )
            bar.update(n)
            revisions = dict(zip(to_revise, revs))
            # a candidate must be a new answer: not empty, not the current final, not the initial
            cands = [
                i
                for i in to_revise
                if revisions[i] and revisions[i].strip() not in (current[i].strip(), initial[i].strip())
            ]
            checked = dict(zip(cands, check([(i, revisions[i]) for i in cands])))
            bar.update(n)
            for i in idx:
                tried[i].add(target[i].id)
                entry = {"principle": target[i].id, "critique": critiques[i], "revision": revisions.get(i)}
                if i in checked:
                    res, reg = checked[i]
                    entry.update(recheck=res, regressed=reg, kept=len(reg) < len(traces[i]["regressed"]))
                else:
                    entry["kept"] = False
                traces[i].setdefault("repairs", []).append(entry)
                if entry["kept"]:
                    traces[i].setdefault(
                        "before_repair",
                        {"recheck": traces[i]["recheck"], "regressed": traces[i]["regressed"]},
                    )
                    traces[i]["recheck"], traces[i]["regressed"] = entry["recheck"], entry["regressed"]
                    current[i] = revisions[i]
                    tried[i] = set()

    def _label(self, chunk, pairs, bar) -> list[dict]:
        """Labels for (x, y) pairs: x is the revision (or sample 1). 'swap' means y is chosen."""
        n = len(chunk)
        labels: list[dict | None] = [None] * n
        judge_idx = []
        for i, (x, y) in enumerate(pairs):
            if x.strip() == y.strip():
                # Nothing was revised: not a preference pair (kept for its trace; readers skip it).
                labels[i] = {"p_chosen": 0.5, "source": "revision", "tie": True}
            elif not self.cfg.label:
                labels[i] = {"p_chosen": 1.0, "source": "revision"}
            else:
                judge_idx.append(i)
        if judge_idx:
            from cai.judge import flip_label, judge_pairs

            rows = [
                {
                    "id": chunk[i]["id"],
                    "prompt": chunk[i]["prompt"],
                    "chosen": [{"role": "assistant", "content": pairs[i][0]}],
                    "rejected": [{"role": "assistant", "content": pairs[i][1]}],
                }
                for i in judge_idx
            ]
            judged = judge_pairs(
                self.b, self.c, rows, principles=self.cfg.judge_principles, seed=self.cfg.seed
            )
            for i, lab in zip(judge_idx, judged):
                lab = dict(lab)
                if lab["p_chosen"] < 0.5:  # the judge prefers y: order the row by its label
                    lab = dict(flip_label(lab), swap=True)
                if self.cfg.pair_mode == "revision":
                    lab["revision_side"] = "rejected" if lab.get("swap") else "chosen"
                labels[i] = lab
        if self.cfg.label:
            bar.update(n)
        return labels
