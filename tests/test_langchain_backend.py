"""The langchain backend against tests/openai_server.py, an OpenAI-compatible HTTP server backed
by the tiny in-process model, for what llama.cpp's real server (tests/test_llamacpp.py) cannot
show: token-for-token equality with the hf backend while requests overlap, vLLM's
continue_final_message honoured or rejected with a 400, the exact request fields sent, and a
server that answers with null log-probs. End-to-end CLI runs, wrong --model and dead servers
are tested against the real llama.cpp server."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pytest
from conftest import ROOT
from openai_server import serve

from cai.backends.langchain import LangChainBackend
from cai.errors import CaiError

PREFIXED = [
    {"role": "user", "content": "Which is safer, (A) or (B)?"},
    {"role": "assistant", "content": "The answer is: ("},
]
CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
    [{"role": "user", "content": "Tell me a joke about cats."}],
    [{"role": "user", "content": "What is 2+2?"}],
    PREFIXED,
]


@pytest.fixture(scope="module")
def hf(tiny_model):
    from cai.backends.hf import HFBackend

    # batch_size=1: no padding, so greedy outputs are token-for-token what the server computes.
    return HFBackend(str(tiny_model), batch_size=1, device="cpu")


@pytest.fixture(scope="module")
def server(hf):
    # 20 ms of latency per request, outside the model lock, so overlapping requests are visible.
    with serve(hf, delay=0.02) as url:
        yield url


def test_generate_matches_hf_with_requests_in_flight(server, hf):
    server.server.max_in_flight = 0
    b = LangChainBackend("test-model", base_url=server, batch_size=4)
    got = b.generate(CONVERSATIONS, max_new_tokens=8, temperature=0.0)
    want = hf.generate(CONVERSATIONS, max_new_tokens=8, temperature=0.0)
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.n_tokens > 0 for g in got) and b.stats["generated_tokens"] >= 8
    assert server.server.max_in_flight >= 2, "requests were sent one at a time"
    # the assistant prefix was continued (vLLM's fields), not answered as a new turn
    assert b.prefix == "continue"
    sent = [r for r in server.server.requests if r["messages"][-1]["role"] == "assistant"]
    assert sent and sent[-1]["continue_final_message"] is True and sent[-1]["add_generation_prompt"] is False
    # the length limit goes under both names: TGI reads only max_tokens
    assert sent[-1]["max_tokens"] == sent[-1]["max_completion_tokens"] == 8

    # sampling: the same seed reproduces; two copies of one conversation are two different samples
    twice = [CONVERSATIONS[0], CONVERSATIONS[0]]
    a = [g.text for g in b.generate(twice, max_new_tokens=8, temperature=1.0, seed=3)]
    assert a == [g.text for g in b.generate(twice, max_new_tokens=8, temperature=1.0, seed=3)]
    assert a[0] != a[1]
    meta = b.describe()
    assert meta["backend"] == "langchain" and meta["model"] == "test-model"
    assert "EMPTY" not in json.dumps(meta)  # the API key is never recorded


def _listed_options(hf, prompt, k=2):
    """Options the tiny (random) model actually puts in its top 20 after ``prompt``, picked so
    that each is its own first token and no other listed token shares its stripped text."""
    import torch

    enc = hf.tok(hf.render(prompt), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        top = torch.log_softmax(hf.model(**enc).logits[0, -1].float(), -1).topk(20).indices.tolist()
    texts = [hf.tok.decode([t]) for t in top]
    picked = []
    for t, s in zip(top, texts):
        if (
            s.strip()
            and s.isprintable()
            and [x.strip() for x in texts].count(s.strip()) == 1
            and hf.tok(s, add_special_tokens=False)["input_ids"][:1] == [t]
        ):
            picked.append(s)
    assert len(picked) >= k, texts
    return picked[:k]


def test_option_logprobs_match_hf(server, hf):
    b = LangChainBackend("test-model", base_url=server, batch_size=4)
    assert b.supports_logprobs
    prompts = [PREFIXED, CONVERSATIONS[0]]
    for prompt in prompts:
        listed = _listed_options(hf, prompt)
        absent = "zebra"  # far down a random model's distribution: not among the top 20
        got = b.option_logprobs([prompt], listed + [absent])[0]
        want = hf.option_logprobs([prompt], listed + [absent])[0]
        assert got[:2] == pytest.approx(want[:2], abs=1e-4)
        # the floor: below every listed option, and at most the true value's upper bound
        assert got[2] < min(got[:2])
        assert want[2] <= got[2] + math.log(2) + 1e-6
    assert b.stats["options_floored"] == 2 and b.stats["options_scored"] == 6


def test_server_without_continue_folds_the_prefix(hf, capsys):
    with serve(hf, continue_final_message=False) as url:
        b = LangChainBackend("test-model", base_url=url)
        (g,) = b.generate([PREFIXED], max_new_tokens=4)
        assert isinstance(g.text, str) and g.n_tokens > 0
        assert b.prefix == "fold"
        last = url.server.requests[-1]
        assert "continue_final_message" not in last and last["messages"][-1]["role"] == "user"
        assert last["messages"][-1]["content"].endswith("Begin your reply with: The answer is: (")
    assert "folded into the user turn" in capsys.readouterr().err


def test_server_without_logprobs_falls_back_to_verdicts(hf, capsys):
    with serve(hf, logprobs=False) as url:
        b = LangChainBackend("test-model", base_url=url)
        assert b.supports_logprobs is False
        assert b.describe()["logprobs"] is False
        with pytest.raises(CaiError, match="generated-verdict judge"):
            b.option_logprobs([PREFIXED], ["A", "B"])
    assert "returns no log-probs" in capsys.readouterr().err


def test_unreachable_server_says_what_to_do():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(CaiError, match=f"cannot reach {url}: start the server or fix --base-url"):
        LangChainBackend("some-model", base_url=url, max_retries=0)


def test_import_stays_light():
    # `cai --help` stays instant: langchain is imported only when the backend is built
    code = (
        "import cai.cli, cai.backends.langchain, sys; "
        "print([m for m in sys.modules if m.startswith('langchain')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_concurrency_bounds_requests_in_flight_across_overlapping_calls(server):
    """Two chunks side by side (two threads calling generate at once) still keep at most
    --concurrency requests open: one semaphore for the backend."""
    import threading

    b = LangChainBackend("test-model", base_url=server, concurrency=2)
    assert b.describe()["concurrency"] == 2 and b.slots is None  # this server reports no slots
    server.server.max_in_flight = 0
    out = {}

    def run(k):
        out[k] = b.generate(CONVERSATIONS[:4], max_new_tokens=4)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert server.server.max_in_flight == 2, server.server.max_in_flight
    assert [g.text for g in out[0]] == [g.text for g in out[1]]
    # unset, a server without /props falls back to --batch-size
    assert LangChainBackend("test-model", base_url=server, batch_size=3).concurrency == 3


def test_concurrency_is_refused_for_engines_in_this_process():
    from cai.configs import ModelOptions
    from cai.errors import InputError

    with pytest.raises(InputError, match="--concurrency does not apply to the llamacpp backend"):
        ModelOptions(concurrency=8).resolve()
