"""hf (transformers, fp32) against llama.cpp on the same model, prompts and settings, in one run.

    .venv/bin/python bench/bench_engines.py                 # generate 16 shipped prompts
                                                            # + label 120 HH dev pairs
    .venv/bin/python bench/bench_engines.py --limit 8 --pairs 20    # a quick look

Engines (each run in its own process, so peak RSS is that engine's alone):

* ``hf``            --backend hf: the embedded SmolLM2-135M-Instruct de-quantised to fp32, batch 16
* ``hf-avx2``       the same with torch, oneDNN and MKL limited to AVX2 (an AVX2-only CPU's hf)
* ``auto``          the default on a CPU: llama.cpp (xllamacpp, in process), 16 slots, the Q4_1
                    file's Q8_0 copy
* ``llamacpp-q4_1`` the same engine on the shipped Q4_1 file as it is (what the format costs)
* ``server``        --backend langchain against `python -m cai.serve` (llama.cpp's C++ server,
                    16 slots) on the same GGUF, over loopback HTTP

generate: 16 shipped harmless prompts, 1 round (critique + revision), 64 new tokens, seed 0,
judge on. label: the first 120 pairs of ../shared/data/hh-rlhf-harmless/dev.jsonl.gz, one
principle, both orders, log-prob judge (skipped cleanly when the data is absent). Reports rows/s,
pairs/s, generated tokens/s, judge prompt tokens/s, peak RSS, the ratios against hf, and how
far the engines' labels are apart. Writes bench/RESULTS-engines.md with the CPU it ran on and
the machine's load average beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402
from _shapes import model_for  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HH_DEV = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl.gz"
ENGINES = {  # name -> (backend, backend options)
    "hf": ("hf", {"batch_size": 16, "device": "cpu"}),
    "hf-avx2": ("hf", {"batch_size": 16, "device": "cpu"}),  # run with torch limited to AVX2 (AVX2_ENV)
    "auto": ("auto", {"batch_size": 16}),
    "llamacpp-q4_1": ("llamacpp", {"batch_size": 16, "weights": "as-is"}),
    "server": ("langchain", {"batch_size": 16}),
}

DEFAULT_ENGINES = "hf,hf-avx2,auto,llamacpp-q4_1,server"
# On an AVX-512 machine: torch's own kernels, oneDNN's and MKL's limited to AVX2, as on an AVX2-only
# CPU (llama.cpp's prebuilt wheel runs its AVX2 kernels everywhere already).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


# -- one measurement, in a child process ------------------------------------------------------


def _capture_backend():
    """Keep a handle on the backend the stage loads, to read its token counters afterwards."""
    import cai.backends as B

    seen = {}
    load = B.load_backend

    def capture(*a, **kw):
        seen["backend"] = load(*a, **kw)
        return seen["backend"]

    B.load_backend = capture
    return seen


def child(
    task: str, engine: str, out: str, limit: int, pairs: int, base_url: str | None, shape: str | None = None
) -> dict:
    from cai.configs import GenerateConfig, LabelConfig

    backend, options = ENGINES[engine]
    options = dict(options)
    model = model_for(shape, backend)
    if backend == "langchain":
        options["base_url"], model = base_url, "smollm2"
    seen = _capture_backend()
    t = time.perf_counter()
    if task == "generate":
        from cai.revise import run_generate

        cfg = GenerateConfig(
            constitution=str(ROOT / "constitutions/harmless"),
            prompts=str(ROOT / "constitutions/harmless/prompts.jsonl"),
            out=out,
            model=model,
            backend=backend,
            backend_options=options,
            rounds=1,
            seed=0,
            max_new_tokens=64,
            limit=limit or None,
            overwrite=True,
        )
        s = run_generate(cfg, progress=False)
        res = {"rows": s.written, "generated_tokens": s.generated_tokens}
    else:
        from cai.feedback import run_label

        cfg = LabelConfig(
            pairs=str(HH_DEV),
            constitution=str(ROOT / "constitutions/harmless"),
            out=out,
            model=model,
            backend=backend,
            backend_options=options,
            limit=pairs,
            skip_bad=True,  # the shared dev file has a row with an empty response
            overwrite=True,
        )
        s = run_label(cfg)
        res = {"rows": s.labelled}
    stats = getattr(seen.get("backend"), "stats", {})
    res.update(
        seconds=time.perf_counter() - t,
        prompt_tokens=stats.get("prompt_tokens", 0),
        computed_tokens=stats.get("computed_tokens", 0),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if task == "generate" and not res["generated_tokens"]:
        res["generated_tokens"] = stats.get("generated_tokens", 0)
    return res


def scaling(engine: str) -> dict:
    """Why the ratios are what they are: prompt tokens/s (prefill: 8 distinct ~450-token prompts,
    one next-token distribution each) and, for llama.cpp, generated tokens/s against the number
    of sequences decoded together (16 shipped prompts, 64 new tokens)."""
    base = "The quick brown fox jumps over the lazy dog while the cat watches from the wall. " * 30
    longs = [[{"role": "user", "content": f"Story {i}: {base}"}] for i in range(8)]
    res = {}
    if engine == "hf":
        from cai.backends.hf import HFBackend

        b = HFBackend(None, batch_size=8, device="cpu")
    else:
        from cai.backends.llamacpp import LlamaCppBackend

        b = LlamaCppBackend(None, batch_size=8)
    b.option_logprobs(longs[:1], ["A", "B"])  # warm-up
    tok0 = b.stats["prompt_tokens"]
    t = time.perf_counter()
    b.option_logprobs(longs, ["A", "B"])
    res["prefill_tokens_per_s"] = (b.stats["prompt_tokens"] - tok0) / (time.perf_counter() - t)
    if engine == "auto":
        from cai.backends.llamacpp import LlamaCppBackend

        rows = [
            json.loads(x) for x in (ROOT / "constitutions/harmless/prompts.jsonl").read_text().splitlines()
        ]
        convs = [
            [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
            for r in rows[:16]
        ]
        res["decode"] = []
        for bs in (1, 4, 16):
            d = LlamaCppBackend(None, batch_size=bs)
            t = time.perf_counter()
            gens = d.generate(convs, max_new_tokens=64)
            secs = time.perf_counter() - t
            res["decode"].append(
                {"sequences": bs, "seconds": secs, "tokens_per_s": sum(g.n_tokens for g in gens) / secs}
            )
            d.close()
    return res


# -- the driver ---------------------------------------------------------------------------------


def measure(task, engine, out, a, base_url=None, shape=None) -> dict:
    args = [
        sys.executable,
        __file__,
        "--child",
        task,
        "--engine",
        engine,
        "--out",
        str(out),
        "--pairs",
        str(a.pairs),
    ]
    if a.limit:
        args += ["--limit", str(a.limit)]
    if base_url:
        args += ["--base-url", base_url]
    if shape:
        args += ["--shape", shape]
    load = os.getloadavg()[0]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)  # each engine with its own default
    if engine == "hf-avx2":
        env.update(AVX2_ENV)
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{task} with {engine} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load"] = (load + os.getloadavg()[0]) / 2
    print(
        f"{task:8s} {engine:11s} {shape or '':13s}{res['seconds']:7.1f}s  "
        f"{res['rows'] / res['seconds']:.3f} rows/s  "
        f"peak RSS {res['peak_rss_mb']:.0f} MB  (load {res['load']:.1f})",
        flush=True,
    )
    return res


def _labels(path) -> dict:
    return {r["id"]: r["label"]["p_chosen"] for r in map(json.loads, Path(path).read_text().splitlines())}


def _texts(path) -> dict:
    return {r["id"]: r["trace"]["initial"] for r in map(json.loads, Path(path).read_text().splitlines())}


def _spread(a: dict, b: dict) -> str:
    """Median and 95th percentile of |Δ p_chosen| over the pairs both labelled."""
    d = sorted(abs(a[i] - b[i]) for i in set(a) & set(b))
    if not d:
        return ""
    q = lambda f: d[min(len(d) - 1, int(f * len(d)))]  # noqa: E731
    return f"; |Δ p_chosen| median {q(0.5):.3f}, 95th percentile {q(0.95):.3f}"


def agreement(a: dict, b: dict) -> tuple[float, float, int]:
    """(share of ids where both pick the same side, mean |p_a - p_b|, n)."""
    ids = sorted(set(a) & set(b))
    same = sum((a[i] > 0.5) == (b[i] > 0.5) for i in ids)
    return same / len(ids), sum(abs(a[i] - b[i]) for i in ids) / len(ids), len(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=16, help="generate: the first N shipped prompts (0: all 31)")
    ap.add_argument("--pairs", type=int, default=120, help="label: HH dev pairs")
    ap.add_argument("--engines", default=DEFAULT_ENGINES)
    ap.add_argument("--child", choices=("generate", "label", "scaling"))
    ap.add_argument("--engine", choices=tuple(ENGINES))
    ap.add_argument("--out")
    ap.add_argument("--base-url")
    ap.add_argument("--shape", help="a child's model: the random-weight model of this shape (bench_size.py)")
    a = ap.parse_args()
    if a.child == "scaling":
        print(json.dumps(scaling(a.engine)))
        return
    if a.child:
        print(json.dumps(child(a.child, a.engine, a.out, a.limit, a.pairs, a.base_url, a.shape)))
        return

    engines = a.engines.split(",")
    server = None
    if "server" in engines:
        sys.path.insert(0, str(ROOT / "tests"))
        from llama_server import HAVE_LLAMA_CPP, LlamaServer

        if HAVE_LLAMA_CPP:
            server = LlamaServer(threads=len(os.sched_getaffinity(0)), parallel=16, ctx_per_seq=2048).start()
        else:
            engines.remove("server")
    results: dict[tuple[str, str], dict] = {}
    up = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    try:
        with tempfile.TemporaryDirectory() as d:
            for task in ("generate", "label"):
                if task == "label" and not HH_DEV.exists():
                    print(f"label: skipped, {HH_DEV} not found", flush=True)
                    continue
                for e in engines:
                    out = Path(d) / f"{task}-{e}.jsonl"
                    results[task, e] = measure(
                        task, e, out, a, server.url if (server and e == "server") else None
                    )
                    results[task, e]["out"] = out
            scale = {}
            for e in ("hf", "auto"):
                if e in engines:
                    env = dict(os.environ)
                    p = subprocess.run(
                        [sys.executable, __file__, "--child", "scaling", "--engine", e],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    if p.returncode == 0:
                        scale[e] = json.loads(p.stdout.strip().splitlines()[-1])
                        print(f"scaling  {e}: {scale[e]}", flush=True)
            report = render(results, engines, a, up, scale)
    finally:
        if server:
            server.stop()
    write_results(ROOT / "bench" / "RESULTS-engines.md", report)
    print("\n" + report)


def render(results, engines, a, up, scale=None) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = [
        "# Engines: hf (fp32) vs llama.cpp, same model, prompts and settings",
        "",
        cpu_line() + ".",
        "",
        f"{cores} CPU cores; load average at the start {' '.join(up)} "
        "(per-run load beside each row). "
        "Each engine runs in its own process; wall time includes loading the model.",
        "",
    ]
    if ("generate", "hf") in results:
        hf = results["generate", "hf"]
        base = hf["rows"] / hf["seconds"]
        lines += [
            f"## generate: {hf['rows']} shipped prompts, 1 round (critique + revision), 64 new tokens, "
            "judge on",
            "",
            "| engine | wall s | rows/s | × hf | generated tokens/s | peak RSS MB | load |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in engines:
            r = results.get(("generate", e))
            if r:
                rps = r["rows"] / r["seconds"]
                lines.append(
                    f"| {e} | {r['seconds']:.1f} | {rps:.3f} | **{rps / base:.2f}×** | "
                    f"{r['generated_tokens'] / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['load']:.1f} |"
                )
        lines.append("")
        for e in engines:
            if e != "hf" and ("generate", e) in results:
                t_hf, t_e = _texts(hf["out"]), _texts(results["generate", e]["out"])
                ids = set(t_hf) & set(t_e)
                same = sum(t_hf[i] == t_e[i] for i in ids)
                ag, dp, n = agreement(_labels(hf["out"]), _labels(results["generate", e]["out"]))
                lines.append(
                    f"- {e} vs hf: identical greedy initial responses {same}/{len(ids)}; "
                    f"judge picks the same side on {ag:.0%} of the pairs (mean |Δp| {dp:.3f}, n={n}; "
                    "the pairs themselves differ where the texts do)"
                )
        lines.append("")
    if ("label", "hf") in results:
        hf = results["label", "hf"]
        base = hf["rows"] / hf["seconds"]
        lines += [
            f"## label: {hf['rows']} HH-RLHF harmless dev pairs (1 principle, both orders, log-prob judge)",
            "",
            "| engine | wall s | pairs/s | × hf | judge prompt tokens/s | peak RSS MB | load |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in engines:
            r = results.get(("label", e))
            if r:
                pps = r["rows"] / r["seconds"]
                tok = f"{r['prompt_tokens'] / r['seconds']:.0f}" if r["prompt_tokens"] else "n/a"
                lines.append(
                    f"| {e} | {r['seconds']:.1f} | {pps:.3f} | **{pps / base:.2f}×** | {tok} | "
                    f"{r['peak_rss_mb']:.0f} | {r['load']:.1f} |"
                )
        lines.append("")
        lhf = _labels(hf["out"])
        for e in engines:
            if e != "hf" and ("label", e) in results:
                ag, dp, n = agreement(lhf, _labels(results["label", e]["out"]))
                lines.append(
                    f"- label agreement {e} vs hf: same side on **{ag:.1%}** of {n} pairs, "
                    f"mean |p_chosen difference| {dp:.3f}" + _spread(lhf, _labels(results["label", e]["out"]))
                )
        lines.append("")
    if scale:
        lines += [
            "## why: prefill vs decode, sequences per step",
            "",
            "Prompt tokens/s (prefill; 8 distinct ~450-token prompts, next-token log-probs only): "
            + ", ".join(f"{e} **{v['prefill_tokens_per_s']:.0f}**" for e, v in scale.items())
            + ".",
            "",
        ]
        if "auto" in scale and scale["auto"].get("decode"):
            lines += [
                "llama.cpp generated tokens/s by sequences decoded together (16 shipped prompts, "
                "64 new tokens):",
                "",
                "| sequences | tokens/s | s |",
                "|---|---|---|",
            ]
            for d in scale["auto"]["decode"]:
                lines.append(f"| {d['sequences']} | {d['tokens_per_s']:.1f} | {d['seconds']:.1f} |")
            lines.append("")
    lines += [
        "command: `.venv/bin/python bench/bench_engines.py"
        + (f" --limit {a.limit}" if a.limit != 16 else "")
        + (f" --pairs {a.pairs}" if a.pairs != 120 else "")
        + (f" --engines {a.engines}" if a.engines != DEFAULT_ENGINES else "")
        + "`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
