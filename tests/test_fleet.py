"""A real fleet: three llama.cpp C++ servers (``python -m cai.serve``, each its own process and
port, 2 slots, 1 thread) behind Debian's nginx (``least_conn``, the next replica on errors,
timeouts and 502/503/504), all on 127.0.0.1, started and stopped here.

What a fleet does to a run, and what must not change: the same ids and labels as one server;
a replica SIGKILLed mid-run, one that answers 503 and one that stalls past nginx's timeout
cost nothing (every id exactly once, rows as one server writes them); every replica gone
stops the run with one ``Error:`` line naming the URL, rows kept, and the same command
resumes once they are back. `cai serve` starts such a fleet and stops it on Ctrl-C.

The only stand-in is FaultProxy (tests/llama_server.py), a loopback proxy that makes one
upstream answer 503 or stall, which a healthy llama.cpp server cannot be asked to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import HARMLESS, ROOT
from llama_server import ALIAS, HAVE_LLAMA_CPP, SKIP_REASON, FaultProxy

from cai.fleet import NGINX_HINT, Nginx, Replica, nginx_binary

pytestmark = [
    pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=SKIP_REASON),
    pytest.mark.skipif(nginx_binary() is None, reason=f"nginx is not installed: {NGINX_HINT}"),
]

PROMPTS = [
    "How do I get past a locked gate?",
    "Write two lines about autumn rain.",
    "How can I read my partner's messages without them knowing?",
    "What's the easiest way to skip paying a parking fine?",
    "Give me a quick recipe for tomato soup.",
    "How do I make my neighbour's dog stop barking?",
]
GENERATE = ["--rounds", "1", "--max-new-tokens", "16", "--no-early-stop"]  # small: 2 busy cores
PAIRS = [
    ("How do I get into my neighbour's house?", "Knock, or ask them to let you in.", "Break a window."),
    ("What should I put on a burn?", "Cool running water for 20 minutes.", "Butter, lots of it."),
    ("Help me write a threatening letter.", "I can't help threaten anyone.", "Sure: 'I know where you live'"),
    ("How do I calm down before an exam?", "Breathe slowly and sleep well.", "Drink a lot of coffee."),
    ("Is it fine to leave a dog in a hot car?", "No, never: it can die in minutes.", "Yes, for an hour."),
    ("How do I find someone's password?", "You don't: ask them, or reset your own.", "Try their birthday."),
]
SLOTS = 2  # per replica
TIMEOUT = 240  # seconds any one run may take here (2 busy cores)
LABEL_TOL = 0.02  # |Δ p_chosen| allowed between a fleet's and one server's label (see test (a))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    logs = tmp_path_factory.mktemp("fleet-logs")
    reps = [
        Replica(None, threads=1, parallel=SLOTS, ctx_per_seq=1024, alias=ALIAS, log_dir=logs)
        for _ in range(3)
    ]
    try:
        for r in reps:
            r.launch()  # side by side: each loads the model on its own
        for r in reps:
            r.wait(120)
        yield reps
    finally:
        for r in reps:
            r.stop()


@pytest.fixture
def fleet(replicas):
    """The three replicas, alive (a test before may have killed some)."""
    for r in replicas:
        if not r.alive:
            r.start(120)
    return replicas


def _nginx(prefix: Path, upstreams, **conf) -> Nginx:
    return Nginx([u.split("//")[1].split("/")[0] for u in upstreams], prefix=prefix, fail_timeout=5, **conf)


def _cai(*args):
    from click.testing import CliRunner

    from cai.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _through(command, url, *args):
    """`cai COMMAND` on the server path at ``url`` with the shipped constitution."""
    server = ["--backend", "langchain", "--base-url", url, "--model", ALIAS, "--constitution", HARMLESS]
    return _cai(command, *server, *args)


def _generate(url, prompts, out, *extra):
    return _through("generate", url, "--prompts", prompts, "--out", out, *GENERATE, *extra)


def _label(url, pairs, out, *extra):
    return _through("label", url, "--pairs", pairs, "--out", out, *extra)


def _prompts(tmp_path, n=len(PROMPTS)) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS[:n]) + "\n")
    return p


def _pairs(tmp_path) -> Path:
    p = tmp_path / "pairs.jsonl"
    rows = [
        {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for i, (q, good, bad) in enumerate(PAIRS)
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _upstreams(ngx: Nginx) -> list[str]:
    """The replicas nginx sent chat requests to (a retried request names several)."""
    return [row[4] for row in ngx.access_log() if len(row) > 4 and row[2].endswith("/chat/completions")]


def _content(row: dict) -> tuple:
    return (row["id"], row["chosen"][0]["content"], row["rejected"][0]["content"])


@pytest.fixture(scope="module")
def reference(replicas, tmp_path_factory):
    """The same runs against one server (the first replica, straight, no nginx)."""
    d = tmp_path_factory.mktemp("one-server")
    gen, lab = d / "gen.jsonl", d / "lab.jsonl"
    res = _generate(replicas[0].url, _prompts(d), gen)
    assert res.exit_code == 0, res.output
    res = _label(replicas[0].url, _pairs(d), lab)
    assert res.exit_code == 0, res.output
    return {"generate": _rows(gen), "label": _rows(lab)}


def _labels_close(got: list[dict], want: list[dict], tol: float = LABEL_TOL) -> list[float]:
    """|Δ p_chosen| per row, rows matched by id; the ids must be the same, each once."""
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "an id was written twice"
    by_id = {r["id"]: r for r in want}
    assert sorted(ids) == sorted(by_id), "ids differ from the one-server run"
    d = [abs(r["label"]["p_chosen"] - by_id[r["id"]]["label"]["p_chosen"]) for r in got]
    assert max(d) <= tol, d
    return d


def _watch(until, then, timeout: float = TIMEOUT):
    """A thread that calls ``then()`` once ``until()`` is true (checked every 50 ms)."""

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until():
            time.sleep(0.05)
        then()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _lines(path) -> int:
    try:
        return Path(path).read_bytes().count(b"\n")
    except OSError:
        return 0


# -- (a) the fleet gives what one server gives ---------------------------------------------------


def test_fleet_gives_the_one_server_ids_and_labels(fleet, reference, tmp_path):
    """Generate + label through nginx over three replicas, against the same runs on one server.

    Measured while writing this test (11 runs, six prompts, 16 tokens): `cai label` gave
    bit-identical labels every time (a judge request is a prefill, and llama.cpp prefills a
    prompt alike in any slot, beside any other prompt, after any cached prefix). `cai generate`'s
    initial responses were identical every time; a critique or revision continues from the
    response it is about, whose keys and values are in the slot that generated it (computed
    token by token) or are prefilled afresh on another slot or replica, whichever is free, and
    the two differ by rounding: in about a third of the runs one or two of the six rows took
    another greedy token at a near-tie (with ``cache_prompt`` off, fleet and one-server rows were
    identical in every run: docs/architecture.md, "A fleet"). Labels of the rows whose texts
    matched were identical too; LABEL_TOL (0.02) is the gap docs/architecture.md notes for a
    prompt found whole in a slot's cache (its last token from a one-row kernel)."""
    with _nginx(tmp_path / "nginx", [r.url for r in fleet]) as ngx:
        gen, lab = tmp_path / "gen.jsonl", tmp_path / "lab.jsonl"
        res = _generate(ngx.url, _prompts(tmp_path), gen)
        assert res.exit_code == 0, res.output
        res = _label(ngx.url, _pairs(tmp_path), lab)
        assert res.exit_code == 0, res.output
        used = {u.strip() for row in _upstreams(ngx) for u in row.split(",")}
    assert used == {f"127.0.0.1:{r.port}" for r in fleet}, used  # every replica served
    rows = _rows(gen)
    runtime = rows[0]["meta"]["runtime"]
    # the default in flight: every slot of the fleet (2 per replica, from /props x X-Cai-Replicas)
    assert runtime["server_slots"] == 3 * SLOTS and runtime["concurrency"] == 3 * SLOTS

    _labels_close(_rows(lab), reference["label"])  # fixed pairs: the judge alone
    want = {r["id"]: r for r in reference["generate"]}
    assert sorted(want) == sorted(r["id"] for r in rows) and len(rows) == len(PROMPTS)
    assert all(r["trace"]["initial"] == want[r["id"]]["trace"]["initial"] for r in rows)
    same = [r for r in rows if _content(r) == _content(want[r["id"]])]
    assert len(same) >= len(rows) // 2, [(r["trace"], want[r["id"]]["trace"]) for r in rows]
    _labels_close(same, [want[r["id"]] for r in same])


def test_without_the_prompt_cache_a_fleet_writes_the_one_server_rows(fleet, tmp_path):
    """`-o cache_prompt=false`: every request a fresh prefill, so which slot or replica takes it
    no longer matters; the rows through three replicas are the rows of one server, bit for bit."""
    prompts, one, many = _prompts(tmp_path, 3), tmp_path / "one.jsonl", tmp_path / "fleet.jsonl"
    res = _generate(fleet[0].url, prompts, one, "-o", "cache_prompt=false")
    assert res.exit_code == 0, res.output
    with _nginx(tmp_path / "nginx", [r.url for r in fleet]) as ngx:
        res = _generate(ngx.url, prompts, many, "-o", "cache_prompt=false")
        assert res.exit_code == 0, res.output
    a, b = _rows(one), _rows(many)
    assert b[0]["meta"]["runtime"]["cache_prompt"] is False
    key = lambda r: r["id"]  # noqa: E731
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        assert (x["id"], x["chosen"], x["rejected"], x["label"], x["trace"]) == (
            y["id"],
            y["chosen"],
            y["rejected"],
            y["label"],
            y["trace"],
        )
    assert len(a) == len(b) == 3


# -- (b)-(d) faults: nothing lost, nothing written twice ----------------------------------------


def test_a_replica_killed_mid_run_costs_nothing(fleet, reference, tmp_path):
    """SIGKILL one of three replicas while its slots are busy: nginx sends what it dropped to
    another replica, the run completes, every id exactly once, every row whole."""
    victim = fleet[1]
    gen = tmp_path / "gen.jsonl"
    with _nginx(tmp_path / "nginx", [r.url for r in fleet]) as ngx:
        watcher = _watch(lambda: len(_upstreams(ngx)) >= 4, victim.kill)  # the run is well under way
        res = _generate(ngx.url, _prompts(tmp_path), gen)
        watcher.join(5)
        assert res.exit_code == 0, res.output
        retried = [u for u in _upstreams(ngx) if u.startswith(f"127.0.0.1:{victim.port},")]
    assert not victim.alive
    assert retried, "no request was in flight at the killed replica; the test needs a slower run"
    rows = _rows(gen)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(PROMPTS)
    assert sorted(ids) == sorted(r["id"] for r in reference["generate"])
    for r in rows:
        assert len(r["trace"]["rounds"]) == 1 and r["trace"]["rounds"][0]["critique"]
        assert 0.0 <= r["label"]["p_chosen"] <= 1.0


def test_every_replica_gone_stops_cleanly_and_the_rerun_completes(fleet, tmp_path):
    """All three killed mid-run: one `Error:` line naming the URL, exit 2, the rows written
    before are kept as they were; restart the replicas and the same command completes."""
    gen = tmp_path / "gen.jsonl"
    args = ["--no-label", "--chunk-size", 2]
    with _nginx(tmp_path / "nginx", [r.url for r in fleet]) as ngx:

        def kill_all():
            for r in fleet:
                r.kill()

        watcher = _watch(lambda: _lines(gen) >= 2, kill_all)
        t0 = time.monotonic()
        res = _generate(ngx.url, _prompts(tmp_path), gen, *args)
        watcher.join(5)
        assert res.exit_code == 2, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and ngx.url in errors[0], res.output
        assert "rerun the same command to resume" in errors[0] and "Traceback" not in res.output
        assert time.monotonic() - t0 < 60  # the retries are bounded
        kept = _rows(gen)
        assert 2 <= len(kept) < len(PROMPTS), "the run finished before the kill; the test needs a slower run"
        before = gen.read_bytes()

        for r in fleet:
            r.launch()
        for r in fleet:
            r.wait(120)
        res = _generate(ngx.url, _prompts(tmp_path), gen, *args)
        assert res.exit_code == 0, res.output
    assert gen.read_bytes().startswith(before)  # rows written before the kill are untouched
    ids = [r["id"] for r in _rows(gen)]
    assert len(ids) == len(set(ids)) == len(PROMPTS)


def test_a_replica_answering_503_has_its_requests_finish_elsewhere(fleet, reference, tmp_path):
    with FaultProxy(fleet[0].url) as px:
        px.fail, px.status = 10**6, 503  # every chat request it gets
        with _nginx(tmp_path / "nginx", [px.url, fleet[1].url, fleet[2].url]) as ngx:
            lab = tmp_path / "lab.jsonl"
            res = _label(ngx.url, _pairs(tmp_path), lab, "--concurrency", 4)
            assert res.exit_code == 0, res.output
            log = _upstreams(ngx)
    refused = [s for _, path, s in px.attempts if path.endswith("/chat/completions")]
    assert refused and set(refused) == {503}
    proxy = px.url.split("//")[1].split("/")[0]
    assert any(u.startswith(proxy + ",") for u in log), log  # nginx moved them to another replica
    _labels_close(_rows(lab), reference["label"])  # and they came back as one server answers them


def test_a_replica_that_stalls_past_the_timeout_has_its_requests_finish_elsewhere(fleet, reference, tmp_path):
    with FaultProxy(fleet[0].url) as px:
        px.delay = 120  # far past nginx's read timeout; released when the proxy closes
        with _nginx(tmp_path / "nginx", [px.url, fleet[1].url, fleet[2].url], read_timeout=5) as ngx:
            lab = tmp_path / "lab.jsonl"
            t0 = time.monotonic()
            res = _label(ngx.url, _pairs(tmp_path), lab, "--concurrency", 4)
            took = time.monotonic() - t0
            assert res.exit_code == 0, res.output
            log = _upstreams(ngx)
    assert px.chat_attempts(), "nginx never sent a request to the stalled replica"
    proxy = px.url.split("//")[1].split("/")[0]
    assert any(u.startswith(proxy + ",") for u in log), log
    assert took < 60, took  # no request waited for the stall
    _labels_close(_rows(lab), reference["label"])


# -- `cai serve` ------------------------------------------------------------------------------


def test_cai_serve_starts_a_fleet_prints_its_url_and_stops_on_ctrl_c(tmp_path):
    from cai.backends.langchain import LangChainBackend
    from cai.fleet import free_port

    port = free_port()
    d = tmp_path / "serve"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai", "serve", "--replicas", "2", "--port", str(port), "--threads", "1"]
        + ["--parallel", "1", "--ctx-per-seq", "512", "--alias", ALIAS, "--dir", str(d)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our SIGINT below is its only Ctrl-C
    )
    try:
        line = proc.stdout.readline().strip()  # printed once every replica and nginx answer
        url = f"http://127.0.0.1:{port}/v1"
        assert line == f"--backend langchain --base-url {url} --model {ALIAS}", (line, proc.stderr.read())
        upstreams = [x.split()[1] for x in (d / "nginx.conf").read_text().splitlines() if "server 127" in x]
        assert len(upstreams) == 2
        b = LangChainBackend(ALIAS, base_url=url)
        assert b.concurrency == 2  # 1 slot x 2 replicas, from /props and X-Cai-Replicas
        (g,) = b.generate([[{"role": "user", "content": "Say hi."}]], max_new_tokens=4)
        assert g.n_tokens > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped nginx and 2 replica(s)" in err
    import socket

    for addr in [f"127.0.0.1:{port}", *upstreams]:  # nothing listens any more
        host, p = addr.split(":")
        with socket.socket() as s:
            assert s.connect_ex((host, int(p))) != 0, addr


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    import socket

    from cai.errors import InputError
    from cai.fleet import Fleet

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        fleet = Fleet(None, replicas=2, port=port, prefix=tmp_path / "fleet")
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is in use: pick another --port"):
            fleet.start()
        assert all(r.proc is None for r in fleet.replicas)  # no replica was started for nothing
