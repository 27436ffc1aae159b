"""`cai generate` against the tool most people reach for first: LangChain's ConstitutionalChain.

Both sides run the same embedded SmolLM2-135M-Instruct (loaded from the local folder
cai.models.default_model_dir(), never a hub), on the same red-team prompts, one critique + one
revision per prompt under one principle (the principle cai draws for that prompt), greedy, the
same max_new_tokens:

  peer  ConstitutionalChain (langchain-classic) over ChatHuggingFace(HuggingFacePipeline) from
        langchain-huggingface, with its stock critique/revision prompts, one chain per prompt,
        invoked one prompt after another. Timed: the chains only (model load excluded).
  cai   the whole `cai generate` process (subprocess: interpreter start, imports, model load,
        generate, the judge), with the same torch thread count.

    # 16 prompts, 64 new tokens (~10-25 min on 2 busy cores)
    .venv/bin/python bench/bench_peer.py
    .venv/bin/python bench/bench_peer.py --limit 4         # smoke test

Wall-clock rows/s both ways and the ratio, plus CPU-seconds (steadier on a shared machine), the
tokens each side pushed through the model, and both sides' outputs in bench/outputs-peer/.
Results: stdout and bench/RESULTS-peer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HARMLESS = ROOT / "constitutions" / "harmless"
PROMPTS = HARMLESS / "prompts.jsonl"
OUTDIR = ROOT / "bench" / "outputs-peer"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cai(limit: int, max_new: int, threads: int, out: Path, extra=()) -> dict:
    """The whole `cai generate` process, as a user runs it."""
    cmd = [
        str(ROOT / ".venv" / "bin" / "cai"),
        "generate",
        "--constitution",
        str(HARMLESS),
        "--prompts",
        str(PROMPTS),
        "--out",
        str(out),
        "--rounds",
        "1",
        "--seed",
        "0",
        "--max-new-tokens",
        str(max_new),
        "--limit",
        str(limit),
        "--overwrite",
        *extra,
    ]
    if not Path(cmd[0]).exists():
        cmd[0:1] = [sys.executable, "-m", "cai"]
    env = dict(os.environ, CAI_THREADS=str(threads))
    la = load_avg()
    c0, t0 = children_cpu(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if p.returncode:
        raise SystemExit(f"cai generate failed ({p.returncode}):\n{p.stderr[-3000:]}")
    line = next((x for x in (p.stdout + p.stderr).splitlines() if x.startswith("cai generate:")), "")
    m = re.search(r"in ([\d.]+)s; [\d.]+ rows/s, ([\d.]+) tokens/s", line)
    gen_tokens = round(float(m.group(1)) * float(m.group(2))) if m else None
    return {
        "wall": wall,
        "cpu": cpu,
        "load": la,
        "load_after": load_avg(),
        "line": line,
        "generated": gen_tokens,
        "cmd": " ".join(["cai", *cmd[1:]]).replace(str(ROOT) + "/", ""),
    }


def cai_prompt_tokens(rows, const, tok) -> int:
    """Prompt tokens cai's three stages fed the model, re-rendered from its rows with the same
    templates (the judge's prompts are not counted: the peer has no judge)."""

    def n(conv):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    total = 0
    for r in rows:
        conv, initial = r["prompt"], r["trace"]["initial"]
        total += n(conv)
        for rnd in r["trace"]["rounds"]:
            p = const.principles[rnd["principle"]]
            total += n(const.render("critique", conversation=conv, response=initial, principle=p))
            if rnd.get("revision") is not None:
                total += n(
                    const.render(
                        "revision", conversation=conv, response=initial, critique=rnd["critique"], principle=p
                    )
                )
    return total


def slim(raw: Path, out: Path) -> list[dict]:
    """cai's rows, kept in full in memory; on disk only what a reader compares with the peer."""
    rows = [json.loads(x) for x in raw.read_text().splitlines()]
    raw.unlink()
    with open(out, "w") as f:
        for r in rows:
            rnd = (r["trace"]["rounds"] or [{}])[0]
            f.write(
                json.dumps(
                    {
                        "id": r["id"],
                        "prompt": r["prompt"][0]["content"],
                        "principle": rnd.get("principle"),
                        "initial": r["trace"]["initial"],
                        "critique": rnd.get("critique"),
                        "revision": rnd.get("revision"),
                        "early_stop": bool(rnd.get("early_stop")),
                        "label": {k: r["label"].get(k) for k in ("p_chosen", "tie", "revision_side")},
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return rows


def run_peer(prompts, principles, max_new: int):
    import torch
    from langchain_classic.chains import ConstitutionalChain, LLMChain
    from langchain_classic.chains.constitutional_ai.models import ConstitutionalPrinciple
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.prompts import PromptTemplate
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from cai.models import default_model_dir

    path = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pipe = pipeline(
        "text-generation",
        model=model,
        tokenizer=tok,
        max_new_tokens=max_new,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        return_full_text=False,
    )
    chat = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe, model_id=path), tokenizer=tok)

    class Count(BaseCallbackHandler):
        def __init__(self):
            self.prompt_tokens = self.generated_tokens = self.calls = 0

        def on_chat_model_start(self, serialized, messages, **kw):
            for msgs in messages:
                conv = [
                    {"role": {"human": "user", "ai": "assistant"}.get(m.type, m.type), "content": m.content}
                    for m in msgs
                ]
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                self.prompt_tokens += len(tok(text, add_special_tokens=False)["input_ids"])
                self.calls += 1

        def on_llm_end(self, response, **kw):
            for gens in response.generations:
                for g in gens:
                    self.generated_tokens += min(
                        max_new, len(tok(g.text, add_special_tokens=False)["input_ids"]) + 1
                    )

    count = Count()
    qa = LLMChain(llm=chat, prompt=PromptTemplate.from_template("{question}"))
    rows, wall, cpu = [], 0.0, 0.0
    la = load_avg()
    for p, pr in zip(prompts, principles):
        chain = ConstitutionalChain.from_llm(
            llm=chat,
            chain=qa,
            return_intermediate_steps=True,
            constitutional_principles=[
                ConstitutionalPrinciple(
                    name=pr.id, critique_request=pr.critique, revision_request=pr.revision
                )
            ],
        )
        w0, c0 = time.perf_counter(), time.process_time()
        res = chain.invoke({"question": p["text"]}, config={"callbacks": [count]})
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        ((critique, revision),) = res["critiques_and_revisions"]
        rows.append(
            {
                "id": p["id"],
                "prompt": p["text"],
                "principle": pr.id,
                "initial": res["initial_output"],
                "critique": critique,
                "revision": revision,
                "final": res["output"],
            }
        )
        print(f"  peer {p['id']}: {wall:.0f}s so far", file=sys.stderr, flush=True)
    return rows, {
        "wall": wall,
        "cpu": cpu,
        "load": la,
        "load_after": load_avg(),
        "prompt_tokens": count.prompt_tokens,
        "generated": count.generated_tokens,
        "calls": count.calls,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads for both sides (0 = cai's own choice)"
    )
    ap.add_argument(
        "--llamacpp",
        choices=["auto", "yes", "no"],
        default="auto",
        help="also run `cai generate --backend llamacpp` (auto: when llama-cpp-python is installed)",
    )
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-peer.md"))
    a = ap.parse_args()

    import torch
    import transformers

    from cai.backends.hf import pick_threads
    from cai.constitution import load_constitution
    from cai.records import read_prompts

    threads = pick_threads(a.threads or None)
    torch.set_num_threads(threads)
    const = load_constitution(HARMLESS)
    prompts = read_prompts(PROMPTS, limit=a.limit)
    plain = []
    for p in prompts:
        msgs = p["prompt"]
        assert len(msgs) == 1 and msgs[0]["role"] == "user", "the shipped prompts are single user turns"
        plain.append({"id": p["id"], "text": msgs[0]["content"]})
    principles = [const.draw(0, p["id"], 0) for p in prompts]  # what cai generate --seed 0 draws for round 1
    OUTDIR.mkdir(parents=True, exist_ok=True)
    n = len(prompts)

    print(
        f"== cai generate, whole process ({n} prompts, {a.max_new_tokens} new tokens, {threads} thread(s)) "
        "==",
        flush=True,
    )
    raw = OUTDIR / "cai-raw.jsonl"
    from cai.models import cache_dir

    checks = cache_dir() / "checks.json"  # the hf backend's one-time path checks (cai/backends/hf.py)
    before = checks.read_text() if checks.exists() else ""
    cai = run_cai(n, a.max_new_tokens, threads, raw)
    warm = bool(before) and (checks.read_text() if checks.exists() else "") == before  # no new verdict
    print(
        f"  {cai['wall']:.1f}s wall, {cai['cpu']:.1f} CPU-s; load {cai['load']} -> {cai['load_after']}\n  "
        f"{cai['line']}",
        flush=True,
    )
    cai_rows = slim(raw, OUTDIR / "cai.jsonl")
    import importlib.util

    lcpp = None
    if a.llamacpp == "yes" or (a.llamacpp == "auto" and importlib.util.find_spec("llama_cpp")):
        print(
            "== cai generate --backend llamacpp (the embedded Q4_1 GGUF as shipped), whole process ==",
            flush=True,
        )
        lcpp = run_cai(n, a.max_new_tokens, threads, raw, ["--backend", "llamacpp"])
        print(
            f"  {lcpp['wall']:.1f}s wall, {lcpp['cpu']:.1f} CPU-s; load {lcpp['load']} -> "
            f"{lcpp['load_after']}\n"
            f"  {lcpp['line']}",
            flush=True,
        )
        lcpp_rows = slim(raw, OUTDIR / "cai-llamacpp.jsonl")
        lcpp["same_initial"] = sum(
            1
            for x, y in zip(cai_rows, lcpp_rows)
            if x["trace"]["initial"].strip() == y["trace"]["initial"].strip()
        )

    print("== ConstitutionalChain (langchain-classic + langchain-huggingface), chains only ==", flush=True)
    peer_rows, peer = run_peer(plain, principles, a.max_new_tokens)
    print(
        f"  {peer['wall']:.1f}s wall, {peer['cpu']:.1f} CPU-s; load {peer['load']} -> {peer['load_after']}",
        flush=True,
    )
    with open(OUTDIR / "peer.jsonl", "w") as f:
        for r in peer_rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    from transformers import AutoTokenizer

    from cai.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    cai_prompt = cai_prompt_tokens(cai_rows, const, tok)
    same_initial = sum(
        1 for x, y in zip(cai_rows, peer_rows) if x["trace"]["initial"].strip() == y["initial"].strip()
    )
    revised_cai = sum(1 for r in cai_rows if any(x.get("revision") is not None for x in r["trace"]["rounds"]))
    revised_peer = sum(1 for r in peer_rows if r["revision"])
    rps_cai, rps_peer = n / cai["wall"], n / peer["wall"]
    ratio, ratio_cpu = rps_cai / rps_peer, peer["cpu"] / cai["cpu"]

    L = []
    say = L.append
    say(
        f"# cai generate vs LangChain ConstitutionalChain ({n} red-team prompts, 1 critique + 1 revision, "
        f"{a.max_new_tokens} new tokens, greedy, CPU)"
    )
    say("")
    say(f"command: `{' '.join(['.venv/bin/python', 'bench/bench_peer.py', *sys.argv[1:]])}`  ")
    say(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({threads} thread(s) on both sides), "
        f"transformers {transformers.__version__}; date {time.strftime('%Y-%m-%d %H:%M')}  "
    )
    say("model: the embedded SmolLM2-135M-Instruct (fp32), loaded from the local folder on both sides")
    say("")
    say("| side | what is timed | wall s | CPU-s | rows/s | load avg (1/5/15 min) before → after |")
    say("|---|---|---|---|---|---|")
    say(
        f"| ConstitutionalChain | the {n} chain calls only (model load excluded) | {peer['wall']:.1f} | "
        f"{peer['cpu']:.1f} | "
        f"{rps_peer:.3f} | {peer['load']} → {peer['load_after']} |"
    )
    say(
        "| `cai generate` | the whole process: start, imports, model load, generate, judge | "
        f"{cai['wall']:.1f} | "
        f"{cai['cpu']:.1f} | {rps_cai:.3f} | {cai['load']} → {cai['load_after']} |"
    )
    if lcpp:
        say(
            f"| `cai generate --backend llamacpp` | the whole process (Q4_1 GGUF as shipped, llama.cpp) | "
            f"{lcpp['wall']:.1f} | {lcpp['cpu']:.1f} | {n / lcpp['wall']:.3f} | {lcpp['load']} → "
            f"{lcpp['load_after']} |"
        )
    say("")
    say(
        f"**ratio (rows/s, cai / ConstitutionalChain): {ratio:.2f}x wall-clock, {ratio_cpu:.2f}x CPU time** "
        "(same run, back to back)"
        + (
            f"; with `--backend llamacpp`: {(n / lcpp['wall']) / rps_peer:.2f}x wall-clock, "
            f"{peer['cpu'] / lcpp['cpu']:.2f}x CPU time (4-bit weights: {lcpp['same_initial']}/{n} initial "
            "responses "
            "identical to the fp32 ones; outputs in `cai-llamacpp.jsonl`)"
            if lcpp
            else ""
        )
    )
    say("")
    say(
        "What each side pushed through the model (tokens; the peer's generated count is re-tokenised text, "
        "±1 per call):"
    )
    say("")
    say("| side | model calls | prompt tokens | generated tokens | revisions |")
    say("|---|---|---|---|---|")
    say(
        f"| ConstitutionalChain | {peer['calls']} (one prompt each) | {peer['prompt_tokens']:,} | "
        f"{peer['generated']:,} | "
        f"{revised_peer}/{n} |"
    )
    say(
        f"| cai generate | 3 stages x 1 batch + judge | {cai_prompt:,} (+ judge) | "
        f"{cai['generated'] or 0:,} | "
        f"{revised_cai}/{n} |"
    )
    say("")
    say(
        "What the ratio is made of: (1) **fewer tokens**: the peer's stock few-shot critique/revision "
        "prompts make it "
        f"feed {peer['prompt_tokens'] / max(1, cai_prompt):.1f}x the prompt tokens of cai's three stages "
        f"({peer['prompt_tokens']:,} vs {cai_prompt:,}); (2) **batching**: the peer decodes one sequence "
        "per forward pass "
        f"(~{peer['generated']:,} forwards, each streaming all the weights for one token), cai 16 rows per "
        "forward "
        "(one forward per step per stage, finished rows leave the batch; at batch 16 a step costs little "
        "more than "
        f"at batch 1 because decoding here is bound by reading the weights, see RESULTS-roofline.md); "
        f"(3) **early stop**: cai skipped {n - revised_cai} of {n} revisions whose critique found nothing "
        "to fix "
        f"(the peer's 'no critique needed' check skipped {n - revised_peer}); (4) against cai: its time "
        "includes "
        "process start, imports, model load and the judge on every revised pair, which the peer does not "
        "do; (5) **prefix reuse**: a critique prompt repeats the conversation and the response, whose KV "
        "cache cai keeps from the stage before, so that part is not computed again; (6) **the decode "
        "kernel**: cai's decode steps multiply by the weights in the GGUF file's own 4/8-bit blocks "
        "(cai/backends/rowkernel.py: 96 MB read per step instead of 538 MB of fp32, expanded in registers "
        "to the same fp32 values), and each decode step runs as one call into it for all layers (norms, "
        "rotary, the cache write, attention, the MLP: no small torch operations between them), where the "
        "peer's pipeline streams the fp32 weights through torch, op by op. "
        + (
            "The hf backend's one-time path checks (its decode loop, KV reuse and the judge's prefix tree, "
            "each against the plain path) had verdicts remembered in $CAI_CACHE/checks.json from an "
            "earlier run on this machine; a model's first run on a machine also runs them (~2 CPU-s)."
            if warm
            else "The hf backend's one-time path checks ran in this process (~2 CPU-s; later runs of the "
            "same model and code on this machine take their verdicts from $CAI_CACHE/checks.json)."
        )
    )
    say("")
    need = peer["cpu"] / 8
    say(
        f"Goal (≥ 8x): **{'met' if ratio_cpu >= 8 and ratio >= 8 else 'not met'}** in this run. 8x CPU time "
        f"would need cai at ≤ {need:.1f} CPU-s (it took {cai['cpu']:.1f}); where cai's CPU time goes "
        "(model load, prefill, decode, the judge) and how close each part is to this machine's limit: "
        "RESULTS-roofline.md."
    )
    say("")
    say(
        "Same work: both sides produce the initial response with the model's chat template and greedy "
        "decoding; "
        f"{same_initial}/{n} initial responses are identical word for word (outputs in "
        "`bench/outputs-peer/`: "
        "`cai.jsonl`, `peer.jsonl`). The critique/revision prompts differ by design: the peer sends "
        "LangChain's "
        "stock few-shot prompts (the out-of-the-box experience), cai its constitution's templates."
    )
    say("")
    say(f"cai's own summary line: `{cai['line']}`  ")
    say(f"cai command: `{cai['cmd']}` (with CAI_THREADS={threads})")
    text = "\n".join(L) + "\n"
    print("\n" + text)
    Path(a.results).write_text(text)


if __name__ == "__main__":
    main()
