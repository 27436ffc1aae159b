"""`cai review`: the token, blindness, the JSONL rows, and a real headless Chromium driving the page."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cai.errors import InputError
from cai.records import read_pairs, read_rows
from cai.review import ReviewConfig, ReviewServer, ReviewSession, chosen_first, seeded_order
from cai.rowwriter import RowWriter

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def make_pairs(path: Path, n: int = 12, xss_at: int | None = None) -> Path:
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"pair-{i:02d}",
                "prompt": [{"role": "user", "content": f"Question number {i}: how do I do thing {i}?"}],
                "chosen": [{"role": "assistant", "content": f"Careful, helpful answer {i}."}],
                "rejected": [
                    {"role": "assistant", "content": f"Careless answer {i}, which is longer than the other."}
                ],
                "label": {
                    "p_chosen": 0.7,
                    "source": "ai",
                    "judge": {
                        "orders": [0.8, 0.6],
                        "principles": ["harm"],
                        "by_principle": {"harm": [0.8, 0.6]},
                        "method": "logprob",
                    },
                },
                "trace": {
                    "initial": f"Careless answer {i}, which is longer than the other.",
                    "rounds": [{"principle": "harm", "critique": f"critique {i}", "revision": "y"}],
                },
            }
        )
    if xss_at is not None:
        r = rows[xss_at]
        r["prompt"][0]["content"] = "Prompt " + XSS
        r["chosen"][0]["content"] = "Chosen " + XSS
        r["rejected"][0]["content"] = "Rejected <b>bold?</b> " + XSS
        r["trace"]["rounds"][0]["critique"] = "Critique " + XSS
        r["trace"]["initial"] = r["rejected"][0]["content"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ============================================================================ no browser needed


@pytest.fixture
def server(tmp_path):
    pairs = make_pairs(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "human.jsonl"
    writer = RowWriter(out)
    session = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="ann"), writer)
    srv = ReviewServer(session).start()
    yield srv, out
    srv.close()
    writer.close()


def _get(url, token=None, data=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["X-Cai-Token"] = token
    req = urllib.request.Request(
        url, data=None if data is None else json.dumps(data).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_every_request_needs_the_token(server):
    srv, out = server
    base = srv.url.split("?")[0]
    for path in ("", "review.js", "review.css", "api/state", "api/reveal?id=pair-00", "nope"):
        assert _get(base + path)[0] == 403, path
        assert _get(base + path + ("&" if "?" in path else "?") + "token=wrong")[0] == 403, path
    state = json.loads(_get(base + "api/state", srv.token)[1])
    bad = {"id": state["pair"]["id"], "answer": "first"}
    assert _get(base + "api/answer", data=bad)[0] == 403
    assert _get(base + "api/undo", data={})[0] == 403
    assert not out.exists()  # nothing was written for a refused request
    status, page = _get(srv.url)
    assert status == 200 and b"review.js?token=" + srv.token.encode() in page
    assert _get(base + "review.js?token=" + srv.token)[0] == 200
    assert srv.httpd.server_address[0] == "127.0.0.1"


def test_blind_until_answered_then_reveal(server):
    srv, out = server
    base, tok = srv.url.split("?")[0], srv.token
    state = json.loads(_get(base + "api/state", tok)[1])
    pid = state["pair"]["id"]
    blob = json.dumps(state)
    for secret in ('"label"', "judge", "trace", "critique", "p_chosen", "0.7"):
        assert secret not in blob
    assert _get(base + f"api/reveal?id={pid}", tok)[0] == 403
    status, body = _get(base + "api/answer", tok, {"id": pid, "answer": "second", "note": "n"})
    assert status == 200
    rev = json.loads(_get(base + f"api/reveal?id={pid}", tok)[1])
    shown_first = chosen_first(pid, 0)
    assert rev["p_first"] == pytest.approx(0.7 if shown_first else 0.3)
    assert rev["rounds"][0]["critique"].startswith("critique")
    assert rev["initial_is"] == ("second" if shown_first else "first")  # the initial answer is `rejected`
    # answering a pair that is no longer current is refused (a double key press answers nothing)
    assert _get(base + "api/answer", tok, {"id": pid, "answer": "first"})[0] == 409
    row = read_rows(out)[-1]
    assert row["label"]["p_chosen"] == (0.0 if shown_first else 1.0)
    assert row["label"]["answer"] == "second" and row["label"]["note"] == "n"


def test_revisions_last_wins_in_read_pairs(tmp_path):
    pairs = make_pairs(tmp_path / "pairs.jsonl", 3)
    out = tmp_path / "human.jsonl"
    with RowWriter(out) as w:
        s = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="a", seed=1), w)
        order = s.order
        s.answer(order[0], "first")
        s.answer(order[1], "tie")
        s.undo()  # order[1] is unanswered again
        s.answer(order[1], "second")
        s.answer(order[2], "skip")
    rows = read_rows(out)
    assert [r["label"]["revision"] for r in rows] == [0, 0, 1, 2, 0]
    stats: dict = {}
    kept = {r["pair_id"]: r for r in read_pairs(out, stats=stats)}
    assert set(kept) == {order[0], order[1]} and stats["unlabelled"] == 1
    first = s.shown[order[1]][1]  # "second" picked the right-hand response
    assert kept[order[1]]["label"]["p_chosen"] == (1.0 if first == "chosen" else 0.0)
    # a new session resumes: nothing left to answer, the last answered pair is undoable
    with RowWriter(out) as w:
        s2 = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="a", seed=1), w)
        assert s2.done() == 3 and s2.current() is None and s2.last_answered() == order[2]
        other = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="b", seed=1), w)
        assert other.done() == 0  # another annotator starts afresh in the same file


# ============================================================================ the server's bounds


def _raw(srv, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the server and read the whole reply (it closes after one request)."""
    with socket.create_connection(srv.httpd.server_address[:2], timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _head(srv, method="GET", path="/api/state", host=None, **headers) -> bytes:
    port = srv.httpd.server_address[1]
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not False:
        lines.append(f"Host: {host or f'127.0.0.1:{port}'}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def test_bodies_the_server_cannot_trust_are_400(server):
    """A body nested thousands deep (RecursionError), a negative, non-numeric or chunked length
    (which would read until the client closes): 400 at once, nothing written, still serving."""
    srv, out = server
    tok = {"X_Cai_Token": srv.token, "Content_Type": "application/json"}
    deep = b"[" * 5000 + b"]" * 5000
    cases = {
        "deep": _head(srv, "POST", "/api/answer", Content_Length=len(deep), **tok) + deep,
        "negative": _head(srv, "POST", "/api/answer", Content_Length="-1", **tok),
        "words": _head(srv, "POST", "/api/answer", Content_Length="twelve", **tok),
        "chunked": _head(srv, "POST", "/api/answer", Transfer_Encoding="chunked", **tok) + b"5\r\n{}\r\n",
    }
    for name, request in cases.items():
        t0 = time.monotonic()
        reply = _raw(srv, request)
        assert _status(reply) == 400, (name, reply[:200])
        assert time.monotonic() - t0 < 3, name  # answered, not waiting for more bytes
    assert b"nested too deeply" in _raw(srv, cases["deep"])
    assert _get(srv.url.split("?")[0] + "api/state", srv.token)[0] == 200
    assert not out.exists()


def test_host_and_origin_are_a_second_wall_behind_the_token(server):
    srv, out = server
    port = srv.httpd.server_address[1]
    tok = {"X_Cai_Token": srv.token}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert _status(_raw(srv, _head(srv, host=host, **tok))) == 200, host
    for host in (
        f"evil.example:{port}",
        "127.0.0.1",
        f"127.0.0.1:{port + 1}",
        f"127.0.0.1.nip.io:{port}",
        False,
    ):
        reply = _raw(srv, _head(srv, host=host, **tok))
        assert _status(reply) == 403 and b"Host" in reply, host  # a rebound DNS name is not this server
    assert _status(_raw(srv, _head(srv, Origin=f"http://127.0.0.1:{port}", **tok))) == 200
    for origin in ("http://evil.example", "null", f"https://127.0.0.1:{port}"):
        body = json.dumps({"id": "x", "answer": "first"})
        head = _head(srv, "POST", "/api/answer", Origin=origin, Content_Length=len(body), **tok)
        post = head.replace(b"\r\n\r\n", b"\r\nContent-Type: application/json\r\n\r\n") + body.encode()
        assert _status(_raw(srv, post)) == 403, origin
    assert not out.exists()


def test_idle_connections_do_not_starve_real_requests(tmp_path):
    """Hundreds of connections that never send a request (no token needed to open one) hold at
    most max_connections threads, the longest-idle are dropped to make room, and a real request
    is answered at once; an idle connection is also closed after the socket timeout."""
    pairs = make_pairs(tmp_path / "pairs.jsonl", 2)
    out = tmp_path / "human.jsonl"
    with RowWriter(out) as w:
        session = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="a"), w)
        srv = ReviewServer(session, timeout=1.0, max_connections=16).start()
        threads = threading.active_count()
        idle = []
        try:
            for _ in range(300):
                with contextlib.suppress(OSError):
                    idle.append(socket.create_connection(srv.httpd.server_address[:2], timeout=2))
            t0 = time.monotonic()
            status, _ = _get(srv.url.split("?")[0] + "api/state", srv.token)
            assert status == 200 and time.monotonic() - t0 < 5
            assert threading.active_count() <= threads + 16 + 2  # bounded, not one per socket
            assert len(idle) >= 250  # they were all accepted (or waiting), not refused
            deadline = time.monotonic() + 10
            while threading.active_count() > threads + 1 and time.monotonic() < deadline:
                time.sleep(0.1)  # the socket timeout closes what is still idle
            assert threading.active_count() <= threads + 1
            assert idle[-1].recv(1) == b""  # closed by the server, not waiting for ever
        finally:
            for s in idle:
                s.close()
            srv.close()


def test_a_port_out_of_range_is_one_line(tmp_path):
    pairs = make_pairs(tmp_path / "pairs.jsonl", 2)
    out = tmp_path / "h.jsonl"
    session = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="a"), RowWriter(out))
    with pytest.raises(InputError, match="cannot listen on 127.0.0.1:70000"):
        ReviewServer(session, port=70000)


# ============================================================================ a real browser


def _browser_missing() -> str | None:
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) and os.access(path, os.X_OK)):
            return (
                f"{path} not found: install Debian's {pkg} "
                "(apt-get install -y chromium chromium-driver; make install does)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager, if ever consulted, must not download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        opts.add_argument(a)
    # an explicit driver path: selenium-manager never looks for (or downloads) a driver
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Review:
    """`cai review` as a subprocess (so a restart is a real kill and a real new process)."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cai", "review", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        found = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "http://" in line:
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(60):
            self.proc.kill()
            raise AssertionError("cai review printed no URL:\n" + "".join(self.lines))
        self.url = re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", "".join(self.lines)).group(1)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _wait(driver, cond, what: str, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: cond(d), message=what)


def _count(driver) -> str:
    return driver.find_element("id", "count").text


def _press(driver, key: str, expect_count: str):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()
    _wait(driver, lambda d: _count(d) == expect_count, f"after '{key}' the page shows {expect_count!r}")


def _shown(driver) -> tuple[str, str, str]:
    f = driver.find_element("id", "first").text
    s = driver.find_element("id", "second").text
    conv = driver.find_element("id", "conversation").text
    return conv, f, s


@needs_browser
def test_ten_pairs_by_keyboard_with_undo_and_restart(tmp_path, browser):
    pairs = make_pairs(tmp_path / "pairs.jsonl", 12)
    out = tmp_path / "human.jsonl"
    args = [
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--annotator",
        "tester",
        "--sample",
        "10",
        "--seed",
        "3",
    ]
    src = {r["id"]: r for r in read_rows(pairs)}
    order = seeded_order(list(src), 3, 10)

    def check_pair(i):
        conv, f, s = _shown(browser)
        pid = order[i]
        c, r = src[pid]["chosen"][0]["content"], src[pid]["rejected"][0]["content"]
        assert src[pid]["prompt"][0]["content"] in conv
        assert (f, s) == ((c, r) if chosen_first(pid, 3) else (r, c))
        assert "0.7" not in browser.page_source  # blind: no AI probability on the page

    srv = Review(*args)
    browser.get(srv.url)
    _wait(browser, lambda d: _count(d) == "0 / 10 answered", "the page loads")
    check_pair(0)
    _press(browser, "1", "1 / 10 answered")
    check_pair(1)
    _press(browser, "2", "2 / 10 answered")
    _press(browser, "t", "3 / 10 answered")
    _press(browser, "1", "4 / 10 answered")
    _press(browser, "u", "3 / 10 answered")  # undo: pair 4 is back
    check_pair(3)
    browser.find_element("id", "note").click()
    from selenium.webdriver.common.keys import Keys

    browser.find_element("id", "note").send_keys("second is clearer 2t")  # keys in the note are text
    assert _count(browser) == "3 / 10 answered"
    browser.find_element("id", "note").send_keys(Keys.ESCAPE)
    _press(browser, "2", "4 / 10 answered")
    _press(browser, "s", "5 / 10 answered")
    srv.kill()  # a crash halfway: every answer must already be on disk

    srv = Review(*args)
    assert "5/10 pairs answered by tester" in "".join(srv.lines)
    browser.get(srv.url)
    _wait(browser, lambda d: _count(d) == "5 / 10 answered", "the page resumes at pair 6")
    check_pair(5)
    for i, key in enumerate("12t12", start=6):
        _press(browser, key, f"{i} / 10 answered")
    _wait(browser, lambda d: d.find_element("id", "finished").is_displayed(), "the finished message")
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(15) == 0

    rows = read_rows(out)
    assert all(r["label"]["annotator"] == "tester" and r["label"]["source"] == "human" for r in rows)
    assert [r["pair_id"] for r in rows] == [order[i] for i in (0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9)]
    answers = [r["label"]["answer"] for r in rows]
    assert answers == [
        "first",
        "second",
        "tie",
        "first",
        "undo",
        "second",
        "skip",
        "first",
        "second",
        "tie",
        "first",
        "second",
    ]
    assert [r["label"]["revision"] for r in rows[3:6]] == [0, 1, 2]
    assert rows[5]["label"]["note"] == "second is clearer 2t"
    for r in rows:
        lab = r["label"]
        assert lab["position"] == order.index(r["pair_id"])
        assert lab["shown"] == (
            ["chosen", "rejected"] if chosen_first(r["pair_id"], 3) else ["rejected", "chosen"]
        )
        if lab["answer"] in ("first", "second"):
            picked = lab["shown"][0 if lab["answer"] == "first" else 1]
            assert lab["p_chosen"] == (1.0 if picked == "chosen" else 0.0)
        else:
            assert lab["p_chosen"] == {"tie": 0.5, "skip": None, "undo": None}[lab["answer"]]
    stats: dict = {}
    kept = read_pairs(out, stats=stats)  # what `cai train` / `cai compare --human-train` read
    assert len(kept) == 9 and stats["unlabelled"] == 1
    assert {r["pair_id"] for r in kept} == set(order) - {order[4]}


@needs_browser
def test_markup_in_pairs_is_shown_as_text(tmp_path, browser):
    pairs = make_pairs(tmp_path / "pairs.jsonl", 2, xss_at=0)
    out = tmp_path / "human.jsonl"
    srv = Review("--pairs", str(pairs), "--out", str(out), "--annotator", "x", "--seed", "0")
    try:
        browser.get(srv.url)
        order = seeded_order(["pair-00", "pair-01"], 0, None)
        _wait(browser, lambda d: _count(d) == "0 / 2 answered", "the page loads")
        before = order.index("pair-00")  # answer the other pair first when it comes first
        if before:
            _press(browser, "1", "1 / 2 answered")
        conv, f, s = _shown(browser)
        assert XSS in conv and XSS in f + s and "<b>bold?</b>" in f + s
        _press(browser, "2", f"{before + 1} / 2 answered")
        browser.find_element("tag name", "body").send_keys("r")
        _wait(browser, lambda d: "Critique" in d.find_element("id", "revealed").text, "the reveal panel")
        assert XSS in browser.find_element("id", "revealed").text
        assert browser.execute_script("return window.__xss") is None
        assert browser.find_elements("css selector", "img, script:not([src])") == []
        assert all(b.text != "bold?" for b in browser.find_elements("css selector", "b"))
    finally:
        srv.kill()


def test_chromium_skip_reason_names_the_packages(monkeypatch):
    monkeypatch.setattr(
        os.path, "exists", lambda p: False if p in (CHROMIUM, CHROMEDRIVER) else os.path.isfile(p)
    )
    reason = _browser_missing()
    assert reason and "apt-get install -y chromium chromium-driver" in reason


def test_cai_train_reads_the_answers(tiny_reward_base, tmp_path):
    from click.testing import CliRunner

    from cai.cli import cli

    pairs = make_pairs(tmp_path / "pairs.jsonl", 6)
    out = tmp_path / "human.jsonl"
    with RowWriter(out) as w:
        s = ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="a"), w)
        for key in ("first", "second", "tie", "first", "skip", "second"):
            s.answer(s.current(), key)
        s.undo()  # the last "second" is taken back: five answers left, one of them a skip
    rm = tmp_path / "rm"
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--pairs",
            str(out),
            "--out",
            str(rm),
            "--base",
            str(tiny_reward_base),
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--epochs",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((rm / "cai_train_config.json").read_text())
    assert rec["data"]["train"]["rows"] == 4 and rec["data"]["train"]["label_sources"] == {"human": 4}
