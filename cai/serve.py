"""`cai serve`: llama.cpp's own C++ server for a GGUF file, on a loopback (or given) address.

The same engine and settings as the in-process llamacpp backend (``--batch-size`` slots with
continuous batching, the prompt cache, the Q8_0 copy of a Q4_1 file), served over llama.cpp's
OpenAI-compatible HTTP API, so ``--backend langchain --base-url http://HOST:PORT/v1`` (or any
OpenAI client) can use it. Blocks until SIGINT/SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading


def serve(
    model: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    parallel: int = 4,
    threads: int | None = None,
    ctx_per_seq: int = 2048,
    alias: str | None = None,
    weights: str = "auto",
    ready=None,
) -> None:
    """Serve ``model`` until a signal arrives. ``ready(url)`` is called once it answers."""
    from cai.backends.llamacpp import (
        _cores,
        _file_type,
        _metadata,
        import_xllamacpp,
        resolve_gguf,
        server_params,
        weights_to_run,
    )

    xl = import_xllamacpp()
    path, model_id = resolve_gguf(model)
    meta = _metadata(path)
    run_path, _ = weights_to_run(path, _file_type(meta.get("general.file_type")), weights)
    p = server_params(xl, run_path, parallel=parallel, ctx_per_seq=ctx_per_seq, threads=threads or _cores())
    p.hostnames = [host]
    p.port = int(port)
    p.model_alias = {alias or model_id}
    p.n_threads_http = max(4, parallel + 2)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = xl.Server(p)  # listens from here on
    url = server.listening_address
    if ready is not None:
        ready(url)
    while not stop.wait(0.5):
        pass
    del server


def main(argv=None) -> int:
    """``python -m cai.serve MODEL --port N ...`` (the tests' and fleet's server processes)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cai.serve")
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx-per-seq", type=int, default=2048)
    ap.add_argument("--alias", default=None)
    ap.add_argument("--weights", default="auto", choices=("auto", "as-is"))
    a = ap.parse_args(argv)
    serve(
        a.model,
        host=a.host,
        port=a.port,
        parallel=a.parallel,
        threads=a.threads,
        ctx_per_seq=a.ctx_per_seq,
        alias=a.alias,
        weights=a.weights,
        ready=lambda url: print(f"serving on {url}/v1", file=sys.stderr, flush=True),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
