"""What `--recheck` costs: every principle of the harmless constitution (15), both orders, against
a one-principle label of the same pairs, measured in one run on one loaded model.

Both sides go through the code `cai label --recheck` runs: `judge.judge_pairs` (the label,
one principle drawn per pair, both orders) and `judge.recheck_pairs` (the re-check: 15
principles x 2 orders per pair, from recheck.jinja, whose prompts share everything but a few
tokens per principle), alternating as `--recheck` alternates them, on the default engine
(`--backend auto`: llama.cpp on a CPU) or the one named. Each repeat judges pairs of its own.

    .venv/bin/python bench/bench_recheck.py                   # 2 x 8 HH-RLHF dev pairs
    .venv/bin/python bench/bench_recheck.py --pairs 16 --repeats 3 --fallback
    .venv/bin/python bench/bench_recheck.py --shape smollm2-1.7b   # a judge of that size (random
                                                                   # weights: bench/_shapes.py)

Reports wall seconds, CPU seconds of this process and model tokens computed (padding included:
the work done, independent of machine load) for each side, and their ratios, re-check / label.
`--fallback` also times the re-check from compare.jinja (one full judge prompt per principle,
what a constitution without recheck.jinja gets) on the same pairs. Results go to stdout and
bench/RESULTS-recheck.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402
from _shapes import model_for  # noqa: E402

sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"
HARMLESS = ROOT / "constitutions" / "harmless"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

OUT: list[str] = []
WARM_FROM = 100  # pairs after the timed ones the warm-up's two longest are taken from


def say(line: str = ""):
    print(line, flush=True)
    OUT.append(line)


def measure(backend, fn) -> dict:
    """Wall s, CPU s of this process (all its threads) and tokens the model computed."""
    tok0 = backend.stats.get("computed_tokens", 0)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return {
        "wall": time.perf_counter() - w0,
        "cpu": time.process_time() - c0,
        "tokens": backend.stats.get("computed_tokens", 0) - tok0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8, help="HH-RLHF dev pairs (the first N)")
    ap.add_argument("--repeats", type=int, default=2, help="label/re-check alternations")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--backend", default="auto", help="auto (the default engine: llama.cpp on a CPU), hf, ..."
    )
    ap.add_argument("--fallback", action="store_true", help="also time the re-check from compare.jinja")
    ap.add_argument(
        "--shape", help="a random-weight model of this shape (bench/_shapes.py), not the embedded one"
    )
    ap.add_argument(
        "--json", action="store_true", help="end with the figures as a JSON line; write no RESULTS"
    )
    a = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"bench_recheck: shared HH-RLHF data not found at {DATA} (see docs/pairs-contract.md)")

    import torch

    from cai import __version__
    from cai.backends import load_backend
    from cai.constitution import load_constitution
    from cai.judge import judge_pairs, recheck_pairs
    from cai.records import read_pairs, response_text

    const = load_constitution(HARMLESS)
    # Each repeat judges pairs of its own (the engines remember results for prompts they saw, so a
    # repeat on the same pairs would time a lookup). The warm-up brings the engine to where a
    # long run is: it judges the two longest of the next WARM_FROM pairs, so the slots have
    # grown (llama.cpp's slots start at 512 tokens and double, restarting the server and
    # dropping every cached prefix, when a call needs more), then labels and re-checks a chunk
    # of other pairs, so the judge slots hold the re-check's question list again.
    n_timed = a.pairs * a.repeats
    every = read_pairs(DATA, limit=n_timed + WARM_FROM)
    if len(every) < n_timed + a.pairs + 2:  # the warm-up's two and its chunk are pairs of their own
        sys.exit(f"bench_recheck: {DATA} has {len(every)} pairs; ask for fewer --pairs or --repeats")

    def items_of(rows):
        return [(r["prompt"], response_text(r["chosen"]), response_text(r["rejected"])) for r in rows]

    def size(r):
        return sum(len(m["content"]) for m in [*r["prompt"], *r["chosen"], *r["rejected"]])

    rest = sorted(every[n_timed:], key=size)
    warm, chunk = rest[-2:], rest[: a.pairs]
    sets = [every[k * a.pairs : (k + 1) * a.pairs] for k in range(a.repeats)]
    load0 = os.getloadavg()[0]
    backend = load_backend(a.backend, model_for(a.shape, a.backend), batch_size=a.batch_size)
    say(f"# What `--recheck` costs: {len(const.ids)} principles vs a one-principle label")
    say()
    say("command: `" + " ".join([".venv/bin/python bench/bench_recheck.py", *sys.argv[1:]]) + "`")
    say(
        f"{cpu_line()} (load average "
        f"{load0:.1f} at start), torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"cai {__version__}, backend {backend.name} ({backend.model_id}), batch size {a.batch_size}"
    )
    say(f"date: {time.strftime('%Y-%m-%d %H:%M')}")
    say()
    say("```")
    # the one-time path checks (prefix tree vs plain batches), caches and slot growth, outside
    # the timings; the second round leaves the question list in the judge slots, as a long run has it
    for rows in (warm, chunk):
        judge_pairs(backend, const, rows, principles=1)
        recheck_pairs(backend, const, items_of(rows))

    starts = backend.stats.get("server_starts")  # None: the engine does not restart (not llama.cpp)
    runs: dict[str, list[dict]] = {"label": [], "recheck": []}
    for k, rows in enumerate(sets):  # alternate the order, so a change in machine load hits both sides
        order = (
            ("label", lambda: judge_pairs(backend, const, rows, principles=1)),
            ("recheck", lambda: recheck_pairs(backend, const, items_of(rows))),
        )
        for name, fn in order if k % 2 == 0 else order[::-1]:
            runs[name].append(measure(backend, fn))

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    n = a.pairs
    say(f"{a.repeats} runs of {n} HH-RLHF harmless dev pairs each (its own pairs), both orders (median)")
    say(f"{'':38s} {'wall s':>8s} {'CPU s':>8s} {'tokens':>8s} {'tokens/pair':>12s}")
    for name, desc in (
        ("label", "label, 1 principle (2 prompts/pair)"),
        ("recheck", f"re-check, {len(const.ids)} principles ({2 * len(const.ids)} prompts/pair)"),
    ):
        say(
            f"{desc:38s} {med(name, 'wall'):8.2f} {med(name, 'cpu'):8.2f} {med(name, 'tokens'):8.0f} "
            f"{med(name, 'tokens') / n:12.0f}"
        )
    r = {k: med("recheck", k) / med("label", k) for k in ("wall", "cpu", "tokens")}
    say(
        f"re-check / label: {r['wall']:.2f}x wall, {r['cpu']:.2f}x CPU time, {r['tokens']:.2f}x tokens "
        "computed (goal <= 1.5x)"
    )
    say(
        f"`cai label --recheck` (label + re-check) / `cai label`: {1 + r['wall']:.2f}x wall, "
        f"{1 + r['tokens']:.2f}x tokens"
    )
    say(
        f"wall per run: label {[round(x['wall'], 2) for x in runs['label']]}, re-check "
        f"{[round(x['wall'], 2) for x in runs['recheck']]}"
    )
    if a.fallback:
        with tempfile.TemporaryDirectory() as d:
            plain = Path(d) / "harmless"
            shutil.copytree(HARMLESS, plain)
            (plain / "templates" / "recheck.jinja").unlink()
            pc = load_constitution(plain)
            f = measure(backend, lambda: recheck_pairs(backend, pc, items_of(sets[0])))
        say(
            f"{'re-check from compare.jinja (fallback)':38s} {f['wall']:8.2f} {f['cpu']:8.2f} "
            f"{f['tokens']:8.0f} {f['tokens'] / n:12.0f}"
        )
        say(
            f"fallback / label: {f['wall'] / med('label', 'wall'):.2f}x wall, "
            f"{f['tokens'] / med('label', 'tokens'):.2f}x tokens (what recheck.jinja saves)"
        )
    if starts is not None:
        say(f"server restarts during the timed runs: {backend.stats['server_starts'] - starts} (slots grown)")
    say(f"load average at the end: {os.getloadavg()[0]:.1f}")
    say("```")
    if a.json:
        import json

        figures = {name: {k: med(name, k) for k in ("wall", "cpu", "tokens")} for name in runs}
        print(json.dumps({**figures, "ratio": r, "pairs": n, "repeats": a.repeats}))
        return
    write_results(ROOT / "bench" / "RESULTS-recheck.md", "\n".join(OUT))


if __name__ == "__main__":
    main()
