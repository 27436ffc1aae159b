"""`cai review`: a local web page where a person labels pairs blind.

The server is the standard library's ``ThreadingHTTPServer`` (docs/architecture.md says why):
one static page (``cai/static/review.*``) and a small JSON API. It binds 127.0.0.1, and every
request — the page, its script and style, each API call — must carry the random token printed
with the URL (403 otherwise). The page inserts all text with ``textContent``; the server never
builds HTML from data.

Pairs are shown in a seeded random order (``--seed``; ``--sample N`` keeps the first N of that
order), and each pair's two responses in a seeded random left/right order. Nothing about the AI
label, the judge or the critique/revision trace reaches the page until the person has answered
that pair; then ``/api/reveal`` may show it.

Every action is appended at once (written and fsynced) to ``--out`` as a pairs-contract row::

    {"id": "<pair id>@<annotator>", "pair_id": "<pair id>", "prompt", "chosen", "rejected",
     "label": {"p_chosen": 1.0 | 0.0 | 0.5 | null, "source": "human", "answer": "first" | "second"
               | "tie" | "skip" | "undo", "revision": k, "annotator", "time", "shown": ["chosen",
               "rejected"] (left to right), "position": i (place in the seeded order), "note"?},
     "meta": {"tool": "cai review", "pairs": {"path", "sha256"}, "seed", "sample", "version"}}

``p_chosen`` is in the row's own orientation (1 = the row's ``chosen`` is better) whatever side it
was shown on. Answering a pair again (after an undo, or in a later session) appends a new row for
the same id with the next ``revision``; readers keep the highest revision per id
(``records.read_pairs`` does), and a latest row with ``p_chosen: null`` (a skip or an undo) means
the pair has no label. Restarting the command resumes at the first pair without a kept answer.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cai import __version__
from cai.configs import ReviewConfig
from cai.errors import CaiError, InputError
from cai.guard import claim_output
from cai.options import check_config
from cai.records import file_sha256, read_pairs, read_rows, response_text
from cai.rowwriter import RowWriter

ANSWERS = {"first", "second", "tie", "skip"}
VOID = ("skip", "undo")  # rows that leave the pair without a label
STATIC = Path(__file__).parent / "static"
ASSETS = {"/review.js": ("review.js", "text/javascript"), "/review.css": ("review.css", "text/css")}
_ANNOTATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
MAX_NOTE = 2000
MAX_BODY = 16_384
TIMEOUT = 10.0  # seconds any one read or write on a connection may wait
MAX_CONNECTIONS = 32  # connections served at once (a bound on threads)
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def check_annotator(name: str) -> str:
    if not _ANNOTATOR.match(name or ""):
        raise InputError(
            f"--annotator {name!r}: use 1-40 letters, digits, '.', '_' or '-' "
            "(it becomes part of each row id)"
        )
    return name


def default_annotator() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "", os.environ.get("USER") or os.environ.get("USERNAME") or "")[:40]
    return name if _ANNOTATOR.match(name) else "annotator"


def seeded_order(ids: list[str], seed: int, sample: int | None) -> list[str]:
    """The pairs a session shows, in order: a seeded shuffle, cut to the first ``sample``."""
    order = list(ids)
    random.Random(seed).shuffle(order)
    return order[:sample] if sample else order


def chosen_first(pair_id: str, seed: int) -> bool:
    """Whether the row's `chosen` is shown on the left: a coin keyed on (seed, pair id)."""
    return random.Random(f"cai-review:{seed}:{pair_id}").random() < 0.5


def p_from_answer(answer: str, shown: list[str]) -> float | None:
    """The answer as P(row's chosen is better): 1, 0 or 0.5; None for a skip."""
    if answer == "tie":
        return 0.5
    if answer in ("first", "second"):
        picked = shown[0] if answer == "first" else shown[1]
        return 1.0 if picked == "chosen" else 0.0
    return None


class ReviewSession:
    """The labelling state of one annotator over one seeded sample; all file writes go through here."""

    def __init__(self, cfg: ReviewConfig, writer: RowWriter):
        self.cfg = cfg
        self.annotator = check_annotator(cfg.annotator or default_annotator())
        stats: dict = {}
        rows = read_pairs(cfg.pairs, skip_bad=True, stats=stats)
        self.read_stats = stats
        self.rows = {r["id"]: r for r in rows}
        self.order = seeded_order(list(self.rows), cfg.seed, cfg.sample)
        self.position = {pid: i for i, pid in enumerate(self.order)}
        self.shown = {
            pid: ["chosen", "rejected"] if chosen_first(pid, cfg.seed) else ["rejected", "chosen"]
            for pid in self.order
        }
        self.writer = writer
        self.meta = {
            "tool": "cai review",
            "pairs": {"path": str(cfg.pairs), "sha256": file_sha256(cfg.pairs)},
            "seed": cfg.seed,
            "sample": cfg.sample,
            "version": __version__,
        }
        self.lock = threading.RLock()  # one request at a time reads or changes the state
        self.latest: dict[str, dict] = {}  # pair id -> latest label row by this annotator
        self.answered: list[str] = []  # pair ids with a kept answer, in the order answered (undo pops)
        self._resume()

    # -- state -----------------------------------------------------------------------------

    def _resume(self):
        if not self.writer.path.exists():
            return
        for row in read_rows(self.writer.path):
            lab = row.get("label") or {}
            if lab.get("annotator") != self.annotator or "revision" not in lab:
                continue
            self._apply(str(row.get("pair_id") or row.get("id")), lab)

    def _apply(self, pid: str, label: dict):
        self.latest[pid] = label
        if pid in self.answered:
            self.answered.remove(pid)
        if label.get("answer") != "undo":
            self.answered.append(pid)

    def done(self) -> int:
        kept = set(self.answered)
        return sum(1 for pid in self.order if pid in kept)

    def current(self) -> str | None:
        kept = set(self.answered)
        return next((pid for pid in self.order if pid not in kept), None)

    def last_answered(self) -> str | None:
        in_sample = [pid for pid in self.answered if pid in self.position]
        return in_sample[-1] if in_sample else None

    def view(self) -> dict:
        """What the page may know now: the current pair, blind (no label, judge or trace)."""
        with self.lock:
            return self._view()

    def _view(self) -> dict:
        pid = self.current()
        last = self.last_answered()
        out = {
            "annotator": self.annotator,
            "total": len(self.order),
            "done": self.done(),
            "out": str(self.writer.path),
            "reveal": self.cfg.reveal,
            "pair": None,
            "last": None,
        }
        if pid is not None:
            row, shown = self.rows[pid], self.shown[pid]
            out["pair"] = {
                "id": pid,
                "position": self.position[pid] + 1,
                "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
                "responses": [response_text(row[side]) for side in shown],
            }
        if last is not None:
            out["last"] = {
                "id": last,
                "position": self.position[last] + 1,
                "answer": self.latest[last].get("answer"),
            }
        return out

    # -- actions ---------------------------------------------------------------------------

    def _write(self, pid: str, answer: str, note: str = "") -> dict:
        prev = self.latest.get(pid)
        shown = self.shown[pid]
        label = {
            "p_chosen": p_from_answer(answer, shown),
            "source": "human",
            "answer": answer,
            "revision": (prev["revision"] + 1) if prev else 0,
            "annotator": self.annotator,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "shown": shown,
            "position": self.position[pid],
        }
        if note:
            label["note"] = note
        src = self.rows[pid]
        row = {
            "id": f"{pid}@{self.annotator}",
            "pair_id": pid,
            "prompt": src["prompt"],
            "chosen": src["chosen"],
            "rejected": src["rejected"],
            "label": label,
            "meta": self.meta,
        }
        self.writer.write(row)
        self.writer.sync()  # on disk before the page moves on
        self._apply(pid, label)
        return label

    def answer(self, pid: str, answer: str, note: str = "") -> dict:
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {sorted(ANSWERS)}")
        with self.lock:
            if pid != self.current():
                raise LookupError("that pair is not the current one (answered already?); reload")
            self._write(pid, answer, note[:MAX_NOTE])
            return self.view()

    def undo(self) -> dict:
        with self.lock:
            pid = self.last_answered()
            if pid is None:
                raise LookupError("nothing to undo")
            self._write(pid, "undo")
            return self.view()

    def reveal(self, pid: str) -> dict:
        """The AI label and trace of a pair this annotator has answered (never before)."""
        with self.lock:
            if not self.cfg.reveal:
                raise PermissionError("reveal is off for this session (--no-reveal)")
            if pid not in self.position or pid not in self.answered:
                raise PermissionError("answer the pair first")
            row, shown, mine = self.rows[pid], self.shown[pid], self.latest[pid]
        lab = row.get("label") or {}
        judge = lab.get("judge") or {}
        p = lab.get("p_chosen")
        p_first = None if p is None else (float(p) if shown[0] == "chosen" else 1.0 - float(p))
        trace = row.get("trace") or {}
        steps = [
            {
                "principle": str(r.get("principle", "")),
                "critique": str(r.get("critique", "")),
                "revision": str(r.get("revision", "")),
            }
            for r in trace.get("rounds") or []
            if isinstance(r, dict)
        ]
        return {
            "id": pid,
            "your_answer": mine.get("answer"),
            "label_source": str(lab.get("source", "unknown")),
            "p_first": p_first,
            "principles": [str(x) for x in judge.get("principles") or []],
            "method": str(judge.get("method", "")),
            "model": str((row.get("meta") or {}).get("model", "")),
            "initial_is": _initial_side(row, shown) if steps else None,
            "rounds": steps,
        }


def _initial_side(row: dict, shown: list[str]) -> str | None:
    """'first' / 'second': where the model's initial answer (trace.initial) was shown, if it is one of
    the two."""
    initial = str((row.get("trace") or {}).get("initial", "")).strip()
    for i, side in enumerate(shown):
        if initial and response_text(row[side]).strip() == initial:
            return ("first", "second")[i]
    return None


# ============================================================================ HTTP


class _Handler(BaseHTTPRequestHandler):
    server_version = "cai-review"
    sys_version = ""
    session: ReviewSession
    token: str
    timeout = TIMEOUT  # StreamRequestHandler: the socket's timeout, so no read waits for ever

    def log_message(self, fmt, *args):  # quiet: the terminal shows one URL, not a request log
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:  # a whole request head arrived: no longer an idle connection the server may drop
            self.server.busy(self.connection)
        return ok

    def _send(self, status: int, body: bytes, ctype: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _forbidden(self, why: str) -> bool:
        self._send(HTTPStatus.FORBIDDEN, f"403: {why}\n".encode(), "text/plain; charset=utf-8")
        return False

    def _authorised(self) -> bool:
        """Three walls, each enough on its own to refuse: the Host is this server's loopback name
        (a page on another site that re-points its DNS name at 127.0.0.1 sends its own name), an
        Origin, when sent, is this server's, and the request carries the token."""
        hosts = self.server.allowed_hosts
        if (self.headers.get("Host") or "").strip().lower() not in hosts:
            return self._forbidden(
                "the Host header must name this server (127.0.0.1, localhost or [::1] with its port); "
                "open the URL cai review printed"
            )
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() not in {f"http://{h}" for h in hosts}:
            return self._forbidden("requests from another origin are refused")
        url = urlsplit(self.path)
        given = self.headers.get("X-Cai-Token") or (parse_qs(url.query).get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._forbidden("missing or wrong token; open the URL cai review printed")
        return True

    def do_GET(self):
        if not self._authorised():
            return
        path = urlsplit(self.path).path
        if path == "/":
            page = (STATIC / "review.html").read_text(encoding="utf-8").replace("{{token}}", self.token)
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
        elif path in ASSETS:
            name, ctype = ASSETS[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype + "; charset=utf-8")
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.session.view())
        elif path == "/api/reveal":
            pid = (parse_qs(urlsplit(self.path).query).get("id") or [""])[0]
            try:
                self._json(HTTPStatus.OK, self.session.reveal(pid))
            except PermissionError as e:
                self._json(HTTPStatus.FORBIDDEN, {"error": str(e)})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    do_HEAD = do_GET

    def _body(self) -> dict:
        """The request's JSON object: a Content-Length of 0..MAX_BODY bytes (no chunked bodies,
        no negative or non-numeric lengths, which would read until the client closes)."""
        if self.headers.get("Transfer-Encoding"):
            raise ValueError("send the body with a Content-Length, not a Transfer-Encoding")
        length = (self.headers.get("Content-Length") or "0").strip()
        if not length.isdigit() or not length.isascii():
            raise ValueError("Content-Length must be a whole number of bytes")
        n = int(length)
        if n > MAX_BODY or "application/json" not in (self.headers.get("Content-Type") or ""):
            raise ValueError("send a small application/json body")
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except RecursionError:
            raise ValueError("the body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    def do_POST(self):
        if not self._authorised():
            return
        path = urlsplit(self.path).path
        try:
            body = self._body()
            if path == "/api/answer":
                view = self.session.answer(
                    str(body.get("id", "")), str(body.get("answer", "")), str(body.get("note") or "")
                )
            elif path == "/api/undo":
                view = self.session.undo()
            else:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except LookupError as e:
            return self._json(HTTPStatus.CONFLICT, {"error": str(e), "state": self.session.view()})
        except (OSError, CaiError) as e:  # the disk refused the row: it is not saved, and never will be
            return self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"could not save the answer, so it is not saved: {e}; answer again"},
            )
        self._json(HTTPStatus.OK, view)


class _Server(ThreadingHTTPServer):
    """The standard library's threading server with bounds: at most ``max_connections`` open at
    once. A connection that has not sent a whole request head yet is idle; when the bound is
    reached the longest-idle one is dropped to make room, so idle connections (no token needed
    to open one) never starve real requests. With none to drop, the new one gets 503 at once."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections: int):
        self.max_connections = max_connections
        self._conns: dict[socket.socket, float | None] = {}  # socket -> idle since (None: busy)
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def busy(self, conn):
        with self._conns_lock:
            if conn in self._conns:
                self._conns[conn] = None

    def _drop(self, conn):
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # its handler's read returns at once; the thread ends

    def process_request(self, request, client_address):
        with self._conns_lock:
            if len(self._conns) >= self.max_connections:
                idle = [(t, c) for c, t in self._conns.items() if t is not None]
                if idle:
                    victim = min(idle, key=lambda x: x[0])[1]
                    del self._conns[victim]
                    self._drop(victim)
            full = len(self._conns) >= self.max_connections
            if not full:
                self._conns[request] = time.monotonic()
        if full:
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.pop(request, None)

    def handle_error(self, request, client_address):
        """A client that went away (reset, broken pipe, timeout) is nothing to report; anything
        else is one line on stderr, not a traceback in the person's terminal."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            print(f"cai review: a request failed ({type(exc).__name__}: {exc})", file=sys.stderr)

    def drop_all(self):
        with self._conns_lock:
            conns, self._conns = list(self._conns), {}
        for c in conns:
            self._drop(c)


class ReviewServer:
    """The session plus its HTTP server; ``url`` carries the token."""

    def __init__(
        self,
        session: ReviewSession,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        timeout: float = TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.token = token or secrets.token_urlsafe(18)
        handler = type("Handler", (_Handler,), {"session": session, "token": self.token, "timeout": timeout})
        try:
            self.httpd = _Server((host, port), handler, max_connections)
        except (OSError, OverflowError) as e:
            why = getattr(e, "strerror", None) or "not a port number"
            raise InputError(f"cannot listen on {host}:{port} ({why}); pass another --port") from None
        self.session = session
        h, p = self.httpd.server_address[:2]
        self.url = f"http://{h}:{p}/?token={self.token}"
        # the names a browser may send as Host for this server (a second wall behind the token)
        names = list(LOOPBACK) + ([] if host in ("127.0.0.1", "localhost", "::1") else [host])
        self.httpd.allowed_hosts = {f"{n}:{p}" for n in names} | (set(names) if p == 80 else set())
        self._thread: threading.Thread | None = None

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.drop_all()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_review(cfg: ReviewConfig, ready=None) -> dict:
    """Serve the page until Ctrl-C (or until ``ready(server)`` returns, for tests); return a summary."""
    check_config(cfg)
    check_annotator(cfg.annotator or default_annotator())
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"cai review: warning: listening on {cfg.host}; "
            "anyone who can reach it and has the token can label",
            file=sys.stderr,
        )
    with claim_output(cfg.out, inputs=[cfg.pairs]):
        with RowWriter(cfg.out) as writer:
            session = ReviewSession(cfg, writer)
            server = ReviewServer(session, cfg.host, cfg.port).start()
            skipped = len(session.read_stats.get("skipped", []))
            note = f"; {skipped} malformed rows left out" if skipped else ""
            print(
                f"cai review: {session.done()}/{len(session.order)} pairs answered "
                f"by {session.annotator}{note}",
                file=sys.stderr,
            )
            print(
                f"cai review: {server.url}  (Ctrl-C to stop; answers are saved as you go)",
                file=sys.stderr,
                flush=True,
            )
            try:
                if ready is not None:
                    ready(server)
                else:
                    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
                    # Short sleeps: Python runs signal handlers in the main thread, and a signal
                    # the kernel hands to a request thread does not cut a long sleep short.
                    while True:
                        time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            finally:
                server.close()
            return {
                "done": session.done(),
                "total": len(session.order),
                "out": str(cfg.out),
                "annotator": session.annotator,
            }
