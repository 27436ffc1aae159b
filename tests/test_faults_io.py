"""Fault injection for files, disks and processes: the guards follow files, not names; a full
disk; inputs that are not regular files; sizes and line numbers where inputs are read.

Cases are grouped by the class of defect they guard against (docs/architecture.md, "Invariants"):

  identity    the one-writer lock and the output-is-input guard key on the file (st_dev, st_ino):
              a symlink or a hard link to a running run's output is refused
  rows        a whole last row without its newline is a row; only an unparseable tail is torn,
              and what is cut is kept aside, never lost
  disk        no space left on the device: one line, exit 2, nothing half-made left behind, and a
              row is either written and acknowledged or never written
  regular     a FIFO (or any non-regular file) as an input or an output: one line, no hang
  size        an oversized prompt, row or constitution file is named where it is read
  lines       invalid UTF-8 is reported at the file's real line

The full-disk cases mount a real 1 MiB tmpfs (root only; skipped elsewhere); the one case that
makes fsync fail replaces os.fsync, because no real file system can be made to fail it on cue.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HARMLESS, ROOT
from test_faults import _pair, _write_rows, assert_clean_failure, tiny_rm  # noqa: F401 (a fixture)

from cai.cli import cli
from cai.errors import InputError, OutputError
from cai.guard import check_output, claim_output
from cai.records import read_pairs, read_rows
from cai.rowwriter import RowWriter

# ----------------------------------------------------------------------------- helpers


def _gen(prompts, out, model, *extra) -> list[str]:
    return [
        "generate",
        "--constitution",
        str(HARMLESS),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        str(model),
        "--rounds",
        "1",
        "--max-new-tokens",
        "2",
        "--no-label",
        *extra,
    ]


def _prompts(path: Path, n: int) -> Path:
    return _write_rows(path, [{"id": f"q{i}", "prompt": f"Tell me about {i}."} for i in range(n)])


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a half-written row was left"
    return [json.loads(x) for x in data.split(b"\n") if x.strip()]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- identity


def test_the_lock_follows_the_file_not_the_name(tmp_path):
    """In one process (a flock is per open file, so a second claim conflicts like a second run):
    a symlink to the output finds the same sidecar lock; a hard link made to the file the first
    run created is refused through the file's own lock; released, every name is free again."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = tmp_path / "a" / "out.jsonl"
    sym, hard = tmp_path / "b" / "sym.jsonl", tmp_path / "b" / "hard.jsonl"
    os.symlink(out, sym)  # dangling until the run creates the file
    with claim_output(out):
        with pytest.raises(InputError, match=f"in use by another cai run \\(pid {os.getpid()}\\)"):
            with claim_output(sym):
                pass
        with RowWriter(out) as w:
            w.write_many([{"id": "r1"}])  # created under the claim: the lock takes the file too
            os.link(out, hard)
            with pytest.raises(InputError, match="hard link"):
                with claim_output(hard):
                    pass
            with pytest.raises(InputError, match="in use"):
                with claim_output(sym):
                    pass
    for name in (hard, sym, out):  # released: each can be claimed again, nothing left behind
        with claim_output(name):
            pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "hard.jsonl", "out.jsonl", "sym.jsonl"]
    # the output-is-input guard keys on the same identity
    for alias in (sym, hard):
        with pytest.raises(InputError, match="is the input file"):
            check_output(alias, inputs=[out])


def test_a_second_generate_through_a_link_is_refused(tmp_path, tiny_model):
    """Real processes: while `cai generate` writes its output, runs writing through a hard link or
    a symlink to it are refused naming its pid; the first still writes every id exactly once."""
    prompts = _prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out.jsonl"
    base = [
        sys.executable,
        "-m",
        "cai",
        *_gen(prompts, out, tiny_model, "--batch-size", "2", "--chunk-size", "2"),
    ]
    base[base.index("--max-new-tokens") + 1] = "24"
    first = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 180
        while not out.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert out.exists() and first.poll() is None, "the first run never started writing"
        (tmp_path / "elsewhere").mkdir()
        hard, sym = tmp_path / "elsewhere" / "hard.jsonl", tmp_path / "elsewhere" / "sym.jsonl"
        os.link(out, hard)
        os.symlink(out, sym)
        for alias in (hard, sym):
            argv = [*base]
            argv[argv.index("--out") + 1] = str(alias)
            second = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    ids = [r["id"] for r in _lines(out)]
    assert len(ids) == len(set(ids)) == 30
    assert not list(tmp_path.rglob(".*.lock"))


def test_a_second_review_through_a_link_is_refused(tmp_path):
    from test_review import make_pairs

    pairs = make_pairs(tmp_path / "pairs.jsonl", 3)
    out = tmp_path / "human.jsonl"
    out.write_bytes(b"")  # an existing answers file: a hard link to it can be made
    argv = [sys.executable, "-m", "cai", "review", "--pairs", str(pairs), "--annotator", "a", "--out"]
    first = subprocess.Popen([*argv, str(out)], stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 60
        lock = tmp_path / ".human.jsonl.lock"
        while not (lock.exists() and lock.read_text()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        hard, sym = tmp_path / "hard.jsonl", tmp_path / "sym.jsonl"
        os.link(out, hard)
        os.symlink(out, sym)
        for alias in (hard, sym):
            second = subprocess.run(
                [*argv, str(alias)], capture_output=True, text=True, env=_env(), timeout=60
            )
            assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(30)


# ----------------------------------------------------------------------------- rows


def test_a_whole_last_row_without_its_newline_is_a_row(tmp_path):
    """A person's last answer written without its newline (an editor, a copy) is kept on resume,
    by the writer and by the review session, and the next answer goes on the next line."""
    from test_review import make_pairs

    from cai.review import ReviewConfig, ReviewSession

    pairs = make_pairs(tmp_path / "pairs.jsonl", 3)
    out = tmp_path / "human.jsonl"
    cfg = ReviewConfig(pairs=str(pairs), out=str(out), annotator="a")
    with RowWriter(out) as w:
        s = ReviewSession(cfg, w)
        s.answer(s.current(), "first")
        s.answer(s.current(), "second")
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    kept = out.read_bytes()
    with RowWriter(out) as w:
        assert len(w.done) == 2 and w.torn_path is None
        s = ReviewSession(cfg, w)
        assert s.done() == 2  # the last answer is still there
        s.answer(s.current(), "tie")
    data = out.read_bytes()
    assert data.startswith(kept) and [r["label"]["answer"] for r in _lines(out)] == ["first", "second", "tie"]
    assert not (tmp_path / "human.jsonl.torn").exists()
    assert len(read_pairs(out)) == 3


def test_a_torn_tail_is_kept_aside_never_lost(tmp_path):
    out = tmp_path / "rows.jsonl"
    whole = b'{"id": "a"}\n{"id": "b"}\n'
    out.write_bytes(whole + b'{"id": "c", "pro')
    with RowWriter(out) as w:
        assert w.done == {"a", "b"} and w.repaired_bytes == 16
        w.write_many([{"id": "c"}])
    assert out.read_bytes() == whole + b'{"id":"c"}\n'
    assert (tmp_path / "rows.jsonl.torn").read_bytes() == b'{"id": "c", "pro\n'
    out.write_bytes(out.read_bytes() + b"{broken")
    RowWriter(out)  # a second repair appends to the same sidecar
    assert (tmp_path / "rows.jsonl.torn").read_bytes() == b'{"id": "c", "pro\n{broken\n'


def test_overwrite_keeps_the_old_rows_until_new_ones_are_written(tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_bytes(b'{"id": "old"}\n')
    out.chmod(0o640)
    with RowWriter(out, overwrite=True) as w:
        assert out.read_bytes() == b'{"id": "old"}\n' and not w.done
        w.write_many([{"id": "n1"}])
        w.write_many([{"id": "n2"}])
    assert out.read_bytes() == b'{"id":"n1"}\n{"id":"n2"}\n' and (out.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_generate_resumes_after_a_last_row_without_its_newline(tmp_path, tiny_model):
    out = tmp_path / "out.jsonl"
    assert CliRunner().invoke(cli, _gen(_prompts(tmp_path / "p.jsonl", 2), out, tiny_model)).exit_code == 0
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    kept = out.read_bytes()
    res = CliRunner().invoke(cli, _gen(_prompts(tmp_path / "p.jsonl", 3), out, tiny_model))
    assert res.exit_code == 0 and "2 already there" in res.output, res.output
    assert out.read_bytes().startswith(kept + b"\n") and [r["id"] for r in _lines(out)] == ["q0", "q1", "q2"]


# ----------------------------------------------------------------------------- disk


class _Disk:
    """A real file system that runs out of space: a 1 MiB tmpfs, filled up to ``leave`` pages."""

    def __init__(self, root: Path):
        self.root, self.filler = root, root / ".filler"

    def fill(self, leave: int = 0):
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, (size // 4096 - leave) * 4096))
        os.close(fd)

    def free(self):
        self.filler.unlink(missing_ok=True)

    def contents(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p != self.filler)


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    root = tmp_path / "disk"
    root.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield _Disk(root)
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _no_space(res) -> str:
    errors = [x for x in res.output.splitlines() if x.startswith("Error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "no space left on the device" in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("leave", [0, 1], ids=["no-room-for-the-lock", "no-room-for-rows"])
def test_generate_on_a_full_disk(disk, tmp_path, tiny_model, leave):
    disk.fill(leave)
    out = disk.root / "sub" / "gen.jsonl"
    err = _no_space(CliRunner().invoke(cli, _gen(_prompts(tmp_path / "p.jsonl", 3), out, tiny_model)))
    assert str(disk.root) in err
    assert disk.contents() == []  # no empty lock, no empty output, not even the folder it made


def test_overwrite_on_a_full_disk_keeps_the_old_file(disk, tmp_path, tiny_model):
    """--overwrite empties a file only when the first new row is written: its replacement is
    written beside it and renamed over it once the rows are on disk."""
    out = disk.root / "gen.jsonl"
    out.write_bytes(b'{"id": "old"}\n')
    disk.fill(leave=1)  # the lock's page only
    _no_space(
        CliRunner().invoke(cli, _gen(_prompts(tmp_path / "p.jsonl", 2), out, tiny_model, "--overwrite"))
    )
    assert out.read_bytes() == b'{"id": "old"}\n' and disk.contents() == ["gen.jsonl"]
    disk.free()
    res = CliRunner().invoke(cli, _gen(_prompts(tmp_path / "p.jsonl", 2), out, tiny_model, "--overwrite"))
    assert res.exit_code == 0 and [r["id"] for r in _lines(out)] == ["q0", "q1"], res.output


def test_generate_runs_out_of_space_mid_run_then_resumes(disk, tmp_path, tiny_model):
    prompts = _prompts(tmp_path / "p.jsonl", 12)
    out = disk.root / "gen.jsonl"
    disk.fill(leave=2)  # the lock's page and one page of rows
    _no_space(CliRunner().invoke(cli, _gen(prompts, out, tiny_model, "--chunk-size", "1")))
    first = _lines(out) if out.exists() else []  # whole rows only, the failed one rolled back
    assert 1 <= len(first) < 12 and disk.contents() == ["gen.jsonl"]
    disk.free()
    res = CliRunner().invoke(cli, _gen(prompts, out, tiny_model, "--chunk-size", "1"))
    assert res.exit_code == 0, res.output
    ids = [r["id"] for r in _lines(out)]
    assert ids[: len(first)] == [r["id"] for r in first] and sorted(ids) == sorted(
        {f"q{i}" for i in range(12)}
    )


@pytest.mark.parametrize("leave", [0, 1], ids=["no-room-for-the-lock", "room-for-the-lock-only"])
@pytest.mark.parametrize("cmd", ["score", "eval"])
def test_score_and_eval_on_a_full_disk(disk, tmp_path, tiny_rm, cmd, leave):  # noqa: F811 (a fixture)
    pairs = _write_rows(tmp_path / "pairs.jsonl", [_pair(i) for i in range(4)])
    disk.fill(leave)
    argv = [cmd, "--rm", str(tiny_rm), "--pairs", str(pairs)]
    argv += (
        ["--out", str(disk.root / "scores.jsonl")] if cmd == "score" else ["--out", str(disk.root / "report")]
    )
    argv += ["--bootstrap", "100", "--no-probes"] if cmd == "eval" else []
    _no_space(CliRunner().invoke(cli, argv))
    assert disk.contents() == []  # no temp file, no lock, no empty report folder


def test_review_answers_on_a_full_disk_are_saved_or_refused_never_later(disk, tmp_path):
    """An answer the page is told failed (500) is never written afterwards; one it is told was
    saved is on disk."""
    from test_review import _get, make_pairs

    from cai.review import ReviewConfig, ReviewServer, ReviewSession

    pairs = make_pairs(tmp_path / "pairs.jsonl", 4)
    long = [json.loads(x) for x in pairs.read_text().splitlines()]
    for r in long:  # each answer row (it copies the pair) needs a page of its own
        r["prompt"][0]["content"] += " Some context." * 400
    _write_rows(pairs, long)
    out = disk.root / "human.jsonl"
    writer = RowWriter(out)
    srv = ReviewServer(
        ReviewSession(ReviewConfig(pairs=str(pairs), out=str(out), annotator="a"), writer)
    ).start()
    base, tok = srv.url.split("?")[0], srv.token
    try:
        acknowledged = []
        for answer in ("first", "second"):
            pid = json.loads(_get(base + "api/state", tok)[1])["pair"]["id"]
            disk.fill(leave=0)
            status, body = _get(base + "api/answer", tok, {"id": pid, "answer": "tie"})
            assert status == 500 and b"not saved" in body
            disk.free()
            assert json.loads(_get(base + "api/state", tok)[1])["pair"]["id"] == pid  # still to answer
            assert (
                [r["label"]["answer"] for r in _lines(out)] == acknowledged
                if out.exists()
                else not acknowledged
            )
            assert _get(base + "api/answer", tok, {"id": pid, "answer": answer})[0] == 200
            acknowledged.append(answer)
        assert [r["label"]["answer"] for r in _lines(out)] == acknowledged  # no "tie", ever
    finally:
        srv.close()
        writer.close()


def test_a_failed_fsync_rolls_the_rows_back(tmp_path, monkeypatch):
    """fsync can fail after write succeeded (delayed allocation on a full disk); simulated by
    replacing os.fsync once, the only way to make it fail on cue. The rows are cut back off, the
    writer says so, and the next rows are written as if they had never been there."""
    out = tmp_path / "rows.jsonl"
    with RowWriter(out) as w:
        w.write_many([{"id": "a"}])
        real = os.fsync

        def fail_once(fd):
            monkeypatch.setattr(os, "fsync", real)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fail_once)
        with pytest.raises(OutputError, match="no space left"):
            w.write_many([{"id": "b"}, {"id": "c"}])
        assert w.done == {"a"} and out.read_bytes() == b'{"id":"a"}\n'
        w.write_many([{"id": "d"}])
    assert [r["id"] for r in _lines(out)] == ["a", "d"]


# ----------------------------------------------------------------------------- regular


def _invoke_watched(argv, fifos, timeout=60):
    """CliRunner in a thread: a reader blocked on a FIFO is released (its writer end opened and
    closed) and the test fails, instead of the suite hanging."""
    box = {}
    t = threading.Thread(
        target=lambda: box.setdefault("res", CliRunner().invoke(cli, [str(a) for a in argv]))
    )
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader on this one
                pass
        t.join(30)
        pytest.fail(f"hung reading a FIFO: {argv}")
    return box["res"]


def _constitution_with_fifo(tmp_path, rel: str) -> Path:
    d = tmp_path / "const"
    shutil.copytree(HARMLESS, d)
    (d / rel).unlink(missing_ok=True)
    os.mkfifo(d / rel)
    return d


@pytest.mark.parametrize(
    "case",
    [
        "generate --prompts",
        "label --pairs",
        "score --pairs",
        "train --pairs",
        "review --pairs",
        "constitution.toml",
        "a principle",
        "generate --out",
        "score --out /dev/null",
    ],
)
def test_an_input_or_output_that_is_not_a_regular_file(case, tmp_path, tiny_model, tiny_rm):  # noqa: F811
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    pairs = _write_rows(tmp_path / "pairs.jsonl", [_pair(i) for i in range(3)])
    prompts = _prompts(tmp_path / "prompts.jsonl", 2)
    const, fifos = HARMLESS, [fifo]
    if case == "constitution.toml":
        const = _constitution_with_fifo(tmp_path, "constitution.toml")
        fifos = [const / "constitution.toml"]
    elif case == "a principle":
        const = _constitution_with_fifo(tmp_path, "principles/zz-fifo.txt")
        fifos = [const / "principles/zz-fifo.txt"]
    argv = {
        "generate --prompts": _gen(fifo, tmp_path / "o.jsonl", tiny_model),
        "label --pairs": ["label", "--pairs", fifo, "--constitution", const, "--out", tmp_path / "o.jsonl"],
        "score --pairs": ["score", "--rm", tiny_rm, "--pairs", fifo, "--out", tmp_path / "o.jsonl"],
        "train --pairs": ["train", "--pairs", fifo, "--out", tmp_path / "rm"],
        "review --pairs": ["review", "--pairs", fifo, "--out", tmp_path / "o.jsonl"],
        "constitution.toml": _gen(prompts, tmp_path / "o.jsonl", tiny_model),
        "a principle": _gen(prompts, tmp_path / "o.jsonl", tiny_model),
        "generate --out": _gen(prompts, fifo, tiny_model),
        "score --out /dev/null": ["score", "--rm", tiny_rm, "--pairs", pairs, "--out", "/dev/null"],
    }[case]
    if case in ("constitution.toml", "a principle"):
        argv[argv.index("--constitution") + 1] = str(const)
    before = sorted(tmp_path.rglob("*"))
    res = _invoke_watched(argv, fifos)
    errors = [x for x in res.output.splitlines() if x.startswith("Error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "must be a regular file" in errors[0], errors[0]
    assert sorted(tmp_path.rglob("*")) == before  # no output, no stale lock


def test_constitution_check_refuses_a_fifo(tmp_path):
    d = _constitution_with_fifo(tmp_path, "constitution.toml")
    res = _invoke_watched(["constitution", "check", d], [d / "constitution.toml"])
    assert res.exit_code == 2 and "constitution.toml: must be a regular file" in res.output, res.output


# ----------------------------------------------------------------------------- size


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_an_oversized_prompt_is_named_where_it_is_read(suffix, tmp_path, tiny_model, monkeypatch):
    import cai.backends

    monkeypatch.setattr(cai.backends, "load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    big = "w" * 10_000_000  # 10 MB
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps({"prompt": "hi?"}) + "\n" + json.dumps({"prompt": big}) + "\n")
    else:
        path.write_text("hi?\n" + big + "\n")
    err = assert_clean_failure(_gen(path, tmp_path / "o.jsonl", tiny_model), tmp_path)
    assert f"prompts{suffix}:2: the prompt holds 10,000,000 characters" in err and "template" not in err


def test_an_oversized_pair_is_named_where_it_is_read(tmp_path):
    rows = [_pair(0), _pair(1, chosen="x" * 200_000)]
    path = _write_rows(tmp_path / "pairs.jsonl", rows)
    err = assert_clean_failure(
        ["label", "--pairs", path, "--constitution", HARMLESS, "--out", tmp_path / "o.jsonl"], tmp_path
    )
    assert "pairs.jsonl:2: the row holds 200," in err


@pytest.mark.parametrize("cmd", ["check", "generate"])
def test_an_oversized_principle_is_named_where_it_is_read(cmd, tmp_path, tiny_model):
    d = tmp_path / "const"
    shutil.copytree(HARMLESS, d)
    (d / "principles" / "huge.txt").write_text("critique: " + "x" * 1_000_000 + "\nrevision: r\ncompare: c\n")
    argv = (
        ["constitution", "check", d]
        if cmd == "check"
        else _gen(_prompts(tmp_path / "p.jsonl", 1), tmp_path / "o.jsonl", tiny_model)
    )
    if cmd == "generate":
        argv[argv.index("--constitution") + 1] = str(d)
    err = assert_clean_failure(argv, tmp_path)
    assert "principles/huge.txt: the principle is 1,000,0" in err and "simplify the template" not in err


# ----------------------------------------------------------------------------- lines


def test_invalid_utf8_is_reported_at_its_real_line(tmp_path, tiny_model):
    """A text stream decodes ahead in blocks, so the error came from a later line than the bad
    byte's; each line is decoded on its own now."""
    good = "".join(
        json.dumps({"id": f"q{i}", "prompt": "Tell me something longer, please " * 3}) + "\n"
        for i in range(300)
    )
    bad = good.encode() + b'{"id": "q300", "prompt": "caf\xe9"}\n' + good.encode()
    for name in ("prompts.jsonl", "prompts.txt"):
        (tmp_path / name).write_bytes(bad)
        err = assert_clean_failure(_gen(tmp_path / name, tmp_path / "o.jsonl", tiny_model), tmp_path)
        assert f"{name}:301: not UTF-8" in err, err
    (tmp_path / "pairs.jsonl").write_bytes(
        b"".join([(json.dumps(_pair(i)) + "\n").encode() for i in range(200)]) + b"\xff\n"
    )
    with pytest.raises(InputError, match="pairs.jsonl:201: not UTF-8"):
        read_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(InputError, match="pairs.jsonl:201: not UTF-8"):
        read_rows(tmp_path / "pairs.jsonl")
    d = tmp_path / "const"
    shutil.copytree(HARMLESS, d)
    (d / "principles" / "bad.txt").write_bytes(b"critique: a\nrevision: b\ncompare: caf\xe9\n")
    res = CliRunner().invoke(cli, ["constitution", "check", str(d)])
    assert res.exit_code == 2 and "principles/bad.txt:3: not UTF-8" in res.output, res.output
