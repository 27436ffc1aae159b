"""How the engines' ratios and the re-check's cost move with the judge's size, in one run: the
embedded SmolLM2-135M, and random-weight models in the shapes of SmolLM2-360M and SmolLM2-1.7B
(bench/_shapes.py: the same tokenizer, so the same prompts and token counts; timings only).

    .venv/bin/python bench/bench_size.py                                  # 135m and 360m
    .venv/bin/python bench/bench_size.py --shapes 135m,360m,1.7b --limit 8 --pairs 24   # ~50 min

For each model, one process per measurement: generate (the first --limit shipped prompts, one
critique + revision, 64 new tokens) and label (the first --pairs HH-RLHF dev pairs, one
principle, both orders) on hf (fp32), on hf with torch held to AVX2, and on the default CPU
engine (llama.cpp, Q8_0), as bench_engines.py runs them; and on the default engine a re-check
of every principle against a one-principle label of the same pairs, as bench_recheck.py runs
it. Ratios are within one model and one run. The random models' texts and labels are noise:
only their costs are reported. The model files are written once under $CAI_CACHE/shapes
(1.7B: a 1.8 GB GGUF and 6.8 GB of safetensors). Writes bench/RESULTS-size.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402
from _shapes import EMBEDDED, SHAPES, parameters  # noqa: E402
from bench_engines import HH_DEV, measure  # noqa: E402

NAMES = {"135m": None, "360m": "smollm2-360m", "1.7b": "smollm2-1.7b"}
TASKS = ("generate", "label")
RUN = ("hf", "hf-avx2", "auto")  # bench_engines.py's engines: fp32 torch, the same held to AVX2, the default


def recheck(shape: str | None, pairs: int, repeats: int) -> dict:
    args = [sys.executable, str(HERE / "bench_recheck.py"), "--pairs", str(pairs), "--repeats", str(repeats)]
    args += ["--json"] + (["--shape", shape] if shape else [])
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_recheck for {shape or '135m'} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(
        f"recheck  auto        {shape or '':13s}re-check / label {res['ratio']['wall']:.2f}x wall, "
        f"{res['ratio']['tokens']:.2f}x tokens",
        flush=True,
    )
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="135m,360m", help=f"comma-separated, of {', '.join(NAMES)}")
    ap.add_argument("--limit", type=int, default=16, help="generate: the first N shipped prompts")
    ap.add_argument("--pairs", type=int, default=40, help="label: HH dev pairs")
    ap.add_argument("--recheck-pairs", type=int, default=8, help="re-check: HH dev pairs per repeat")
    ap.add_argument("--repeats", type=int, default=2, help="re-check: label/re-check alternations")
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    for s in shapes:
        if s not in NAMES:
            raise SystemExit(f"bench_size: unknown shape {s!r}; one of {', '.join(NAMES)}")
    if not HH_DEV.exists():
        raise SystemExit(f"bench_size: shared HH-RLHF data not found at {HH_DEV}")

    # Written once and cached, outside the timings, in a process of its own: a child inherits its
    # parent's peak RSS on Linux, so this one stays small for the children's figures to be theirs.
    todo = [NAMES[s] for s in shapes if NAMES[s]]
    if todo:
        subprocess.run([sys.executable, str(HERE / "_shapes.py"), *todo], check=True)
    up = " ".join(open("/proc/loadavg").read().split()[:3])
    t0 = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    opts = SimpleNamespace(limit=a.limit, pairs=a.pairs)
    with tempfile.TemporaryDirectory() as d:
        for s in shapes:
            shape = NAMES[s]
            got = {}
            for task in TASKS:
                for e in RUN:
                    got[task, e] = measure(task, e, Path(d) / f"{s}-{task}-{e}.jsonl", opts, shape=shape)
            got["recheck"] = recheck(shape, a.recheck_pairs, a.repeats)
            rows.append((s, shape, got))
    lines = [
        "# Engines and the re-check by model size",
        "",
        cpu_line() + ".",
        "",
        f"date: {t0}; load average at the start {up}. Each measurement in its own process; wall "
        "time includes loading the model. Models other than the embedded one are random weights "
        "in a published model's shape (bench/_shapes.py): their costs are a real model's, their "
        "texts and labels noise.",
        "",
        f"generate: {a.limit} shipped prompts, 1 round, 64 new tokens, judge on. label: {a.pairs} "
        f"HH-RLHF dev pairs, 1 principle, both orders. re-check: all 15 principles against a "
        f"one-principle label, {a.repeats} × {a.recheck_pairs} pairs after a warm-up (bench_recheck.py), "
        "on the default engine.",
        "",
        "auto ÷ hf-avx2 is the default engine against hf on a CPU without AVX-512 (torch held to its "
        "AVX2 kernels, as bench_engines.py runs it; the llama.cpp wheel runs AVX2 kernels on every CPU).",
        "",
        "| model | weights | generate s hf / hf-avx2 / auto | generate auto ÷ hf, ÷ hf-avx2 | "
        "label s hf / hf-avx2 / auto | label auto ÷ hf, ÷ hf-avx2 | judge prompt tokens/s "
        "hf / hf-avx2 / auto | re-check ÷ label (wall, tokens) | peak RSS MB hf / auto: generate, label |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, shape, g in rows:
        name = "SmolLM2-135M-Instruct (embedded)" if shape is None else f"{shape} shape, random"
        n = parameters(EMBEDDED if shape is None else SHAPES[shape])
        rate = {k: g[k]["rows"] / g[k]["seconds"] for k in g if k != "recheck"}
        tps = {e: g["label", e]["prompt_tokens"] / g["label", e]["seconds"] for e in RUN}

        def cells(task):
            secs = " / ".join(f"{g[task, e]['seconds']:.0f}" for e in RUN)
            x = [rate[task, "auto"] / rate[task, e] for e in ("hf", "hf-avx2")]
            return f"{secs} | **{x[0]:.2f}×**, {x[1]:.2f}×"

        rc = g["recheck"]["ratio"]
        lines.append(
            f"| {name} | {n / 1e6:.0f}M | {cells('generate')} | {cells('label')} | "
            + " / ".join(f"{tps[e]:.0f}" for e in RUN)
            + f" | **{rc['wall']:.2f}×**, {rc['tokens']:.2f}× | "
            + ", ".join(f"{g[t, 'hf']['peak_rss_mb']:.0f} / {g[t, 'auto']['peak_rss_mb']:.0f}" for t in TASKS)
            + " |"
        )
    lines += [
        "",
        "command: `.venv/bin/python bench/bench_size.py"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v != ap.get_default(k))
        + "`",
        "",
    ]
    report = "\n".join(lines)
    write_results(HERE / "RESULTS-size.md", report)
    print("\n" + report)


if __name__ == "__main__":
    assert set(NAMES.values()) - {None} <= set(SHAPES)
    main()
