"""Peak memory (RSS) of the three heavy commands with the embedded defaults.

  generate  `make demo`'s generate: 31 shipped prompts, 1 round, 64 new tokens, judge on
  label     `cai label` on 300 HH-RLHF harmless dev pairs (1 principle, both orders)
  train     `cai train` on the 1,300 shared train pairs, bounded by --max-steps (default 10):
            the peak is set while the data is read and tokenised and the first steps allocate
            the model, gradients, AdamW state and activations; later steps reuse that memory.

Each command runs as its own process; its peak resident set size is the kernel's ru_maxrss
for that process (os.wait4), i.e. the true high-water mark, not a sampled value.

    .venv/bin/python bench/bench_memory.py
    .venv/bin/python bench/bench_memory.py --label-limit 300 --train-steps 0   # train: full epoch

Results: stdout and bench/RESULTS-memory.md. Label/train skip cleanly without the shared data.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
HARMLESS = ROOT / "constitutions" / "harmless"
GOAL_GIB = 2.0
GOALS = {"generate": 0.6}  # demo's generate on the default CPU engine (llama.cpp); the rest GOAL_GIB


def cai_bin() -> list[str]:
    c = ROOT / ".venv" / "bin" / "cai"
    return [str(c)] if c.exists() else [sys.executable, "-m", "cai"]


def peak_rss(args: list[str]) -> tuple[float, float, int, str]:
    """(peak RSS GiB, wall s, exit code, last output line) of one process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    last = next((x for x in reversed(out.strip().splitlines()) if x.strip()), "")
    if p.returncode:
        print(out[-3000:], file=sys.stderr)
    return ru.ru_maxrss / 2**20, time.perf_counter() - t0, p.returncode, last


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--generate-limit", type=int, default=0, help="prompts for generate (0 = all 31, as make demo)"
    )
    ap.add_argument("--label-limit", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=10, help="--max-steps for train (0 = the full epoch)")
    ap.add_argument("--only", choices=["generate", "label", "train"], action="append")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-memory.md"))
    a = ap.parse_args()
    only = set(a.only or ["generate", "label", "train"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cai = cai_bin()
    jobs = []
    gen = [
        *cai,
        "generate",
        "--constitution",
        str(HARMLESS),
        "--prompts",
        str(HARMLESS / "prompts.jsonl"),
        "--out",
        str(tmp / "demo-pairs.jsonl"),
        "--rounds",
        "1",
        "--seed",
        "0",
        "--max-new-tokens",
        "64",
    ]
    if a.generate_limit:
        gen += ["--limit", str(a.generate_limit)]
    if "generate" in only:
        jobs.append(
            (
                "`make demo`'s generate"
                + (
                    f" (first {a.generate_limit} prompts)"
                    if a.generate_limit
                    else " (31 prompts, 1 round, 64 tokens, judge)"
                ),
                gen,
            )
        )
    have_data = (DATA / "dev.jsonl.gz").exists() and (DATA / "train.jsonl.gz").exists()
    skipped = []
    if "label" in only:
        if have_data:
            jobs.append(
                (
                    f"`cai label`, {a.label_limit} dev pairs",
                    [
                        *cai,
                        "label",
                        "--pairs",
                        str(DATA / "dev.jsonl.gz"),
                        "--constitution",
                        str(HARMLESS),
                        "--out",
                        str(tmp / "dev-ai.jsonl"),
                        "--limit",
                        str(a.label_limit),
                        "--skip-bad",
                    ],
                )
            )
        else:
            skipped.append(f"label: shared data not found at {DATA}")
    if "train" in only:
        if have_data:
            steps = ["--max-steps", str(a.train_steps)] if a.train_steps else []
            jobs.append(
                (
                    "`cai train`, 1,300 train pairs"
                    + (f" (first {a.train_steps} steps)" if a.train_steps else ", 1 epoch"),
                    [
                        *cai,
                        "train",
                        "--pairs",
                        str(DATA / "train.jsonl.gz"),
                        "--out",
                        str(tmp / "rm"),
                        "--skip-bad",
                        *steps,
                    ],
                )
            )
        else:
            skipped.append(f"train: shared data not found at {DATA}")

    lines = [
        "# Peak memory (RSS) with the embedded defaults, CPU",
        "",
        f"command: `{' '.join(['.venv/bin/python', 'bench/bench_memory.py', *sys.argv[1:]])}`  ",
        f"{cpu_line()}; date {time.strftime('%Y-%m-%d %H:%M')}; peak RSS = ru_maxrss of the process "
        "(os.wait4)",
        "",
        "| command | peak RSS | goal | wall s | load avg before |",
        "|---|---|---|---|---|",
    ]
    # --only: keep the other commands' rows from the previous results
    old = Path(a.results).read_text().splitlines() if a.only and Path(a.results).exists() else []
    names = {name for name, _ in jobs}
    kept = [
        x for x in old if x.startswith("| `") and x.split(" | ")[0][2:].split(" (earlier run")[0] not in names
    ]
    kept_cmds = [
        x
        for x in old
        if x.startswith("- `cai ") and not any(x.startswith(f"- `cai {args[len(cai)]} ") for _, args in jobs)
    ]
    # a kept row names the CPU of the run that measured it (the header names this run's)
    cpu_then = next((x[5:].split(",")[0] for x in old if x.startswith("CPU: ")), "")
    tag = f" (earlier run, {cpu_then}) |" if cpu_then else " (earlier run) |"
    lines += [x.replace(" |", tag, 1) if "(earlier run" not in x else x for x in kept]
    over = []
    for name, args in jobs:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"== {name} ==", flush=True)
        rss, wall, rc, last = peak_rss(args)
        goal = next((g for k, g in GOALS.items() if k in name), GOAL_GIB)
        ok = f"< {goal:g} GiB: " + (
            "yes" if rc == 0 and rss < goal else f"FAILED (exit {rc})" if rc else "no"
        )
        if not ok.endswith("yes"):
            over.append(name)
        print(f"  peak RSS {rss:.2f} GiB, {wall:.0f}s, exit {rc}: {last}", flush=True)
        lines.append(f"| {name} | {rss:.2f} GiB | {ok} | {wall:.0f} | {load} |")
    if jobs:
        lines += [
            "",
            f"Goals (generate < {GOALS['generate']:g} GiB, the others < {GOAL_GIB:g} GiB, measured in this "
            "run): "
            + (f"**not met** by {', '.join(over)}." if over else "**met** by every command measured."),
        ]
    lines += [""] + [f"skipped — {s}" for s in skipped]
    lines += ["", "Commands (outputs to a temporary folder):", ""] + kept_cmds
    shown = (" ".join(["cai", *args[len(cai) :]]) for _, args in jobs)
    lines += [f"- `{c.replace(str(tmp), '$TMP').replace(str(ROOT) + '/', '')}`" for c in shown]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    write_results(a.results, text)


if __name__ == "__main__":
    main()
