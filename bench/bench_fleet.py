"""`cai generate` and `cai label` through a fleet of llama.cpp servers behind nginx, against the
in-process engine (`--backend llamacpp`, the CPU default) at equal total threads and slots,
measured in the same run.

    .venv/bin/python bench/bench_fleet.py     # 16 shipped prompts, 1 round, 64 new tokens, 2 threads, 8 slots
    .venv/bin/python bench/bench_fleet.py --limit 31 --threads 8 --slots 16

Runs, on the same prompts and settings (greedy, the embedded SmolLM2 GGUF):
  1. in process: one llama.cpp engine, --threads T, --batch-size S;
  2. fleet of 1: one `python -m cai.serve` replica (T threads, S slots) behind nginx, cai's
     langchain backend with its default --concurrency (the fleet's slots);
  3. fleet of 2: two replicas of T/2 threads and S/2 slots each behind nginx;
  4. fleet of 1 at --concurrency 2 x S (the default's alternative: a queue at the server).
Then `cai label` on the pairs of run 1, on each. Rows/s and pairs/s count the stage's own time
(model loading and server start-up excluded on both sides). Also writes, from run 1's rows,
the prompt and generated tokens per stage that docs/recipes/vllm.md's paper model uses.
Results go to bench/RESULTS-fleet.md with the CPU they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line, load  # noqa: E402
from _results import write as write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # as the tests and cai.fleet's replicas run

HARMLESS = ROOT / "constitutions" / "harmless"


def generate(a, out, backend, options):
    from cai.revise import GenerateConfig, run_generate

    cfg = GenerateConfig(
        constitution=str(HARMLESS),
        prompts=str(HARMLESS / "prompts.jsonl"),
        out=str(out),
        rounds=a.rounds,
        max_new_tokens=a.max_new_tokens,
        limit=a.limit,
        early_stop=False,  # every prompt does every stage: the same work on every side
        backend=backend,
        backend_options=options,
        overwrite=True,
    )
    s = run_generate(cfg, progress=False)
    return s.written / s.seconds, s


def label(pairs, out, backend, options):
    from cai.feedback import LabelConfig, run_label

    cfg = LabelConfig(
        pairs=str(pairs),
        constitution=str(HARMLESS),
        out=str(out),
        backend=backend,
        backend_options=options,
        overwrite=True,
    )
    s = run_label(cfg)
    return s.labelled / s.seconds, s


def stage_tokens(rows: list[dict]) -> dict:
    """Mean prompt and generated tokens per stage, from the rows' own texts: each stage's prompt
    re-rendered from the trace with the constitution's templates and the model's chat template,
    tokenised with the model's tokenizer (the embedded SmolLM2's)."""
    from transformers import AutoTokenizer

    from cai.constitution import load_constitution
    from cai.judge import render_judge_prompt
    from cai.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    const = load_constitution(HARMLESS)

    def n_prompt(messages):
        prefix = messages[-1]["role"] == "assistant"  # the judge's "The answer is: (" is continued
        text = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not prefix, continue_final_message=prefix
        )
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def n_text(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    acc: dict[str, list[int]] = {}

    def add(key, value):
        acc.setdefault(key, []).append(value)

    for r in rows:
        conv, trace = r["prompt"], r["trace"]
        add("conversation", n_prompt(conv))
        add("initial_out", n_text(trace["initial"]))
        current = trace["initial"]
        for rnd in trace["rounds"]:
            p = const.principles[rnd["principle"]]
            add(
                "critique_in",
                n_prompt(const.render("critique", conversation=conv, response=current, principle=p)),
            )
            add("critique_out", n_text(rnd["critique"]))
            rev = const.render(
                "revision", conversation=conv, response=current, critique=rnd["critique"], principle=p
            )
            add("revision_in", n_prompt(rev))
            add("revision_out", n_text(rnd["revision"] or ""))
            add("embedded_response", n_text(current))
            current = rnd["revision"] or current
        if not r["label"].get("tie"):
            for pid in r["label"]["judge"]["principles"]:
                for first in (True, False):
                    add(
                        "judge_in",
                        n_prompt(render_judge_prompt(const, r, const.principles[pid], first, False, "")),
                    )
            add("judged_responses", n_text(r["chosen"][0]["content"]) + n_text(r["rejected"][0]["content"]))
    return {k: statistics.mean(v) for k, v in acc.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="total CPU threads on every side")
    ap.add_argument("--slots", type=int, default=8, help="total slots (sequences decoded together)")
    a = ap.parse_args()

    from cai.fleet import Fleet, nginx_binary

    if nginx_binary() is None:
        sys.exit(
            "bench_fleet: nginx is not installed (apt-get install nginx; `make install` does it as root)"
        )
    load_before = load()
    results = []  # (name, layout, generate rows/s, label pairs/s, concurrency)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        local = {"batch_size": a.slots, "threads": a.threads}
        g_rate, g = generate(a, d / "inproc.jsonl", "llamacpp", local)
        pairs = d / "inproc.jsonl"
        l_rate, _ = label(pairs, d / "inproc-label.jsonl", "llamacpp", local)
        results.append(
            (
                "in process (`--backend llamacpp`)",
                f"1 x {a.threads} threads, {a.slots} slots",
                g_rate,
                l_rate,
                "-",
            )
        )
        print(results[-1], flush=True)
        tokens = stage_tokens([json.loads(x) for x in pairs.read_text().splitlines()])

        layouts = [
            ("fleet of 1 behind nginx", 1, None),
            ("fleet of 2 behind nginx", 2, None),
            ("fleet of 1 behind nginx, --concurrency 2 x slots", 1, 2 * a.slots),
        ]
        for name, n, conc in layouts:
            with Fleet(
                None,
                replicas=n,
                threads=max(1, a.threads // n),
                parallel=max(1, a.slots // n),
                ctx_per_seq=2048,
                alias="smollm2",
                prefix=d / f"fleet-{n}-{conc}",
            ) as fleet:
                opts = {"base_url": fleet.url, **({"concurrency": conc} if conc else {})}
                g_rate, g = generate(a, d / f"fleet-{n}-{conc}.jsonl", "langchain", opts)
                l_rate = None
                if conc is None:
                    l_rate, _ = label(pairs, d / f"fleet-{n}-label.jsonl", "langchain", opts)
                used = json.loads((d / f"fleet-{n}-{conc}.jsonl").read_text().splitlines()[0])["meta"][
                    "runtime"
                ]
            layout = f"{n} x {max(1, a.threads // n)} threads, {max(1, a.slots // n)} slots"
            results.append((name, layout, g_rate, l_rate, used["concurrency"]))
            print(results[-1], flush=True)
    load_after = load()

    base_g, base_l = results[0][2], results[0][3]
    lines = [
        f"# generate and label through a llama.cpp fleet behind nginx ({a.limit} shipped prompts, "
        f"{a.rounds} round(s), {a.max_new_tokens} new tokens, greedy; label on those pairs)",
        "",
        cpu_line(),
        f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}",
        "",
        "| engine | processes x threads, slots each | requests in flight | generate rows/s | vs in process "
        "| label pairs/s | vs in process |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, layout, g_rate, l_rate, conc in results:
        lab = f"{l_rate:.2f} | {l_rate / base_l:.2f}x" if l_rate is not None else "- | -"
        lines.append(f"| {name} | {layout} | {conc} | {g_rate:.3f} | {g_rate / base_g:.2f}x | {lab} |")
    lines += [
        "",
        "Equal total threads and slots on every side. On 2 cores a second replica adds no compute "
        "(the same 2 threads, split), so little gain from replicas is expected here; what a fleet "
        "buys is more machines (or GPUs), which one in-process engine cannot use.",
        "",
        "Tokens per stage, from run 1's rows (re-rendered prompts, SmolLM2's tokenizer, "
        f"--max-new-tokens {a.max_new_tokens}), used by docs/recipes/vllm.md's paper model:",
        "",
        "| | mean tokens |",
        "|---|---|",
    ]
    for k, v in tokens.items():
        lines.append(f"| {k} | {v:.0f} |")
    lines += [
        "",
        f"command: `.venv/bin/python bench/bench_fleet.py --limit {a.limit} --rounds {a.rounds} "
        f"--max-new-tokens {a.max_new_tokens} --threads {a.threads} --slots {a.slots}`",
    ]
    text = "\n".join(lines) + "\n"
    write_results(ROOT / "bench" / "RESULTS-fleet.md", text)
    print(text)


if __name__ == "__main__":
    main()
