"""`cai generate` throughput: the batched stage-by-stage engine against a one-prompt-at-a-time
loop on the same prompts, model and settings, measured in the same run.

    .venv/bin/python bench/bench_generate.py                      # 16 shipped prompts, 1 round, 48 new tokens
    .venv/bin/python bench/bench_generate.py --limit 31 --rounds 2 --max-new-tokens 128

Prints rows/s and tokens/s for both and the ratio; results also go to bench/RESULTS-generate.md.
Greedy decoding, no judge (--no-label), so both sides do exactly the same work.
"""

from __future__ import annotations

import argparse
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run(limit, rounds, max_new, batch_size, out):
    from cai.revise import GenerateConfig, run_generate

    cfg = GenerateConfig(
        constitution=str(ROOT / "constitutions/harmless"),
        prompts=str(ROOT / "constitutions/harmless/prompts.jsonl"),
        out=str(out),
        rounds=rounds,
        max_new_tokens=max_new,
        limit=limit,
        label=False,
        early_stop=False,
        backend_options={"batch_size": batch_size},
        chunk_size=max(limit, batch_size),
        overwrite=True,
    )
    t = time.perf_counter()
    s = run_generate(cfg, progress=False)
    return time.perf_counter() - t, s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    lines = [
        f"# generate throughput ({a.limit} shipped prompts, {a.rounds} round(s), "
        f"{a.max_new_tokens} new tokens, greedy, CPU)",
        "",
        cpu_line(),
        "",
    ]
    with tempfile.TemporaryDirectory() as d:
        results = {}
        for name, bs in (("batched (cai)", a.batch_size), ("one prompt at a time", 1)):
            secs, s = run(a.limit, a.rounds, a.max_new_tokens, bs, Path(d) / f"{bs}.jsonl")
            results[name] = (secs, s)
            print(
                f"{name:22s} {secs:7.1f}s  {s.written / secs:.3f} rows/s  "
                f"{s.generated_tokens / secs:.1f} tokens/s",
                flush=True,
            )
        (b_s, b), (n_s, n) = results["batched (cai)"], results["one prompt at a time"]
        lines += ["| engine | wall s | rows/s | generated tokens/s |", "|---|---|---|---|"]
        for name, (secs, s) in results.items():
            lines.append(
                f"| {name} | {secs:.1f} | {s.written / secs:.3f} | {s.generated_tokens / secs:.1f} |"
            )
        ratio = (b.written / b_s) / (n.written / n_s)
        lines += [
            "",
            f"rows/s ratio batched / one-at-a-time: **{ratio:.2f}x** "
            "(same prompts, model, settings, same run)",
            "",
            f"command: `.venv/bin/python bench/bench_generate.py --limit {a.limit} --rounds {a.rounds} "
            f"--max-new-tokens {a.max_new_tokens} --batch-size {a.batch_size}`",
        ]
        print(f"ratio: {ratio:.2f}x")
    write_results(ROOT / "bench" / "RESULTS-generate.md", "\n".join(lines))


if __name__ == "__main__":
    main()
