"""How `cai generate` scales: rows/s against the number of prompts (should stay flat), and time
against rounds and max_new_tokens (should grow linearly). Each setting runs through
run_generate (the CLI's code path) on a fresh default engine (`--backend auto`: llama.cpp on a
CPU), loaded before the clock starts; greedy, judge on, batch 16.

Prompts: the 31 shipped red-team prompts, then the first user turns of the shared HH-RLHF dev
pairs (distinct texts; see prompt_pool), so a larger size adds prompts and repeats none. To keep
the 256-prompt run affordable on a CPU every size uses a short --max-new-tokens (default 16); the
rounds sweep turns early stop off so each round really runs.

    .venv/bin/python bench/bench_scaling.py                 # ~10-20 min on 2 busy cores
    .venv/bin/python bench/bench_scaling.py --sizes 16 32 --rounds 1 2 --tokens 8 16   # quick

Results: stdout, bench/RESULTS-scaling.md and the plot bench/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
HARMLESS = ROOT / "constitutions" / "harmless"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"


def prompt_pool() -> list[dict]:
    """The 31 shipped red-team prompts, then the first user turn of each shared HH-RLHF dev pair
    (distinct texts, in file order) where that data is present. Every size takes the first n, so a
    larger size adds prompts and never repeats one: the llama.cpp engine computes a repeated
    prompt once, which would make larger sizes look cheaper per row."""
    pool = [json.loads(x) for x in (HARMLESS / "prompts.jsonl").read_text().splitlines() if x.strip()]
    if DATA.exists():
        from cai.records import read_pairs

        seen = {json.dumps(p["prompt"]) for p in pool}  # a prompt is a text or a conversation
        for r in read_pairs(DATA, skip_bad=True):
            text = r["prompt"][0]["content"] if isinstance(r["prompt"], list) else str(r["prompt"])
            if text.strip() and json.dumps(text) not in seen:
                seen.add(json.dumps(text))
                pool.append({"id": f"hh-dev-{r['id']}", "prompt": text})
    return pool


def prompts_file(n: int, d: Path) -> Path:
    pool = prompt_pool()
    if n > len(pool):
        sys.exit(f"bench_scaling: {n} prompts asked for, {len(pool)} distinct ones available (see --sizes)")
    out = d / f"prompts-{n}.jsonl"
    with open(out, "w") as f:
        for p in pool[:n]:
            f.write(json.dumps({"id": p["id"], "prompt": p["prompt"]}) + "\n")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--size-tokens", type=int, default=16, help="max_new_tokens for the prompt-count sweep")
    ap.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--sweep-prompts", type=int, default=16, help="prompts for the rounds/tokens sweeps")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-scaling.md"))
    ap.add_argument("--plot", default=str(ROOT / "bench" / "scaling.png"))
    a = ap.parse_args()

    import cai.backends as backends
    from cai.revise import GenerateConfig, run_generate

    load_backend = backends.load_backend
    engines: set[str] = set()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))

    def run(n, rounds, tokens, early_stop=True):
        # A fresh engine for every run, loaded before the clock starts: run_generate's own path,
        # without one run's cached prefixes or remembered results making the next one cheaper.
        backend = load_backend("auto", None, batch_size=16)  # the default engine here
        backends.load_backend = lambda *x, **k: backend
        rt = backends.runtime(backend)
        engines.add(f"{rt.get('backend')} ({rt.get('engine') or ''}, {rt.get('weights') or 'as stored'})")
        cfg = GenerateConfig(
            constitution=str(HARMLESS),
            prompts=str(prompts_file(n, tmp)),
            out=str(tmp / f"o-{n}-{rounds}-{tokens}.jsonl"),
            rounds=rounds,
            max_new_tokens=tokens,
            seed=0,
            early_stop=early_stop,
            backend_options={"batch_size": 16},
            overwrite=True,
        )
        load = os.getloadavg()[0]
        w0, c0 = time.perf_counter(), time.process_time()
        s = run_generate(cfg, progress=False)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        print(
            f"  {n} prompts, {rounds} round(s), {tokens} tokens: {w:.1f}s wall, {c:.1f} CPU-s, "
            f"{s.written / w:.3f} rows/s, {s.written / c:.3f} rows/CPU-s (load {load:.1f})",
            flush=True,
        )
        return {
            "n": n,
            "rounds": rounds,
            "tokens": tokens,
            "wall": w,
            "cpu": c,
            "rows": s.written,
            "load": load,
            "gen_tokens": s.generated_tokens,
        }

    run(4, 1, 4)  # warm-up: first-call checks, allocator
    print("== rows/s against the number of prompts ==", flush=True)
    sizes = [run(n, 1, a.size_tokens) for n in a.sizes]
    print("== time against rounds (early stop off) ==", flush=True)
    rounds = [run(a.sweep_prompts, r, a.size_tokens, early_stop=False) for r in a.rounds]
    print("== time against max_new_tokens ==", flush=True)
    tokens = [run(a.sweep_prompts, 1, t) for t in a.tokens]

    def fit(xs, ys):
        """Least-squares line and its R²."""
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs) or 1e-12
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        c = my - b * mx
        ss = sum((y - my) ** 2 for y in ys) or 1e-12
        r2 = 1 - sum((y - (b * x + c)) ** 2 for x, y in zip(xs, ys)) / ss
        return b, c, r2

    L = []
    say = L.append
    engine = "; ".join(sorted(engines))
    say("# Scaling of `cai generate` (greedy, judge on, batch 16, CPU, the default engine)")
    say("")
    say(f"command: `{' '.join(['.venv/bin/python', 'bench/bench_scaling.py', *sys.argv[1:]])}`  ")
    say(cpu_line() + "  ")
    say(
        f"date {time.strftime('%Y-%m-%d %H:%M')}; engine: {engine}; a fresh engine per run, loaded "
        "before the clock starts; prompts: the 31 shipped ones, then HH-RLHF dev first turns (none "
        "repeated); wall and CPU time of run_generate only. CPU-s is the steadier column on a shared "
        "machine."
    )
    say("")
    say(f"## Rows/s against prompts (1 round, {a.size_tokens} new tokens)")
    say("")
    say("| prompts | wall s | CPU-s | rows/s | rows per CPU-s | load avg |")
    say("|---|---|---|---|---|---|")
    for r in sizes:
        say(
            f"| {r['n']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rows'] / r['wall']:.3f} | "
            f"{r['rows'] / r['cpu']:.3f} | "
            f"{r['load']:.1f} |"
        )
    per = [r["rows"] / r["cpu"] for r in sizes]
    say("")
    say(f"rows per CPU-s, largest / smallest size: {per[-1] / per[0]:.2f}x (1.00 = flat)")
    for title, data, key, unit in (
        ("rounds (early stop off", rounds, "rounds", "round"),
        ("max_new_tokens (1 round", tokens, "tokens", "token"),
    ):
        say("")
        say(f"## Time against {title}, {a.sweep_prompts} prompts)")
        say("")
        say(f"| {key} | wall s | CPU-s | generated tokens | load avg |")
        say("|---|---|---|---|---|")
        for r in data:
            say(f"| {r[key]} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['gen_tokens']} | {r['load']:.1f} |")
        b, c, r2 = fit([r[key] for r in data], [r["cpu"] for r in data])
        say("")
        say(f"CPU-s ≈ {c:.1f} + {b:.2f} per {unit} (least squares, R² = {r2:.3f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].plot([r["n"] for r in sizes], [r["rows"] / r["cpu"] for r in sizes], "o-", label="rows per CPU-s")
    ax[0].plot(
        [r["n"] for r in sizes], [r["rows"] / r["wall"] for r in sizes], "s--", label="rows per wall s"
    )
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("prompts")
    ax[0].set_title(f"throughput (1 round, {a.size_tokens} tokens)")
    ax[0].set_ylim(bottom=0)
    ax[0].legend()
    for axis, data, key, title in (
        (ax[1], rounds, "rounds", "rounds (early stop off)"),
        (ax[2], tokens, "tokens", "max_new_tokens (1 round)"),
    ):
        axis.plot([r[key] for r in data], [r["cpu"] for r in data], "o-", label="CPU-s")
        axis.plot([r[key] for r in data], [r["wall"] for r in data], "s--", label="wall s")
        axis.set_xlabel(key)
        axis.set_title(f"time vs {title}, {a.sweep_prompts} prompts")
        axis.set_ylim(bottom=0)
        axis.legend()
    fig.tight_layout()
    fig.savefig(a.plot, dpi=90)
    say("")
    say(f"plot: `{Path(a.plot).relative_to(ROOT) if Path(a.plot).is_relative_to(ROOT) else a.plot}`")
    text = "\n".join(L) + "\n"
    print("\n" + text)
    write_results(a.results, text)


if __name__ == "__main__":
    main()
