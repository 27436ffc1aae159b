"""`cai serve`: a local fleet — N llama.cpp servers for one GGUF file behind nginx.

Each replica is its own process (``python -m cai.serve``: llama.cpp's C++ server with parallel
slots and continuous batching) on a loopback port; nginx (Debian's, found on PATH) listens on
one port in front of them and spreads requests with ``least_conn``, the policy llm-swarm puts in
front of TGI/vLLM replicas: generation lengths vary, so the replica with the fewest open
requests is the least busy one. A request a replica drops (it died, answered 502/503/504, or
stalled past ``read_timeout``) goes to the next replica (``proxy_next_upstream``, also for POST:
a chat completion has no side effect, so sending it twice is safe), and the replica is left out
for ``fail_timeout`` seconds. Only when no replica answers does the client see an error.

The nginx configuration is generated (``nginx_conf``) and runs as an unprivileged foreground
process: its own prefix folder for pid, logs and temp paths, ``daemon off``, loopback only
unless told otherwise. Every response carries ``X-Cai-Replicas`` (the replica count), which the
langchain backend multiplies with a replica's ``/props`` ``total_slots`` to size its default
``--concurrency``. The tests (tests/test_fleet.py) and bench/bench_fleet.py start their fleets
with these classes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cai.errors import CaiError, InputError

NGINX_HINT = "install nginx (Debian/Ubuntu: apt-get install nginx; `make install` does it as root)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class Replica:
    """One ``python -m cai.serve`` process on a loopback port. ``start()`` may be called again
    after ``kill()``: it reuses the port, so a load balancer's (or client's) address stays valid."""

    def __init__(
        self,
        model: str | None = None,
        *,
        port: int | None = None,
        threads: int = 1,
        parallel: int = 4,
        ctx_per_seq: int = 2048,
        alias: str | None = None,
        log_dir: Path | str | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.args = [
            *([str(model)] if model else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--parallel",
            str(parallel),
            "--ctx-per-seq",
            str(ctx_per_seq),
            "--threads",
            str(threads),
            *(["--alias", alias] if alias else []),
        ]
        self.log = Path(log_dir or os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> Replica:
        """Start the process; ``wait()`` for it to answer."""
        with open(self.log, "ab") as log:
            # passive OpenMP waits: see cai/backends/llamacpp.py (spinning threads starve on a shared CPU)
            env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive"))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cai.serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches `cai serve`, which stops us
            )
        return self

    def wait(self, timeout: float = 120.0) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise CaiError(f"llama.cpp server on port {self.port} exited ({code}): {self.log_tail()}")
            if _answers(self.url + "/models"):
                return self
            time.sleep(0.2)
        self.kill()
        raise CaiError(
            f"llama.cpp server on port {self.port} did not answer in {timeout:.0f} s: {self.log_tail()}"
        )

    def start(self, timeout: float = 120.0) -> Replica:
        return self.launch().wait(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a crashed or OOM-killed server goes."""
        if self.alive:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self):
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_conf(
    upstreams: list[str],
    *,
    port: int,
    prefix: Path | str,
    host: str = "127.0.0.1",
    read_timeout: float = 600,
    connect_timeout: float = 2,
    fail_timeout: float = 5,
) -> str:
    """nginx.conf for ``upstreams`` ("host:port" each) behind ``host:port``: least_conn, the next
    replica on errors, timeouts and 502/503/504 (POST included), everything under ``prefix``."""
    prefix = Path(prefix)
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout={fail_timeout:g}s;" for u in upstreams)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# generated by cai (cai/fleet.py): {len(upstreams)} llama.cpp replicas behind one port
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    # one request a line; a request nginx moved on names every replica it tried ("a:1, b:2")
    log_format fleet '$time_iso8601|$request_method|$uri|$status|'
                     '$upstream_addr|$upstream_status|$request_time';
    access_log {prefix / "access.log"} fleet;
{temp}
    # request and response bodies stay in memory (no temp files for the worker to write)
    client_max_body_size 64m;
    client_body_buffer_size 64m;
    proxy_max_temp_file_size 0;
    proxy_buffers 64 64k;
    upstream cai_fleet {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://cai_fleet;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # a chat completion has no side effect: a request a replica dropped may go to the next
            proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
            proxy_connect_timeout {connect_timeout:g}s;
            proxy_read_timeout {read_timeout:g}s;
            proxy_send_timeout {read_timeout:g}s;
            add_header X-Cai-Replicas {len(upstreams)} always;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground on ``nginx_conf``'s configuration, in its own prefix folder."""

    def __init__(self, upstreams: list[str], *, prefix: Path | str, port: int | None = None, **conf):
        self.binary = nginx_binary()
        if self.binary is None:
            raise InputError(f"nginx is not installed: {NGINX_HINT}")
        self.prefix = Path(prefix)
        self.port = port or free_port()
        self.host = conf.get("host", "127.0.0.1")
        self.url = f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}/v1"
        self.conf_path = self.prefix / "nginx.conf"
        self.conf = nginx_conf(upstreams, port=self.port, prefix=self.prefix, **conf)
        self.proc: subprocess.Popen | None = None

    def check_port(self):
        """A port another process holds is refused up front (it would answer our readiness check)."""
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError:
                raise InputError(f"port {self.port} on {self.host} is in use: pick another --port") from None

    def start(self, timeout: float = 20.0) -> Nginx:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self.check_port()
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.conf)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-p",
                str(self.prefix),
                "-c",
                str(self.conf_path),
                "-e",
                str(self.prefix / "error.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() or self.error_log()
                raise CaiError(f"nginx ({self.conf_path}) exited: {err[-800:]}")
            if self._ours(host):
                return self
            time.sleep(0.1)
        self.stop()
        raise CaiError(f"nginx ({self.conf_path}) did not listen on port {self.port} in {timeout:.0f} s")

    def _ours(self, host: str) -> bool:
        """Whether this nginx answers on the port: every answer of its config names the replicas."""
        try:
            with urllib.request.urlopen(f"http://{host}:{self.port}/health", timeout=2) as r:
                return r.headers.get("X-Cai-Replicas") is not None
        except urllib.error.HTTPError as e:  # a replica's 404/503 through nginx is still nginx
            return e.headers.get("X-Cai-Replicas") is not None
        except OSError:
            return False

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def access_log(self) -> list[list[str]]:
        """The fleet log's rows: time, method, uri, status, upstream addresses, upstream statuses, seconds."""
        try:
            lines = (self.prefix / "access.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line.split("|") for line in lines if line.strip()]

    def stop(self):
        """SIGQUIT: nginx's graceful stop (requests in flight finish); SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the master and its worker
            self.proc.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Fleet:
    """``replicas`` Replica processes for one GGUF file plus nginx in front of them.

    ``Fleet(...).start()`` starts the replicas side by side (each loads the model on its own),
    then nginx; ``url`` is the ``--base-url`` to use; ``stop()`` stops nginx, then the replicas."""

    def __init__(
        self,
        model: str | None = None,
        *,
        replicas: int = 2,
        port: int | None = None,
        host: str = "127.0.0.1",
        threads: int = 1,
        parallel: int = 4,
        ctx_per_seq: int = 2048,
        alias: str | None = None,
        prefix: Path | str,
        read_timeout: float = 600,
        fail_timeout: float = 5,
    ):
        self.prefix = Path(prefix)
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.replicas = [
            Replica(
                model,
                threads=threads,
                parallel=parallel,
                ctx_per_seq=ctx_per_seq,
                alias=alias,
                log_dir=self.prefix,
            )
            for _ in range(max(1, int(replicas)))
        ]
        self.nginx = Nginx(
            [f"127.0.0.1:{r.port}" for r in self.replicas],
            prefix=self.prefix,
            port=port,
            host=host,
            read_timeout=read_timeout,
            fail_timeout=fail_timeout,
        )
        self.url = self.nginx.url

    def start(self, timeout: float = 180.0) -> Fleet:
        self.nginx.check_port()  # before minutes of model loading
        try:
            for r in self.replicas:
                r.launch()
            for r in self.replicas:
                r.wait(timeout)
            self.nginx.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        self.nginx.stop()
        for r in self.replicas:
            r.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_fleet(cfg, *, out=print, log=None) -> int:
    """``cai serve``: start the fleet ``cfg`` (a ServeConfig) describes, print the options that
    point cai at it, restart a replica that exits, and stop everything on SIGINT/SIGTERM.
    Returns the replicas restarted while serving."""
    import tempfile

    from cai.backends.gguf_weights import resolve_gguf
    from cai.backends.llamacpp import _cores

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _, model_id = resolve_gguf(cfg.model)  # a missing or non-GGUF file: one line, before anything starts
    alias = cfg.alias or Path(model_id).stem
    if nginx_binary() is None:
        raise InputError(
            f"cai serve puts nginx in front of its replicas, and nginx is not installed: {NGINX_HINT}"
        )
    threads = cfg.threads or max(1, _cores() // cfg.replicas)
    own_dir = cfg.dir is None
    prefix = Path(tempfile.mkdtemp(prefix="cai-serve-")) if own_dir else Path(cfg.dir)
    fleet = Fleet(
        cfg.model,
        replicas=cfg.replicas,
        port=cfg.port,
        host=cfg.host,
        threads=threads,
        parallel=cfg.parallel,
        ctx_per_seq=cfg.ctx_per_seq,
        alias=alias,
        prefix=prefix,
        read_timeout=cfg.read_timeout,
    )
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    restarts = 0
    try:
        log(
            f"cai serve: starting {cfg.replicas} llama.cpp replica(s) of {model_id} ({cfg.parallel} slots, "
            f"{threads} thread(s) each) behind nginx on {fleet.url} (logs: {prefix})"
        )
        fleet.start()
        out(f"--backend langchain --base-url {fleet.url} --model {alias}")
        log("cai serve: ready; Ctrl-C stops the fleet")
        while not stop["now"]:
            time.sleep(0.5)
            for r in fleet.replicas:
                if not r.alive and not stop["now"]:
                    log(
                        f"cai serve: the replica on port {r.port} exited ({r.proc.returncode}); restarting it"
                    )
                    restarts += 1
                    r.launch()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        fleet.stop()
        if own_dir:
            shutil.rmtree(prefix, ignore_errors=True)
        log(f"cai serve: stopped nginx and {cfg.replicas} replica(s)")
    return restarts
