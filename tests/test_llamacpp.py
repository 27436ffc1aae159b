"""llama.cpp for real: `cai` against llama.cpp's own C++ server (tests/llama_server.py, `python -m
cai.serve`) on the embedded GGUF, and the in-process `--backend llamacpp` engine (the CPU
default) on the same file.

Every model answer here comes from llama.cpp; the only stand-in is FaultProxy, a loopback proxy
that injects 5xx answers, delays and log-prob refusals in front of the real server. Runs in
about a minute on 2 cores (a few rows, a few tokens each).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import HARMLESS, ROOT
from llama_server import ALIAS, HAVE_LLAMA_CPP, SKIP_REASON, FaultProxy, LlamaServer

from cai.errors import CaiError, InputError

pytestmark = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=SKIP_REASON)

PREFIXED = [
    {"role": "user", "content": "Which is safer, (A) or (B)?"},
    {"role": "assistant", "content": "The answer is: ("},
]
CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is 2+2?"}],
]
PROMPTS = "How do I pick a lock?\nWrite a poem about rain.\nWhat is the capital of France?\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LlamaServer(log_dir=tmp_path_factory.mktemp("llama-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine():
    from cai.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(None, batch_size=4)


def _cai(*args):
    from click.testing import CliRunner

    from cai.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pairs_file(tmp_path, n=3):
    rows = [
        {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for i, (q, good, bad) in enumerate(
            [
                (
                    "How do I get into my neighbour's house?",
                    "Knock, or ask them to let you in.",
                    "Break a back window while they are away.",
                ),
                (
                    "What should I put on a burn?",
                    "Cool running water for 20 minutes, then see a doctor if it blisters.",
                    "Butter, lots of it.",
                ),
                (
                    "Can you help me write a threatening letter?",
                    "I can't help threaten anyone, but I can help you write a firm complaint.",
                    "Sure: 'I know where you live...'",
                ),
            ][:n]
        )
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# -- the real server ----------------------------------------------------------------------------


def test_generate_end_to_end_through_the_server(server, tiny_model, tmp_path):
    from cai.records import read_pairs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "pairs.jsonl"
    res = _cai(
        "generate",
        "--backend",
        "langchain",
        "--base-url",
        server.url,
        "--model",
        ALIAS,
        "--constitution",
        HARMLESS,
        "--prompts",
        prompts,
        "--out",
        out,
        "--rounds",
        1,
        "--max-new-tokens",
        8,
        "--batch-size",
        2,
    )
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(read_pairs(out)) + sum(bool(r["label"].get("tie")) for r in rows) == 3  # all in the contract
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert 0.0 <= r["label"]["p_chosen"] <= 1.0 and r["trace"]["rounds"]
        assert (r["meta"]["backend"], r["meta"]["model"]) == ("langchain", ALIAS)
        assert r["meta"]["runtime"]["base_url"] == server.url

    # the same prompts through the local hf backend get the same ids
    hf_out = tmp_path / "hf.jsonl"
    res = _cai(
        "generate",
        "--model",
        tiny_model,
        "--constitution",
        HARMLESS,
        "--prompts",
        prompts,
        "--out",
        hf_out,
        "--rounds",
        1,
        "--max-new-tokens",
        4,
        "--no-label",
    )
    assert res.exit_code == 0, res.output
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in _rows(hf_out))


def test_prefix_auto_folds_on_a_server_that_ignores_continue(server, capsys):
    """llama_cpp.server accepts vLLM's continue_final_message but ignores it: the prompt it builds
    is the same with and without it, so `auto` must fold the prefix into the user turn."""
    from cai.backends.langchain import LangChainBackend

    b = LangChainBackend(None, base_url=server.url)  # the only served model
    assert b.model_id == ALIAS and b.prefix == "auto"
    (g,) = b.generate([PREFIXED], max_new_tokens=4)
    assert g.n_tokens > 0 and b.prefix == "fold"
    assert "ignores continue_final_message" in capsys.readouterr().err
    # folded, the judge's letters are what the model ranks first: both listed, none floored
    (lp,) = b.option_logprobs([PREFIXED], ["A", "B"])
    assert b.stats["options_floored"] == 0 and all(-20 < x < 0 for x in lp)


def test_label_with_logprobs_both_orders(server, engine, tmp_path):
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "labelled.jsonl"
    res = _cai(
        "label",
        "--backend",
        "langchain",
        "--base-url",
        server.url,
        "--model",
        ALIAS,
        "--pairs",
        pairs,
        "--constitution",
        HARMLESS,
        "--out",
        out,
        "--batch-size",
        4,
    )
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    for r in rows:
        judge = r["label"]["judge"]
        assert judge["method"] == "logprob" and len(judge["orders"]) == 2
        # real probabilities from the server's top log-probs, not the floor's near-0/1
        assert all(0.001 < p < 0.999 for p in judge["orders"])
        assert r["label"]["p_chosen"] == pytest.approx(sum(judge["orders"]) / 2, abs=1e-3)

    # The server's top log-probs are llama.cpp's numbers: the in-process engine on the same GGUF
    # gives the same A-vs-B probability for a prompt both render the same way (no prefix).
    from cai.backends.langchain import LangChainBackend

    b = LangChainBackend(ALIAS, base_url=server.url)
    prompt = [{"role": "user", "content": "Is (A) or (B) kinder? Reply with only one of: A, B."}]
    srv, local = b.option_logprobs([prompt], ["A", "B"])[0], engine.option_logprobs([prompt], ["A", "B"])[0]

    def p_a(lp):
        return 1 / (1 + math.exp(lp[1] - lp[0]))

    assert p_a(srv) == pytest.approx(p_a(local), abs=0.02)


def test_label_with_logprobs_off_uses_verdicts(server, tmp_path):
    """A server that answers 500 to log-prob requests: the judge falls back to generated verdicts
    instead of failing."""
    pairs = _pairs_file(tmp_path, n=2)
    out = tmp_path / "verdicts.jsonl"
    with FaultProxy(server.url) as px:
        px.no_logprobs = True
        res = _cai(
            "label",
            "--backend",
            "langchain",
            "--base-url",
            px.url,
            "--model",
            ALIAS,
            "--pairs",
            pairs,
            "--constitution",
            HARMLESS,
            "--out",
            out,
        )
    assert res.exit_code == 0, res.output
    assert "rejected logprobs" in res.output
    rows = _rows(out)
    assert len(rows) == 2
    for r in rows:
        judge = r["label"]["judge"]
        assert judge["method"] == "verdict"
        assert all(isinstance(t, str) for v in judge["raw"].values() for t in v)


def test_wrong_model_lists_the_served_names(server, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "o.jsonl"
    res = _cai(
        "generate",
        "--backend",
        "langchain",
        "--base-url",
        server.url,
        "--model",
        "llama-70b",
        "--constitution",
        HARMLESS,
        "--prompts",
        prompts,
        "--out",
        out,
    )
    assert res.exit_code == 2
    assert f"Error: model 'llama-70b' is not served by {server.url}; it serves: {ALIAS}" in res.output
    assert not out.exists()


def test_5xx_bounded_retries_with_backoff_then_a_clear_error(server):
    from cai.backends.langchain import LangChainBackend

    with FaultProxy(server.url) as px:
        b = LangChainBackend(ALIAS, base_url=px.url, max_retries=2, prefix="fold")
        px.fail = 2  # two 503s, then the real answer
        (g,) = b.generate(CONVERSATIONS[:1], max_new_tokens=2)
        assert g.n_tokens > 0
        times = [t for t, _, _ in px.chat_attempts()]
        assert [s for _, _, s in px.chat_attempts()] == [503, 503, 0]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps[0] >= 0.3 and gaps[1] >= 1.5 * gaps[0] * 0.75  # exponential backoff

        px.fail, px.attempts = 100, []  # a server that keeps failing: 1 + 2 retries, then stop
        with pytest.raises(CaiError) as e:
            b.generate(CONVERSATIONS[:1], max_new_tokens=2)
        assert len(px.chat_attempts()) == 3
    msg = str(e.value)
    assert msg.startswith(f"{px.url} answered 503 to 3 tries") and "rerun the same command to resume" in msg


def test_slow_answers_time_out_after_bounded_retries(server):
    from cai.backends.langchain import LangChainBackend

    with FaultProxy(server.url) as px:
        b = LangChainBackend(ALIAS, base_url=px.url, timeout=0.5, max_retries=1, prefix="fold")
        px.delay = 3.0
        t0 = time.monotonic()
        with pytest.raises(CaiError, match=f"{px.url} timed out \\(2 tries\\): lower --concurrency"):
            b.generate(CONVERSATIONS[:1], max_new_tokens=2)
        assert len(px.chat_attempts()) == 2 and time.monotonic() - t0 < 10


def test_server_killed_mid_run_then_rerun_completes(tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"Tell me fact number {i} about the moon.\n" for i in range(5)))
    out = tmp_path / "pairs.jsonl"
    with LlamaServer(log_dir=tmp_path) as srv:
        args = [
            sys.executable,
            "-m",
            "cai",
            "generate",
            "--backend",
            "langchain",
            "--base-url",
            srv.url,
            "--model",
            ALIAS,
            "--constitution",
            str(HARMLESS),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--rounds",
            "1",
            "--max-new-tokens",
            "12",
            "--no-label",
            "--chunk-size",
            "1",
            "--batch-size",
            "1",
        ]
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 180
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 1):
            time.sleep(0.05)
        srv.kill()
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2, err
        assert f"Error: cannot reach {srv.url} (5 tries): start the server or fix --base-url" in err
        kept = _rows(out)
        assert 1 <= len(kept) < 5, "the run finished before the kill; the test needs a slower run"

        srv.start()  # the same port: the same command resumes
        rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert _rows(out)[: len(kept)] == kept  # rows written before the kill are untouched


# -- the in-process engine ------------------------------------------------------------------


def test_engine_matches_the_server_and_is_batch_invariant(server, engine):
    """The same engine in process and behind HTTP; and a judge prompt's numbers do not depend on
    which prompts are prefilled beside it, on which slot's cached prefix it reused, or on how it
    is cut into chunks (here chunks of 8 tokens, some of them holding a single token: with an F32
    K cache that takes no other kernel), bit for bit."""
    from cai.backends.langchain import LangChainBackend
    from cai.backends.llamacpp import LlamaCppBackend

    got = engine.generate(CONVERSATIONS, max_new_tokens=8)
    served = LangChainBackend(ALIAS, base_url=server.url).generate(CONVERSATIONS, max_new_tokens=8)
    assert [g.text for g in got] == [s.text for s in served]  # same GGUF, template, greedy decoding

    one = LlamaCppBackend(None, batch_size=1)
    prompts = [PREFIXED, *CONVERSATIONS, [*PREFIXED[:1], {"role": "assistant", "content": "I think ("}]]
    a = one.option_logprobs(prompts, ["A", "B"])
    b = engine.option_logprobs(prompts, ["A", "B"])
    again = engine.option_logprobs(list(reversed(prompts)), ["A", "B"])[::-1]  # other slots, cached prefixes
    chunked = LlamaCppBackend(None, batch_size=2, n_batch=8).option_logprobs(prompts, ["A", "B"])
    assert a == b == again == chunked
    assert one.stats["prefix_tokens_reused"] > 0  # the shared system prompt was computed once
    long = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(7)]
    alone = [engine.generate([c], max_new_tokens=12)[0].text for c in long[:2]]
    assert [g.text for g in engine.generate(long, max_new_tokens=12)][:2] == alone
    # the continued prefix is rendered as transformers renders it: no end of turn after it
    assert engine.render(PREFIXED).endswith("<|im_start|>assistant\nThe answer is: (")


def test_a_run_repeats_bit_for_bit():
    """Two fresh engines given the same calls, more prompts than slots and of different lengths
    (so prompts are admitted while others decode), return the same text and numbers: each wave
    of prompts reaches the server as one request, so what shares each decode step does not
    depend on request timing (docs/architecture.md, "Results and batching")."""
    from cai.backends.llamacpp import LlamaCppBackend

    asks = [
        [{"role": "user", "content": "Tell me, briefly, " + "why " * (i % 5) + f"about {i}."}]
        for i in range(10)
    ]

    def session():
        b = LlamaCppBackend(None, batch_size=4)
        first = [g.text for g in b.generate(asks, max_new_tokens=16)]
        follow = [
            [*c, {"role": "assistant", "content": t}, {"role": "user", "content": "Say why."}]
            for c, t in zip(asks, first)
        ]
        second = [g.text for g in b.generate(follow, max_new_tokens=16)]
        return first, second, b.option_logprobs(follow, ["A", "B"])

    assert session() == session()


def test_engine_sampling_is_seeded_per_prompt(engine):
    twice = [CONVERSATIONS[0], CONVERSATIONS[0]]
    a = [g.text for g in engine.generate(twice, max_new_tokens=8, temperature=1.0, seed=3)]
    assert a == [g.text for g in engine.generate(twice, max_new_tokens=8, temperature=1.0, seed=3)]
    assert a[0] != a[1]
    assert a != [g.text for g in engine.generate(twice, max_new_tokens=8, temperature=1.0, seed=4)]


def test_judge_scores_a_prompt_whose_next_token_is_part_of_a_character(engine):
    """llama.cpp reports no probabilities when the token it samples is an incomplete UTF-8
    character (here the first byte of an emoji): the engine pins the one sampled token to the
    first option, and the list it reads is the model's distribution before that bias."""
    from cai.backends import llamacpp

    emoji = [
        {"role": "user", "content": "Repeat: " + "\U0001f600" * 8},
        {"role": "assistant", "content": "\U0001f600" * 6},
    ]
    ids = engine.tokenize(engine.render(emoji))
    plain = {"prompt": [ids], "n_predict": 1, "temperature": 0.0, "n_probs": 5, "cache_prompt": False}
    assert "completion_probabilities" not in engine._complete(plain)[0]  # what llama.cpp does
    [lp] = engine.option_logprobs([emoji], ["A", "B"])
    assert all(math.isfinite(x) for x in lp)

    # the pin leaves the reported distribution as it is, also where it changes the sampled token
    conv = [*CONVERSATIONS[0], {"role": "assistant", "content": "The answer is ("}]
    ids = engine.tokenize(engine.render(conv))
    body = dict(plain, prompt=[ids], n_probs=100)
    free = engine._complete(body)[0]
    b = engine.option_token_ids(["B"])[0]
    pinned = engine._complete(dict(body, logit_bias=[[b, llamacpp.PIN_BIAS]]))[0]
    assert pinned["completion_probabilities"][0]["id"] == b != free["completion_probabilities"][0]["id"]
    assert (
        pinned["completion_probabilities"][0]["top_logprobs"]
        == free["completion_probabilities"][0]["top_logprobs"]
    )


def test_engine_runs_a_q4_1_file_as_its_cached_q8_0_copy(engine, tmp_path, monkeypatch):
    """The shipped Q4_1 file runs as a Q8_0 copy made once and cached by content hash; as-is runs
    the file itself. Both give the same greedy start on an easy prompt (the copy rounds each
    weight by at most half a Q8_0 step)."""
    from cai.backends import gguf_weights
    from cai.backends.llamacpp import LlamaCppBackend

    d = engine.describe()
    assert d["quantisation"] == "Q4_1" and d["weights"] == "Q8_0 copy of the Q4_1 file"
    assert d["engine"].startswith("xllamacpp ") and d["cpu_features"]
    # what makes results independent of chunking and batch partners is recorded with them
    assert d["kv_cache"].startswith("K f32") and d["weight_repack"] is False and d["flash_attn"] is False
    assert engine.run_path.endswith("-q8_0.gguf") and gguf_weights.slow_tensors(engine.run_path) == 0
    raw = LlamaCppBackend(None, batch_size=2, weights="as-is")
    assert raw.run_path == raw.path and raw.describe()["weights"] == "Q4_1"
    q = [[{"role": "user", "content": "What is the capital of France?"}]]
    assert (
        engine.generate(q, max_new_tokens=6)[0].text.split()[:4]
        == raw.generate(q, max_new_tokens=6)[0].text.split()[:4]
    )
    with pytest.raises(InputError, match="weights must be one of"):
        LlamaCppBackend(None, weights="q2")


def test_cli_generate_with_the_llamacpp_backend(tmp_path):
    from cai.models import default_gguf

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "pairs.jsonl"
    res = _cai(
        "generate",
        "--backend",
        "llamacpp",
        "--model",
        default_gguf(),
        "--constitution",
        HARMLESS,
        "--prompts",
        prompts,
        "--out",
        out,
        "--rounds",
        1,
        "--max-new-tokens",
        8,
        "--batch-size",
        4,
    )
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 3
    meta = rows[0]["meta"]
    assert meta["backend"] == "llamacpp" and meta["model"] == str(default_gguf())
    assert meta["runtime"]["quantisation"] == "Q4_1" and meta["runtime"]["batch_size"] == 4
    # every judged row says how; a tie row (the loop changed nothing) has no judge to ask
    assert all(r["label"]["judge"]["method"] == "logprob" for r in rows if not r["label"].get("tie"))
    assert any(not r["label"].get("tie") for r in rows)

    # anything but a GGUF file is refused before work, naming the file
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a gguf")
    res = _cai(
        "generate",
        "--backend",
        "llamacpp",
        "--model",
        bad,
        "--constitution",
        HARMLESS,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "x.jsonl",
    )
    assert res.exit_code == 2 and "not a GGUF file" in res.output and str(bad) in res.output


def test_auto_picks_llamacpp_on_a_cpu_for_gguf_and_hf_for_folders(tiny_model, tmp_path, capsys):
    from cai.backends import resolve_backend
    from cai.configs import ModelOptions
    from cai.errors import InputError
    from cai.models import default_gguf

    assert resolve_backend("auto", None, device="cpu") == "llamacpp"
    assert resolve_backend("auto", str(default_gguf()), device="cpu") == "llamacpp"
    assert capsys.readouterr().err == ""
    import cai.backends

    cai.backends._NOTED.discard(str(tiny_model))  # the note is printed once per process
    assert resolve_backend("auto", str(tiny_model), device="cpu") == "hf"
    assert "is not a GGUF file" in capsys.readouterr().err  # one line says what would be faster
    assert resolve_backend("auto", "x", base_url="http://127.0.0.1:1/v1") == "langchain"
    assert ModelOptions(threads=1).resolve() == ("llamacpp", {"batch_size": 16, "threads": 1})
    with pytest.raises(InputError, match="--trust-remote-code does not apply to the llamacpp backend"):
        ModelOptions(trust_remote_code=True).resolve()
    with pytest.raises(InputError, match="--device does not apply to the llamacpp backend"):
        ModelOptions(backend="llamacpp", device="cuda").resolve()


def test_missing_gguf_is_one_line(tmp_path):
    from cai.backends.llamacpp import LlamaCppBackend

    with pytest.raises(InputError, match="GGUF file not found"):
        LlamaCppBackend(str(tmp_path / "nope.gguf"))


def test_engines_labels_are_close(engine, hh_dev):
    """llama.cpp (the Q8_0 copy, 8-bit activations, F16 KV) and hf (fp32) judge the same 40 HH
    pairs. Measured here (AMD EPYC, AVX2 kernels on the llama.cpp side): |Δ p_chosen| median
    0.009, 95th percentile 0.034, max 0.047; the same side on 37 of 40 pairs (the others sit
    within 0.05 of ½). The bounds are about twice that, room for torch's AVX2 vs AVX-512 kernels
    on the hf side; a real fault (another template, swapped orders, a wrong option token) moves
    labels by 0.1-0.5."""
    from cai.backends.hf import HFBackend
    from cai.constitution import load_constitution
    from cai.judge import judge_pairs
    from cai.records import read_pairs

    rows = read_pairs(hh_dev, limit=41, skip_bad=True)[:40]
    const = load_constitution(HARMLESS)
    ref = judge_pairs(HFBackend(None, device="cpu"), const, rows)
    got = judge_pairs(engine, const, rows)
    d = sorted(abs(a["p_chosen"] - b["p_chosen"]) for a, b in zip(ref, got))
    median, p95 = d[len(d) // 2], d[int(0.95 * len(d))]
    assert median <= 0.02 and p95 <= 0.07, (median, p95, d[-1])
    assert engine.stats["options_floored"] == 0  # the letters are always in the top 100


def test_runs_keep_families_of_prompts_together():
    """cut_runs cuts where a family of prompts sharing a long prefix ends (no slot computes a
    pair's conversation twice), uses fewer runs than slots when there are fewer families, and
    cuts a single family evenly."""
    from cai.backends.llamacpp import cut_runs

    head = list(range(400))  # the prefix every prompt shares (the re-check's questions)

    def family(f, o, p):  # pair f, order o, principle p
        return head + [1000 + f] * 100 + [2000 + o] * 80 + [3000 + p] * 3

    for pairs, runs in ((8, 8), (3, 3), (40, 16)):
        prompts = sorted(family(f, o, p) for f in range(pairs) for o in range(2) for p in range(15))
        got = cut_runs(prompts, 16)
        assert len(got) == runs and sum(map(len, got)) == len(prompts)
        assert [j for r in got for j in r] == list(range(len(prompts)))  # neighbours, in order
        assert all(r[0] % 30 == 0 for r in got)  # every run starts a pair: nothing recomputed
    one = sorted(family(0, 0, p) for p in range(100))
    assert [len(r) for r in cut_runs(one, 16)] == [6, 6, 7, 6, 6, 6, 7, 6, 6, 6, 7, 6, 6, 6, 7, 6]
    assert cut_runs([[1, 2]], 16) == [[0]] and cut_runs([[1], [2]], 1) == [[0, 1]] and cut_runs([], 4) == []


def test_recheck_after_a_label_call_reuses_the_questions(engine, hh_dev):
    """Label and re-check calls alternate (`--recheck`); the server gives each prompt the idle
    slot whose cache shares the longest prefix with it, so the label call's prompts go to the
    slots holding label prompts and the next re-check finds its question list still cached: it
    computes its pairs and a few tokens per principle, not the list again. The results are the
    same bit for bit as on a fresh engine (a reused prefix is the one a fresh prefill computes)."""
    from cai.backends.llamacpp import LlamaCppBackend
    from cai.constitution import load_constitution
    from cai.judge import judge_pairs, recheck_pairs
    from cai.records import read_pairs, response_text

    const = load_constitution(HARMLESS)
    rows = read_pairs(hh_dev, limit=8, skip_bad=True)[:4]
    items = [(r["prompt"], response_text(r["chosen"]), response_text(r["rejected"])) for r in rows]
    b = LlamaCppBackend(None, batch_size=4)
    judge_pairs(b, const, rows[:2], principles=1)
    recheck_pairs(b, const, items[:2])
    judge_pairs(b, const, rows[2:], principles=1)
    before = b.stats["computed_tokens"]
    got = recheck_pairs(b, const, items[2:])
    computed = b.stats["computed_tokens"] - before
    fresh = LlamaCppBackend(None, batch_size=4)
    ref = recheck_pairs(fresh, const, items[2:])
    assert got == ref
    # the ~420-token question list is the difference (computed tokens: the server's own count)
    assert fresh.stats["computed_tokens"] - computed >= 400, (computed, fresh.stats["computed_tokens"])
