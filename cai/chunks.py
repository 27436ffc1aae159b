"""Chunks side by side: the stages' checkpoint loop, with several chunks in flight on a server.

A stage (generate, label) cuts its work into chunks; each chunk runs stage by stage (every
request of a stage sent together) and its rows are written, fsynced, when it is done. With one
chunk at a time, every stage ends in a tail where the last few requests run and the rest of the
server's slots wait. On the server path two chunks run at once, so one chunk's tail is filled
with the other's requests (the backend's own semaphore keeps the requests in flight at
``--concurrency`` whatever the overlap). Rows then reach the file in order of completion, one
chunk at a time and each id once (the writer is only called from the calling thread); resume
by id does not care about the order.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait


def chunks_in_flight(backend) -> int:
    """How many chunks a stage runs at once on ``backend``: 2 for a server client (a backend with
    ``concurrency``, the langchain backend), 1 for an engine in this process (its own batching
    already fills its slots, and its prefix cache works best one chunk at a time)."""
    return 2 if (getattr(backend, "concurrency", 0) or 0) > 1 else 1


def run_chunks(chunks: list, work, done, *, workers: int = 1, stop=None, cancel=None) -> int:
    """``work(chunk)`` for every chunk, ``workers`` at once; ``done(chunk, result)`` in this
    thread, in order of completion. ``stop()`` true: no new chunk starts, the ones in flight
    finish (a first Ctrl-C). On an error (or a second Ctrl-C) no new chunk starts, ``cancel()``
    tells the backend to drop what is in flight, and the error is raised; a chunk that was not
    done is not written. Returns the chunks done."""
    n = 0
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            done(chunk, work(chunk))
            n += 1
            if stop is not None and stop():
                break
        return n
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cai-chunk")
    todo = iter(chunks)
    running: dict = {}
    try:
        for chunk in todo:
            running[pool.submit(work, chunk)] = chunk
            if len(running) >= workers:
                break
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                chunk = running.pop(f)
                done(chunk, f.result())  # raises the chunk's error
                n += 1
            if stop is None or not stop():
                for chunk in todo:
                    running[pool.submit(work, chunk)] = chunk
                    if len(running) >= workers:
                        break
    except BaseException:
        if cancel is not None:
            cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return n
