"""`cai generate` against this machine's limit: fp32 GEMM peak, prefill/decode FLOP/s as fractions
of it, and where the wall time goes.

In one process, one run:
  1. the fp32 matmul peak: torch.mm on 2048x2048 fp32 matrices with the thread count cai uses,
     in GFLOP per wall second and per CPU-second (the second is steadier on a shared machine);
  2. the model's linear layers alone at 1/15/16/32/64 rows (one decode step's matmuls on the real
     weights, through cai's rowkernel where it runs, and torch's x @ W.T at 16 rows beside it);
  3. `cai generate` (run_generate, the CLI's code path, with the backend loaded beforehand) on the
     shipped prompts with forward hooks on the model and timers on the backend, split into:
     model load, tokenisation, prefill forwards, decode forwards, the decode loop's Python between
     forwards, detokenisation, the judge, and the rest (templates, cleaning, writing rows).
     FLOPs per forward = 2 x (linear weights) x tokens computed + 2 x vocab x hidden per row whose
     logits are computed + 4 x layers x heads x head_dim x attended positions per token.

    .venv/bin/python bench/bench_roofline.py                      # 16 prompts, 1 round, 64 tokens, judge on
    .venv/bin/python bench/bench_roofline.py --limit 4 --max-new-tokens 8   # smoke test

Results: stdout and bench/RESULTS-roofline.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HARMLESS = ROOT / "constitutions" / "harmless"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def clock():
    return time.perf_counter(), time.process_time()


def since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def gemm_peak(seconds=3.0, n=2048):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    k, t = 0, clock()
    while time.perf_counter() - t[0] < seconds:
        torch.mm(a, b)
        k += 1
    w, c = since(t)
    f = 2 * n**3 * k
    return f / w / 1e9, f / c / 1e9


def linears_only(model, packed_bytes=None, rows=("1 torch", 1, 15, 16, "16 torch", 32, 64), reps=3):
    """One decode step's matmuls (every nn.Linear of the model, in order) on the real weights, as
    cai runs them (cai.backends.rowkernel for 1-16 rows where it is installed, else
    cai.backends.hf.route_small_linears; torch above 16 rows); "16 torch": torch's own x @ W.T
    on the fp32 weights at 16 rows, for comparison; "1 torch": a matrix-vector product on the
    fp32 weights, the rate at which this core streams memory. GB/CPU-s: the bytes of weights
    each path reads (the packed ones for rowkernel) per CPU-second."""
    import torch
    import torch.nn.functional as F

    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.weight.numel() for m in lins)
    out = {}
    with torch.inference_mode():
        for key in rows:
            M = int(str(key).split()[0])
            plain = str(key).endswith("torch")
            nbytes = packed_bytes if packed_bytes and M <= 16 and not plain else 4 * n
            xs = {d: torch.randn(M, d) for d in {m.in_features for m in lins}}
            best = None
            for _ in range(reps):
                t = clock()
                for m in lins:
                    x = xs[m.in_features]
                    F.linear(x, m.weight, m.bias) if plain else m(x)
                w, c = since(t)
                best = (w, c) if best is None or c < best[1] else best
            out[key] = (2 * M * n / best[0] / 1e9, 2 * M * n / best[1] / 1e9, nbytes / best[1] / 1e9)
    return out


class Profile:
    """Forward hooks on the model + timers on the backend's methods."""

    def __init__(self, backend):
        import torch

        self.b, self.torch = backend, torch
        m = backend.model
        cfg = m.config
        self.layers, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.lm = cfg.vocab_size * cfg.hidden_size
        self.lin = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear)) - (
            self.lm if m.get_output_embeddings() is not None else 0
        )
        self.phase = "generate"
        self.t = defaultdict(lambda: [0.0, 0.0])  # name -> [wall, cpu]
        self.flops = defaultdict(float)
        self.tokens = defaultdict(int)  # computed (incl. padding) per kind
        self.real = defaultdict(int)
        self.calls = defaultdict(int)
        self.b16 = [0.0, 0.0, 0.0]  # decode steps at the full batch of 16: flops, wall, cpu
        self.b16_steps, self.b16_kv = 0, 0  # those steps, and the KV positions their rows attend to
        kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.kv_bytes_per_pos = 2 * self.layers * kv_heads * self.head_dim * 4  # fp32 K and V, all layers
        self.waste_hf = 0  # row-steps generate() would have computed for finished rows
        self.needed = 0  # decode row-steps the rows actually needed
        self._start = None
        m.register_forward_pre_hook(self._pre, with_kwargs=True)
        m.register_forward_hook(self._post, with_kwargs=True)
        self.reused = 0  # prompt tokens whose KV a generate() call took from the previous call
        self._wrap("generate")
        gen = self.b.generate

        def generate(*a, **k):
            before = self.b.stats["prefix_tokens_reused"]
            try:
                return gen(*a, **k)
            finally:
                self.reused += self.b.stats["prefix_tokens_reused"] - before

        self.b.generate = generate
        self._wrap("option_logprobs", phase="judge")
        self._wrap("_encode")
        self._wrap("render")
        self._wrap_decode()
        tok = backend.tok
        dec = tok.decode

        def decode(*a, **k):
            t = clock()
            try:
                return dec(*a, **k)
            finally:
                self._add("detokenise", t)

        tok.decode = decode

    def _add(self, name, t):
        w, c = since(t)
        self.t[name][0] += w
        self.t[name][1] += c

    def _wrap(self, name, phase=None):
        fn = getattr(self.b, name)

        def wrapped(*a, **k):
            old = self.phase
            if phase:
                self.phase = phase
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                self._add(f"{name}:{old}", t)
                self.phase = old

        setattr(self.b, name, wrapped)

    def _wrap_decode(self):
        fn = self.b._decode

        def wrapped(enc, max_new, temperature, *a, **k):
            rows = fn(enc, max_new, temperature, *a, **k)
            lens = [len(r) for r in rows]
            # decode forwards a row needs: one per token after the first (which comes from prefill)
            self.needed += sum(max(0, x - 1) for x in lens)
            self.waste_hf += len(lens) * (max(lens) - 1) - sum(max(0, x - 1) for x in lens)
            return rows

        self.b._decode = wrapped

    def _pre(self, mod, args, kwargs):
        self._start = clock()

    def _post(self, mod, args, kwargs, out):
        w, c = since(self._start)
        ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        B, T = ids.shape
        kv = mask.shape[1] if mask is not None else T
        keep = kwargs.get("logits_to_keep") or 0
        logit_rows = B * (keep if keep else T)
        attended = B * T * (kv - T) + B * T * (T + 1) / 2  # causal within the new tokens
        f = (
            2 * self.lin * B * T
            + 2 * self.lm * logit_rows
            + 4 * self.layers * self.heads * self.head_dim * attended
        )
        kind = "judge" if self.phase == "judge" else ("decode" if T == 1 else "prefill")
        self.flops[kind] += f
        self.tokens[kind] += B * T
        self.real[kind] += int(mask[:, -T:].sum()) if mask is not None else B * T
        self.calls[kind] += 1
        self.t["fwd:" + kind][0] += w
        self.t["fwd:" + kind][1] += c
        if kind == "decode" and B == 16:
            self.b16[0] += f
            self.b16[1] += w
            self.b16[2] += c
            self.b16_steps += 1
            self.b16_kv += B * kv


def lin_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def judge_bound(backend, n: int):
    """The judge on n HH-RLHF dev pairs, one principle, both orders: tokens computed (padding
    included) against tokens needed (every distinct prefix of the call's prompts once, no
    padding: the conversation once per pair, then each order's own suffix), and pairs/s."""
    import cai.feedback as feedback
    from cai.backends.hf import _radix_tree, _tree_tokens
    from cai.constitution import load_constitution
    from cai.feedback import judge_pairs

    render = getattr(feedback, "render_judge_prompt", None) or getattr(feedback, "_render")
    from cai.records import read_pairs

    if not (DATA / "dev.jsonl.gz").exists():
        return None
    const = load_constitution(HARMLESS)
    rows = read_pairs(DATA / "dev.jsonl.gz", limit=n, skip_bad=True)
    prompts = [
        render(const, r, p, order == 0, False, "")
        for r in rows
        for p in const.sample(0, str(r["id"]), 1)
        for order in (0, 1)
    ]
    ids = backend._encode([backend.render(x) for x in prompts])
    needed, plain = _tree_tokens(_radix_tree(ids)), sum(len(x) for x in ids)
    before = backend.stats["computed_tokens"]
    t = clock()
    judge_pairs(backend, const, rows, principles=1, seed=0)
    w, c = since(t)
    computed = backend.stats["computed_tokens"] - before
    return {"pairs": len(rows), "needed": needed, "plain": plain, "computed": computed, "wall": w, "cpu": c}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=0, help="0 = cai's own choice (cai.backends.hf.pick_threads)"
    )
    ap.add_argument(
        "--judge-pairs", type=int, default=32, help="HH-RLHF dev pairs for the judge's bound (0 = skip)"
    )
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-roofline.md"))
    a = ap.parse_args()

    import torch
    import transformers

    import cai.backends as backends
    from cai.backends.hf import HFBackend, pick_threads
    from cai.revise import GenerateConfig, run_generate

    load0 = load_avg()
    threads = pick_threads(a.threads or None)
    torch.set_num_threads(threads)
    peak_w, peak_c = gemm_peak()
    print(
        f"fp32 GEMM peak ({threads} thread(s)): {peak_w:.1f} GFLOP/s wall, {peak_c:.1f} GFLOP per CPU-s",
        flush=True,
    )

    t = clock()
    backend = HFBackend(None, batch_size=a.batch_size, threads=threads)
    load_w, load_c = since(t)
    rk = backend.row_kernel  # cai.backends.rowkernel.install's summary, or None
    # packed bytes actually read per step (tied lm_head/embeddings counted once, as stored)
    lin = linears_only(
        backend.model, rk and rk["packed_bytes"] + (lin_params(backend.model) * 4 - rk["fp32_bytes"])
    )
    for M, (w, c, bw) in lin.items():
        print(
            f"linear layers only, {M} row(s): {w:.1f} GFLOP/s wall, {c:.1f} GFLOP/CPU-s "
            f"({100 * c / peak_c:.0f}% of peak), "
            f"weights read at {bw:.1f} GB/CPU-s",
            flush=True,
        )
    prof = Profile(backend)
    backends.load_backend = lambda *x, **k: backend  # run_generate's own path, the model already loaded
    with tempfile.TemporaryDirectory() as d:
        cfg = GenerateConfig(
            constitution=str(HARMLESS),
            prompts=str(HARMLESS / "prompts.jsonl"),
            out=str(Path(d) / "pairs.jsonl"),
            rounds=a.rounds,
            max_new_tokens=a.max_new_tokens,
            limit=a.limit,
            seed=0,
            backend_options={"batch_size": a.batch_size},
            overwrite=True,
        )
        t = clock()
        s = run_generate(cfg, progress=False)
        tot_w, tot_c = since(t)
    load1 = load_avg()
    T = prof.t
    fw = {k: T["fwd:" + k] for k in ("prefill", "decode", "judge")}
    gen, judge = T["generate:generate"], T["option_logprobs:generate"]
    tok = [T["render:generate"][i] + T["_encode:generate"][i] for i in (0, 1)]
    loop = [gen[i] - tok[i] - fw["prefill"][i] - fw["decode"][i] - T["detokenise"][i] for i in (0, 1)]
    rows = [
        ("model load (weights, tokenizer; before the run)", load_w, load_c),
        ("tokenisation (chat template + encode)", *tok),
        ("prefill forwards", *fw["prefill"]),
        ("decode forwards", *fw["decode"]),
        ("decode loop between forwards (Python, token choice, cache bookkeeping)", *loop),
        ("detokenisation", *T["detokenise"]),
        ("judge (option log-probs: its templates, tokenisation and forwards)", *judge),
        (
            "engine: critique/revision templates, cleaning, writing rows",
            tot_w - gen[0] - judge[0],
            tot_c - gen[1] - judge[1],
        ),
    ]
    total_w, total_c = load_w + tot_w, load_c + tot_c

    def frac(f, w, c):
        return f / w / 1e9 if w else 0, f / c / 1e9 if c else 0

    pf, dc, jd = (frac(prof.flops[k], *fw[k]) for k in ("prefill", "decode", "judge"))
    b16 = frac(*prof.b16)
    L = []
    say = L.append
    say(
        f"# Roofline: `cai generate` against this machine's fp32 matmul peak ({a.limit} prompts, {a.rounds} "
        "round(s), "
        f"{a.max_new_tokens} new tokens, judge on, batch {a.batch_size}, CPU)"
    )
    say("")
    say(f"command: `{' '.join(['.venv/bin/python', 'bench/bench_roofline.py', *sys.argv[1:]])}`  ")
    say(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({threads} thread(s)), transformers "
        f"{transformers.__version__}; load average {load0} at start, {load1} at end; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    say("")
    say("## Ceiling and fractions (all measured in this run)")
    say("")
    say("| what | GFLOP/s (wall) | GFLOP per CPU-s | fraction of the fp32 peak (wall / CPU) |")
    say("|---|---|---|---|")
    say(f"| fp32 GEMM peak, torch.mm 2048², {threads} thread(s) | {peak_w:.1f} | {peak_c:.1f} | 100% |")
    for M, (w, c, bw) in lin.items():
        how = " (torch's x @ W.T, fp32 weights)" if str(M).endswith("torch") else ""
        how += " (cai's kernel)" if M == 16 and rk else ""
        say(
            f"| the model's linear layers alone, {M.split()[0] if isinstance(M, str) else M} row(s){how} "
            f"(weights streamed at {bw:.1f} GB/CPU-s) | {w:.1f} "
            f"| {c:.1f} | "
            f"{100 * w / peak_w:.0f}% / {100 * c / peak_c:.0f}% |"
        )
    say(
        f"| cai generate: prefill | {pf[0]:.1f} | {pf[1]:.1f} | {100 * pf[0] / peak_w:.0f}% / "
        f"{100 * pf[1] / peak_c:.0f}% |"
    )
    say(
        f"| cai generate: decode, all steps | {dc[0]:.1f} | {dc[1]:.1f} | {100 * dc[0] / peak_w:.0f}% / "
        f"{100 * dc[1] / peak_c:.0f}% |"
    )
    if prof.b16[1]:
        say(
            f"| cai generate: decode steps at batch 16 | {b16[0]:.1f} | {b16[1]:.1f} | "
            f"{100 * b16[0] / peak_w:.0f}% / "
            f"{100 * b16[1] / peak_c:.0f}% |"
        )
    say(
        f"| the judge's forwards | {jd[0]:.1f} | {jd[1]:.1f} | {100 * jd[0] / peak_w:.0f}% / "
        f"{100 * jd[1] / peak_c:.0f}% |"
    )
    say("")
    say("## Where the time goes")
    say("")
    say("| part | wall s | CPU-s | share of CPU-s |")
    say("|---|---|---|---|")
    for name, w, c in rows:
        say(f"| {name} | {w:.1f} | {c:.1f} | {100 * c / total_c:.0f}% |")
    say(f"| **total** | {total_w:.1f} | {total_c:.1f} | 100% |")
    say("")
    pad_pf = prof.tokens["prefill"] - prof.real["prefill"]
    say(
        f"Tokens: prefill {prof.real['prefill']:,} real + {pad_pf:,} padding "
        f"({100 * pad_pf / max(1, prof.tokens['prefill']):.1f}% waste) in {prof.calls['prefill']} forwards; "
        f"plus {prof.reused:,} prompt tokens not computed at all: their KV cache was kept from the "
        "previous stage (a critique prompt repeats the conversation and the response); decode "
        f"{prof.tokens['decode']:,} row-steps in {prof.calls['decode']} forwards, {prof.needed:,} of them "
        "needed (finished rows leave the batch once a quarter of it has finished; generate() keeps them all: "
        f"{prof.waste_hf:,} more row-steps; the one-time check against generate() adds a few); judge "
        f"{prof.tokens['judge']:,} tokens computed in {prof.calls['judge']} forwards.  "
    )
    say(f"Run: {s.line()}")
    say("")
    say("## Reading (computed from the tables above)")
    say("")
    frac16 = 100 * b16[1] / peak_c if prof.b16[1] else 0.0
    lin16, plain16 = lin[16], lin["16 torch"]
    if prof.b16[1]:
        say(
            f"- Goal: decode at batch 16 >= 50% of the fp32 peak. **Measured: {frac16:.0f}% per CPU-second "
            f"({'met' if frac16 >= 50 else 'not met'}).**"
        )
    else:
        say(
            "- Goal: decode at batch 16 >= 50% of the fp32 peak: no decode step ran at batch 16 "
            "(fewer prompts)."
        )
    fp32_mb = 4 * lin_params(backend.model) / 1e6
    if rk:
        say(
            f"- How: a batch-16 decode step reads every weight once for its 16 rows. As fp32 that is "
            f"{fp32_mb:.0f} MB per step, and torch's x @ W.T reaches {100 * plain16[1] / peak_c:.0f}% of the "
            f"peak at 16 rows (weights read at {plain16[2]:.1f} GB/CPU-s): streaming bound. cai's rowkernel "
            f"reads the weights in the form the model file stores them ({rk['packed_bytes'] / 1e6:.0f} MB of "
            f"packed blocks: {', '.join(f'{k} x{v}' for k, v in sorted(rk['formats'].items()))} layers) and "
            "expands them in registers to the same fp32 values; products and sums are fp32. The linear "
            f"layers alone then reach {100 * lin16[1] / peak_c:.0f}% of the peak at 16 rows "
            f"({lin16[1] / plain16[1]:.2f}x torch) and {100 * lin[64][1] / peak_c:.0f}% at 64 rows "
            "(torch, fp32)."
            + (
                " Decode attention runs through rowkernel too (each row's fp32 keys and values read once "
                "for the query heads that share them)."
                if backend.row_attention
                else ""
            )
            + (
                " And each decode step is one call into it, embedding to logits (every layer's norms, "
                "projections, rotary, cache write, attention and MLP, then the output layer), not ~50 small "
                "torch operations per layer, with the packed weights and the KV cache on 2 MB pages."
                if backend.row_decoder
                else ""
            )
        )
    if prof.b16_steps:
        step_ms = 1000 * prof.b16[2] / prof.b16_steps
        lin_ms = 1000 * 2 * 16 * lin_params(backend.model) / 1e9 / lin16[1]
        kv_mb = prof.b16_kv * prof.kv_bytes_per_pos / prof.b16_steps / 1e6
        stream = lin["1 torch"][2]
        kv_ms = kv_mb / 1e3 / stream * 1000
        floor_ms = 1000 * 2 * 16 * lin_params(backend.model) / 1e9 / peak_c + kv_ms
        best = 100 * (prof.b16[0] / prof.b16_steps) / 1e9 / (floor_ms / 1000) / peak_c
        rough = (
            "; each layer called on its own from Python: with more than one thread that includes per-call "
            "overhead and idle threads the one-call step does not have, so the split is rough"
            if threads > 1
            else ""
        )
        say(
            f"- Where a batch-16 decode step's {step_ms:.0f} CPU-ms go: its linear layers take "
            f"~{lin_ms:.0f} ms "
            f"(from the row above{rough}); attention reads the fp32 KV cache, on average "
            f"{kv_mb:.0f} MB per step "
            f"(16 rows x {prof.b16_kv / 16 / prof.b16_steps:.0f} positions x {prof.layers} layers, K and V), "
            f"~{kv_ms:.0f} ms at the rate this core streams memory (a matrix-vector product: {stream:.1f} "
            f"GB/CPU-s); "
            + (
                f"the remaining ~{step_ms - lin_ms - kv_ms:.0f} ms are "
                if step_ms >= lin_ms + kv_ms
                else "together more than the whole step: the two are measured apart (the linears with "
                "per-call overhead, the KV rate on fp32 weights on 4 KB pages), so each is only an upper "
                "bound, and the rest is small: "
            )
            + (
                "the attention arithmetic, norms, rotary embeddings and activations (in the same C call) "
                "and the Python around each step"
                if backend.row_decoder
                else "norms, rotary embeddings, activations, the attention arithmetic and Python "
                "between layers"
            )
            + ". With the "
            "linear layers at the full peak and nothing else but the KV read, a step would reach "
            f"~{best:.0f}% "
            "of the peak (a lower-precision KV cache would read less, but change the numbers the model "
            "computes; cai does not do that)."
        )
    else:
        say(
            f"- Why: cai's rowkernel is not in use here ({backend.describe()['decode_kernel']}), so a "
            "batch-16 decode step "
            f"streams the {fp32_mb:.0f} MB of fp32 weights: the linear layers alone reach "
            f"{100 * lin16[1] / peak_c:.0f}% of the peak at 16 rows (weights read at {lin16[2]:.1f} "
            f"GB/CPU-s; torch's own x @ W.T: {100 * plain16[1] / peak_c:.0f}%) and "
            f"{100 * lin[64][1] / peak_c:.0f}% at 64 rows."
        )
    say(
        f"- Prefill and the judge run at {100 * pf[1] / peak_c:.0f}% and {100 * jd[1] / peak_c:.0f}% of the "
        "peak (large matmuls)."
    )
    jb = judge_bound(backend, a.judge_pairs) if a.judge_pairs else None
    if jb:
        say("")
        say(f"## The judge at its bound ({jb['pairs']} HH-RLHF harmless dev pairs, 1 principle, both orders)")
        say("")
        say(
            "| tokens needed (each distinct prefix once) | tokens computed (incl. padding) | computed / "
            "needed | "
            "each prompt in full | pairs/s | pairs per CPU-s |"
        )
        say("|---|---|---|---|---|---|")
        say(
            f"| {jb['needed']:,} | {jb['computed']:,} | **{jb['computed'] / jb['needed']:.2f}** | "
            f"{jb['plain']:,} "
            f"({jb['plain'] / jb['needed']:.2f}x needed) | {jb['pairs'] / jb['wall']:.3f} | "
            f"{jb['pairs'] / jb['cpu']:.3f} |"
        )
    elif a.judge_pairs:
        say("")
        say(f"judge bound: skipped (shared HH-RLHF data not found at {DATA})")
    text = "\n".join(L) + "\n"
    print("\n" + text)
    Path(a.results).write_text(text)


if __name__ == "__main__":
    main()
