"""The run outputs' writer: append-only, resumable JSONL keyed by id (``RowWriter``), and the
check that a resumed file was made with the same settings (``check_resume_meta``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cai.errors import InputError
from cai.guard import hold, real_path
from cai.records import check_input_file, write_error

KEPT = "; the rows written before are kept, and the rerun resumes after them"


def _dumps(row: dict) -> bytes:
    # the bytes jsonlines' compact writer makes: no spaces, UTF-8 text as is
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _is_row(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        return False


class RowWriter:
    """Append-only, resumable JSONL writer keyed by ``id``.

    - A last line without its newline is a row if it parses (the newline is added before the
      next row); one that does not parse is torn (a kill mid-write): its bytes are moved to
      ``<name>.torn`` beside the file, never dropped, and the file is cut back to the last
      whole row before appending.
    - ``done`` holds the ids already in the file, so a rerun skips them.
    - Rows go straight to the file descriptor (no buffer holds them), one batch per ``write``
      call, fsynced by ``sync``/``write_many``. A write or an fsync that fails (a full disk) or
      is interrupted is rolled back: the file is cut back to what was there before, so a row is
      either on disk and acknowledged or not written at all (never half a line, never later).
    - Nothing is created until the first row is written (bad input leaves no file behind), and a
      file this writer created is removed again when its first rows could not be written.
    - ``overwrite``: the old file stays until the first rows are on disk in its replacement.
    """

    def __init__(self, path, overwrite: bool = False):
        self.path = Path(path)
        self.done: set[str] = set()
        self.first_meta: dict | None = None
        self.repaired_bytes = 0  # bytes of a torn last line moved aside
        self.torn_path: Path | None = None
        self._fd: int | None = None
        self._created = False
        self._pending = b""  # the newline owed to a last row written without one
        self._synced = 0  # file size at the last fsync
        self._unsynced: list[str] = []  # ids written since then
        # --overwrite empties the file at the first write, not now: a run that fails before
        # producing a row (bad model, bad option) leaves the old output as it was.
        self._truncate = overwrite and self.path.exists()
        if self.path.exists() and not overwrite:
            self._scan_existing()

    def _scan_existing(self):
        check_input_file(self.path)
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            if _is_row(data[cut:]):
                self._pending = b"\n"  # a whole row missing only its newline: a row
            else:
                self._set_aside(data[cut:], cut)
                data = data[:cut]
        for n, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise InputError(
                    "existing output has a corrupt line; move the file aside or pass --overwrite",
                    self.path,
                    n,
                )
            self.done.add(str(row.get("id")))
            if self.first_meta is None:
                self.first_meta = row.get("meta")

    def _set_aside(self, tail: bytes, cut: int):
        aside = self.path.with_name(self.path.name + ".torn")
        try:
            with open(aside, "ab") as f:  # kept, never dropped: several repairs append
                f.write(tail + b"\n")
                f.flush()
                os.fsync(f.fileno())
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(e, aside) from None
        self.repaired_bytes, self.torn_path = len(tail), aside
        print(
            f"cai: {self.path}: its last line was cut off mid-row (a kill mid-write?); its "
            f"{len(tail)} bytes were moved to {aside}, and the run goes on after the last whole row",
            file=sys.stderr,
        )

    def _open(self):
        existed = self.path.exists()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            raise write_error(e, self.path) from None
        self._created = not existed
        if self._created:
            self._pending = b""
        self._synced = os.fstat(self._fd).st_size
        try:
            hold(self.path)  # the output's lock holds this file too (another name for it is refused)
        except BaseException:
            self._rollback(self._synced)
            raise

    def _rollback(self, size: int):
        """Cut the file back to ``size`` bytes; a file this writer made and left empty goes."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        if self._created and size == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd, self._created = None, False

    def _append(self, rows: list[dict]):
        data = b"".join(_dumps(r) for r in rows)  # every row serialised before a byte is written
        if not data:
            return
        if self._truncate:
            return self._replace(data, rows)
        if self._fd is None:
            self._open()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(self._pending + data)
            while view:
                view = view[os.write(self._fd, view) :]
        except BaseException as e:
            self._rollback(start)
            if isinstance(e, OSError):
                raise write_error(e, self.path, KEPT) from None
            raise
        self._pending = b""
        for r in rows:
            rid = str(r["id"])
            if rid not in self.done:
                self.done.add(rid)
                self._unsynced.append(rid)

    def _replace(self, data: bytes, rows: list[dict]):
        """--overwrite: the first rows go into a new file beside the old one, which replaces it
        once they are on disk; a failure leaves the old file as it was."""
        real, tmp = real_path(self.path), None
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
            try:
                with contextlib.suppress(OSError):
                    os.chmod(tmp, stat.S_IMODE(os.stat(real).st_mode))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, real)
        except BaseException as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise write_error(e, self.path, "; the old file is unchanged") from None
            raise
        self._truncate, self._created, self._pending = False, False, b""
        self._fd = os.open(real, os.O_WRONLY | os.O_APPEND)
        self._synced = os.fstat(self._fd).st_size
        self.done.update(str(r["id"]) for r in rows)
        hold(self.path)  # the lock takes the new file

    def write(self, row: dict):
        """Append one row (on disk at the next ``sync``)."""
        self._append([row])

    def write_many(self, rows: Iterable[dict]):
        """Append rows and fsync them: all of them are on disk when this returns, or none is."""
        self._append(list(rows))
        self.sync()

    def sync(self):
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except BaseException as e:
            self._rollback(self._synced)
            self.done.difference_update(self._unsynced)
            self._unsynced = []
            if isinstance(e, OSError):
                raise write_error(e, self.path, KEPT) from None
            raise
        if self._fd is not None:
            self._synced = os.fstat(self._fd).st_size
        self._unsynced = []

    def close(self):
        if self._fd is not None:
            try:
                self.sync()
            finally:
                if self._fd is not None:
                    os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # the error on its way out is the one to report
            with contextlib.suppress(Exception):
                self.close()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def check_resume_meta(writer: RowWriter, meta: dict, keys=("model", "constitution", "seed", "params")):
    """Refuse to append to a file made with different settings (mixing them would be silent)."""
    old = writer.first_meta
    if not old:
        return
    if "model" in keys and old.get("model_sha256") and meta.get("model_sha256"):
        # the same weights under another path resume; other weights under the same path do not
        keys = tuple("model_sha256" if k == "model" else k for k in keys)
    for k in keys:
        if json.dumps(old.get(k), sort_keys=True) != json.dumps(meta.get(k), sort_keys=True):
            raise InputError(
                f"was written with a different {k} ({json.dumps(old.get(k))[:80]}); "
                "rerun with the same arguments to resume, or pass --overwrite / a new --out",
                writer.path,
            )
