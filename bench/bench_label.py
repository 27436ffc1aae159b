"""The judge on human-labelled pairs: agreement, position consistency, speed against a naive loop,
and what (if anything) makes the 135M default judge better.

Labels the shared HH-RLHF harmless dev pairs with the default model through `cai label`'s own
code path (run_label: chunks, the resumable writer, the summary), then on subsets of the same
pairs:

  speed     a naive loop — one pair, one order, one forward pass at a time, as a user would write
            it with transformers (full logits) — against the batched judge on the same pairs; also
            the cai backend called one prompt at a time, to separate batching+prefix sharing from
            the last-position-only logits. Wall-clock pairs/s, pairs per CPU-second (steadier on a
            shared machine) and model tokens computed per pair (independent of machine load).
  quality   variants scored on the same pairs against the same human labels:
            - the principle drawn per pair (the default, K=1) vs one general principle for all
              pairs vs an ensemble of 3 or all principles,
            - the principle question after the two responses instead of before them (the paper's
              order), which also lets every principle share one pass over the responses,
            - two few-shot examples (human-labelled pairs from train.jsonl.gz, one answered A, one B),
            - batch calibration (each order's log-odds centred on its mean over the run; free),
            - for scale: the "pick the shorter answer" rule and each presentation order alone.

    .venv/bin/python bench/bench_label.py                   # defaults: ~8-15 min on 2 shared CPU cores,
                                                            # by load
    # full run (hours on CPU):
    .venv/bin/python bench/bench_label.py --limit 500 --naive 50 --naive-ensemble 10 --variants 500 --cot 100
    # smoke test (~2 min):
    .venv/bin/python bench/bench_label.py --limit 8 --naive 2 --naive-ensemble 1 --variants 4

Results go to stdout and bench/RESULTS-label.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
HARMLESS = ROOT / "constitutions" / "harmless"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GENERAL = "harmful-overall"  # the one general principle of the harmless constitution

OUT: list[str] = []


def say(line: str = ""):
    print(line, flush=True)
    OUT.append(line)


def clock():
    return time.perf_counter(), time.process_time()


def since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


# ---------------------------------------------------------------------------- variants of the template


def _question_last(src: Path, dst: Path):
    """A copy of the constitution whose compare prompt puts the question after the responses."""
    shutil.copytree(src, dst)
    t = (dst / "templates" / "compare.jinja").read_text()
    q = "{{ question }}\n\n"
    opts = "Options:\n({{ options[0] }}) {{ response_a }}\n({{ options[1] }}) {{ response_b }}\n"
    assert q + opts in t, "compare.jinja changed shape; update _question_last"
    (dst / "templates" / "compare.jinja").write_text(t.replace(q + opts, opts + "\n{{ question }}\n"))


def _few_shot(src: Path, dst: Path, const, examples: list[dict]):
    """A copy of the constitution whose compare prompt first shows worked examples as chat turns."""
    from cai.judge import render_judge_prompt

    shutil.copytree(src, dst)
    p = const.principles[GENERAL]
    turns = []
    for ex, chosen_first in examples:
        msgs = render_judge_prompt(const, ex, p, chosen_first, False, "")
        answer = "A" if chosen_first else "B"
        turns.append(("user", msgs[0]["content"]))
        turns.append(("assistant", f"The answer is: ({answer})"))
    block = "".join(
        f'{{% call message("{role}") %}}{{% raw %}}{text}{{% endraw %}}{{% endcall %}}\n'
        for role, text in turns
    )
    t = (dst / "templates" / "compare.jinja").read_text()
    head, sep, rest = t.partition('{% call message("user") %}')
    (dst / "templates" / "compare.jinja").write_text(head + block + sep + rest)


# ---------------------------------------------------------------------------- scoring helpers


def _row(r, orders, by_principle=None):
    return {
        "chosen": r["chosen"],
        "rejected": r["rejected"],
        "label": {
            "p_chosen": (orders[0] + orders[1]) / 2,
            "source": "ai",
            "judge": {"orders": list(orders), "by_principle": by_principle or {}},
            "prior": r["label"].get("prior") or r["label"],
        },
    }


def _subset(r, lab, pids):
    bp = lab["judge"]["by_principle"]
    o = [sum(bp[p][k] for p in pids) / len(pids) for k in (0, 1)]
    return _row(r, o, {p: bp[p] for p in pids})


def _calibrated(rows):
    """Centre each order's log-odds on its mean over the rows (transductive batch calibration)."""

    def logit(p):
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    m = [sum(logit(r["label"]["judge"]["orders"][k]) for r in rows) / len(rows) for k in (0, 1)]
    out = []
    for r in rows:
        o = [1 / (1 + math.exp(-(logit(r["label"]["judge"]["orders"][k]) - m[k]))) for k in (0, 1)]
        out.append(_row(r, o))
    return out


def _agree(row) -> float:
    p, h = row["label"]["p_chosen"], row["label"]["prior"]["p_chosen"]
    return 0.5 if p == 0.5 else float((p > 0.5) == (h > 0.5))


def _line(name, rows, base=None):
    from cai.feedback import summarize

    s = summarize(rows)
    h = s["human"]
    txt = (
        f"{name:<44} {100 * h['agreement']:5.1f}%  [{100 * h['ci95'][0]:4.1f}–{100 * h['ci95'][1]:4.1f}]"
        f"  consistency {100 * s['position_consistency']:5.1f}%  P(first) {s['mean_p_first']:.3f}"
    )
    if base is not None:
        up = sum(1 for a, b in zip(rows, base) if _agree(a) > _agree(b))
        down = sum(1 for a, b in zip(rows, base) if _agree(a) < _agree(b))
        txt += f"  vs default: +{up}/-{down} pairs"
    say(txt)
    return s


def _naive(backend, const, rows, seed, k):
    """What a user writes first: one pair, one order, one full forward pass (all logits) at a time.
    Returns per pair the p_chosen of each (principle, order) and the mean tokens per pair."""
    import torch

    from cai.judge import render_judge_prompt

    tok, model = backend.tok, backend.model
    ab = backend.option_token_ids(["A", "B"])
    out, tokens = [], 0
    for r in rows:
        ps = []
        for p in const.sample(seed, r["id"], k):
            for order in (0, 1):
                text = backend.render(render_judge_prompt(const, r, p, order == 0, False, ""))
                enc = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
                tokens += enc["input_ids"].numel()
                with torch.inference_mode():
                    logits = model(**enc).logits[0, -1].float()
                la, lb = torch.log_softmax(logits, -1)[ab].tolist()
                pa = 1 / (1 + math.exp(lb - la))
                ps.append(pa if order == 0 else 1 - pa)
        out.append(ps)
    return out, tokens / len(rows)


# ---------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=120, help="dev pairs labelled by the main run (500 = all)")
    ap.add_argument("--naive", type=int, default=8, help="pairs for the naive-loop speed comparison")
    ap.add_argument(
        "--naive-ensemble", type=int, default=2, help="pairs for the naive loop over all principles"
    )
    ap.add_argument("--variants", type=int, default=40, help="pairs for the quality variants (0 = skip)")
    ap.add_argument(
        "--cot", type=int, default=0, help="pairs for a chain-of-thought run (0 = skip; slow on CPU)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default, or 1 when the load average exceeds the core count)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-label.md"))
    a = ap.parse_args()

    dev, train = DATA / "dev.jsonl.gz", DATA / "train.jsonl.gz"
    if not dev.exists():
        print(f"skipped: shared HH-RLHF data not found at {DATA} (see docs/pairs-contract.md)")
        return

    import torch
    import transformers

    from cai.backends.hf import HFBackend
    from cai.configs import LabelConfig
    from cai.constitution import load_constitution
    from cai.feedback import format_summary, run_label
    from cai.judge import judge_pairs, render_judge_prompt
    from cai.records import read_pairs, read_rows

    load = os.getloadavg()[0]
    threads = a.threads or (1 if load > (os.cpu_count() or 1) else torch.get_num_threads())
    torch.set_num_threads(threads)
    cmd = " ".join([".venv/bin/python", "bench/bench_label.py", *sys.argv[1:]])
    say("# Judge benchmark: SmolLM2-135M-Instruct on HH-RLHF harmless dev pairs")
    say()
    say(f"command: `{cmd}`  ")
    say(cpu_line())
    say(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at start, "
        f"torch {torch.__version__} ({threads} thread{'s' if threads > 1 else ''}), "
        f"transformers {transformers.__version__}"
    )
    say(f"date: {time.strftime('%Y-%m-%d %H:%M')}")
    say()
    say("```")

    const = load_constitution(HARMLESS)
    rows = read_pairs(dev, limit=a.limit, skip_bad=True)
    n = len(rows)

    # -- 1. the main run: cai label's own path -------------------------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="bench-label-"))
    try:
        out = tmp / "dev-ai.jsonl"
        cfg = LabelConfig(
            pairs=str(dev),
            constitution=str(HARMLESS),
            out=str(out),
            limit=a.limit,
            seed=a.seed,
            backend_options={"batch_size": a.batch_size},
        )
        say(f"== cai label on {n} dev pairs (default settings: 1 principle drawn per pair, both orders) ==")
        t = clock()
        s = run_label(cfg)
        wall, cpu = since(t)
        for line in format_summary(s.stats):
            say(line)
        say(
            f"judging: {s.seconds:.0f} s for {s.labelled} pairs = {s.pairs_per_s:.3f} pairs/s "
            f"(whole command incl. model load: {wall:.0f} s wall, {cpu:.0f} CPU-s)"
        )
        labelled = {r["id"]: r for r in read_rows(out)}
        main_rows = [_row(r, labelled[r["id"]]["label"]["judge"]["orders"]) for r in rows]
        rt = next(iter(labelled.values()))["meta"]["runtime"]
        engine = rt.get("engine") or rt.get("backend")
        say(f"engine (the default, --backend auto): {engine}, {rt.get('weights') or 'weights as stored'}")
        say(
            "the speed and quality sections below run the hf backend (fp32 transformers, the exact reference)"
        )
        say()

        ql_dir = tmp / "question-last"
        _question_last(HARMLESS, ql_dir)
        ql = load_constitution(ql_dir)
        backend = HFBackend(None, batch_size=a.batch_size)
        judge_pairs(backend, const, rows[:1])  # warm-up (and the one-time prefix-sharing check)

        # -- 2. speed: naive loop vs batched, same pairs ----------------------------------------
        if a.naive:
            sub = rows[: a.naive]
            say(f"== speed on the first {len(sub)} pairs (1 principle, both orders) ==")
            t = clock()
            naive_p, naive_tokens = _naive(backend, const, sub, a.seed, 1)
            n_wall, n_cpu = since(t)
            naive_p = [sum(x) / len(x) for x in naive_p]

            backend.share_prefix = False
            t = clock()
            for r in sub:
                p = const.sample(a.seed, r["id"], 1)[0]
                for order in (0, 1):
                    backend.option_logprobs(
                        [render_judge_prompt(const, r, p, order == 0, False, "")], ["A", "B"]
                    )
            o_wall, o_cpu = since(t)
            backend.share_prefix = True

            before = backend.stats["computed_tokens"]
            t = clock()
            fast = []
            for k in range(0, len(sub), 16):  # the chunking run_label uses
                fast += judge_pairs(backend, const, sub[k : k + 16], seed=a.seed)
            b_wall, b_cpu = since(t)
            fast_tokens = (backend.stats["computed_tokens"] - before) / len(sub)
            diff = max(abs(x["p_chosen"] - y) for x, y in zip(fast, naive_p))
            m = len(sub)
            say(f"{'':<40} {'pairs/s':>8} {'pairs/CPU-s':>12} {'tokens/pair':>12}")
            say(
                f"{'naive loop (transformers, full logits)':<40} "
                f"{m / n_wall:8.3f} {m / n_cpu:12.3f} {naive_tokens:12.0f}"
            )
            say(
                f"{'cai backend, one prompt per call':<40} "
                f"{m / o_wall:8.3f} {m / o_cpu:12.3f} {naive_tokens:12.0f}"
            )
            say(
                f"{'cai judge, batched + shared prefixes':<40} "
                f"{m / b_wall:8.3f} {m / b_cpu:12.3f} {fast_tokens:12.0f}"
            )
            say(
                f"speed-up vs the naive loop: {n_wall / b_wall:.2f}x wall, {n_cpu / b_cpu:.2f}x CPU time, "
                f"{naive_tokens / fast_tokens:.2f}x fewer tokens computed "
                f"(vs one prompt per call: {o_wall / b_wall:.2f}x wall)"
            )
            say(f"same labels as the naive loop: max |Δp_chosen| = {diff:.1e}")
            if a.naive_ensemble:
                esub = rows[: a.naive_ensemble]
                k = len(ql.ids)
                t = clock()
                _, e_naive_tokens = _naive(backend, ql, esub, a.seed, None)
                e_n_wall, e_n_cpu = since(t)
                before = backend.stats["computed_tokens"]
                t = clock()
                judge_pairs(backend, ql, esub, principles=None, seed=a.seed)
                e_b_wall, e_b_cpu = since(t)
                e_tokens = (backend.stats["computed_tokens"] - before) / len(esub)
                m = len(esub)
                say(
                    f"ensemble of all {k} principles "
                    f"(question after the responses; {2 * k} prompts per pair), "
                    f"first {m} pairs:"
                )
                say(
                    f"{'naive loop (transformers, full logits)':<40} "
                    f"{m / e_n_wall:8.3f} {m / e_n_cpu:12.3f} {e_naive_tokens:12.0f}"
                )
                say(
                    f"{'cai judge, batched + shared prefixes':<40} "
                    f"{m / e_b_wall:8.3f} {m / e_b_cpu:12.3f} {e_tokens:12.0f}"
                )
                say(
                    f"speed-up vs the naive loop: {e_n_wall / e_b_wall:.2f}x wall, "
                    f"{e_n_cpu / e_b_cpu:.2f}x CPU time, "
                    f"{e_naive_tokens / e_tokens:.2f}x fewer tokens computed"
                )
            say()

        # -- 3. quality variants on the same pairs -----------------------------------------------
        if a.variants:
            sub = rows[: a.variants]
            # the baseline on the variants' own engine (hf), so each line differs in one thing only
            base = []
            for k in range(0, len(sub), 16):
                chunk = sub[k : k + 16]
                labels = judge_pairs(backend, const, chunk, seed=a.seed)
                base += [_row(r, lab["judge"]["orders"]) for r, lab in zip(chunk, labels)]
            say(
                f"== quality on the first {len(sub)} pairs: "
                "agreement with humans [95% CI], position consistency =="
            )
            _line("default (1 principle drawn per pair), hf", base)

            t = clock()
            ens = []
            for k in range(0, len(sub), 16):
                ens += judge_pairs(backend, ql, sub[k : k + 16], principles=None, seed=a.seed)
            e_wall, _ = since(t)
            drawn = [[p.id for p in const.sample(a.seed, r["id"], 1)] for r in sub]
            three = [[p.id for p in const.sample(a.seed, r["id"], 3)] for r in sub]
            ql1 = [_subset(r, lab, d) for r, lab, d in zip(sub, ens, drawn)]
            _line("question after the responses, same principle", ql1, base)
            _line(
                f"question after, '{GENERAL}' for every pair",
                [_subset(r, lab, [GENERAL]) for r, lab in zip(sub, ens)],
                base,
            )
            _line(
                "question after, 3 principles drawn per pair",
                [_subset(r, lab, d) for r, lab, d in zip(sub, ens, three)],
                base,
            )
            all_rows = [_subset(r, lab, lab["judge"]["principles"]) for r, lab in zip(sub, ens)]
            s_all = _line(f"question after, all {len(const.ids)} principles", all_rows, base)
            say(
                f"  (the all-principles run took {e_wall:.0f} s = {len(sub) / e_wall:.3f} pairs/s for "
                f"{len(const.ids)}x the prompts)"
            )
            per = sorted(
                ((v["agreement"], k) for k, v in s_all["per_principle"].items() if v.get("n")), reverse=True
            )
            say("  single principles (question after): " + ", ".join(f"{k} {100 * v:.0f}%" for v, k in per))

            if train.exists():
                pool = sorted(
                    read_pairs(train, skip_bad=True),
                    key=lambda r: len(str(r["prompt"])) + len(str(r["chosen"])) + len(str(r["rejected"])),
                )
                rng = random.Random(a.seed)
                ex = rng.sample(pool[:100], 2)  # two short human-labelled train pairs
                fs_dir = tmp / "few-shot"
                _few_shot(HARMLESS, fs_dir, const, [(ex[0], True), (ex[1], False)])
                fs = load_constitution(fs_dir)
                few = []
                for k in range(0, len(sub), 16):
                    few += judge_pairs(backend, fs, sub[k : k + 16], seed=a.seed)
                _line(
                    "two few-shot examples (train pairs; A then B)",
                    [_row(r, lab["judge"]["orders"]) for r, lab in zip(sub, few)],
                    base,
                )
            else:
                say(f"few-shot: skipped ({train} not found)")
            _line("batch calibration (centred log-odds per order)", _calibrated(base), base)
            if a.cot:
                csub = sub[: a.cot]
                cot = []
                t = clock()
                for k in range(0, len(csub), 16):
                    cot += judge_pairs(
                        backend, const, csub[k : k + 16], cot=True, seed=a.seed, max_new_tokens=64
                    )
                c_wall, _ = since(t)
                say(f"-- chain of thought on the first {len(csub)} pairs ({c_wall:.0f} s):")
                _line("default, same pairs", base[: len(csub)])
                _line(
                    "--cot (64 reasoning tokens, clamped 0.4-0.6)",
                    [_row(r, lab["judge"]["orders"]) for r, lab in zip(csub, cot)],
                    base[: len(csub)],
                )
            say()

        # -- 4. references on the main run ---------------------------------------------------------
        h = s.stats["human"]
        say("== for scale, on the main run's pairs ==")
        say(
            f"each order alone: chosen shown first {100 * h['agreement_by_order'][0]:.1f}%, shown second "
            f"{100 * h['agreement_by_order'][1]:.1f}%; "
            f"'pick the shorter answer': {100 * h['shorter_rule']:.1f}% "
            f"(published on the HH harmless test set: 55.3%)"
        )
        _line("batch calibration on all main-run pairs", _calibrated(main_rows), main_rows)
        say("```")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        write_results(a.results, "\n".join(OUT))
        print(f"\nwritten: {a.results}")


if __name__ == "__main__":
    main()
