"""The output guard: every command claims its output before any model loads.

``check_output`` refuses an output that would damage an input or fail late; ``OutputLock`` makes
sure two runs never write one output (the lock follows the file, not the name); ``claim_output``
is the two together, the one guard every command goes through (docs/architecture.md,
"One output guard").
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cai.errors import InputError
from cai.records import check_input_file, file_kind, write_error


def file_identity(path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file a path names, symlinks followed; None when nothing is there.
    Two names (a symlink, a hard link, another spelling of the path) of one file share it."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def real_path(path: Path) -> Path:
    """The path with its symlinks resolved (for a path that does not exist yet: its folder's)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(path).expanduser().absolute()


def _same_file(a: Path, b: Path) -> bool:
    ia, ib = file_identity(a), file_identity(b)
    if ia is not None and ib is not None:
        return ia == ib
    return real_path(a) == real_path(b)


def check_output(
    out,
    inputs: Iterable = (),
    kind: str = "file",
    exists_ok: bool = True,
    option: str = "--out",
    marker: tuple[str, str] | None = None,
) -> Path:
    """Refuse an output path that would damage an input or fail late; call before any model loads.

    - every input that exists is a regular file or a folder (a FIFO or a device would block);
    - not the same file as any input (by identity: symlinks and hard links included), and for a
      folder output no input inside it;
    - a file where a folder is expected (or the reverse) is named; a file output is a regular
      file (never a device or a pipe);
    - ``marker=(name, what)``, for whole-folder outputs: an existing, non-empty folder must hold
      ``name`` (the file this command writes into every folder it makes), so cai never writes
      into a folder it did not make;
    - the nearest existing parent must be a writable folder;
    - ``exists_ok=False``: an existing output is refused (reports that would be overwritten).
    """
    if str(out) == "-":
        return Path("-")
    out = Path(out).expanduser()
    for src in inputs:
        if src is None or str(src) == "-":
            continue
        src = Path(src).expanduser()
        if src.exists() and not src.is_dir():
            check_input_file(src)
        if _same_file(out, src):
            raise InputError(f"{option} is the input file {src}; write to a new path", out)
        if kind == "folder" and src.exists() and out.exists() and out.is_dir():
            with contextlib.suppress(ValueError):
                src.resolve().relative_to(out.resolve())
                raise InputError(f"the input {src} is inside the output folder; choose another {option}", out)
    if out.exists():
        if kind == "file" and out.is_dir():
            raise InputError(f"is a folder; {option} needs a file path here", out)
        if kind == "folder" and not out.is_dir():
            raise InputError(f"is a file; {option} needs a folder here", out)
        if kind == "file" and not out.is_file():
            raise InputError(
                f"must be a regular file, not {file_kind(os.stat(out).st_mode)}; choose another {option}", out
            )
        if not exists_ok:
            raise InputError(f"already exists; pass a new {option} (or remove it)", out)
        if kind == "folder" and marker and not (out / marker[0]).exists() and any(out.iterdir()):
            raise InputError(
                f"exists and is not a cai {marker[1]} (no {marker[0]}); "
                f"pass a new {option} or empty the folder",
                out,
            )
        if not os.access(out, os.W_OK):
            raise InputError("cannot be written (permission denied); choose another " + option, out)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{parent} is a file, so {out} cannot be created; choose another {option}", out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create it: {parent} is not writable; choose another {option}", out)
    return out


_HELD: dict[Path, OutputLock] = {}  # resolved output path -> the lock this process holds on it


def hold(path) -> None:
    """A file just created under a held output lock: the lock takes the file itself too."""
    lock = _HELD.get(real_path(Path(path)))
    if lock is not None:
        lock.hold_file()


def _flock_holder(ident: tuple[int, int]) -> str | None:
    """The pid holding a flock on the file (dev, ino), from Linux's /proc/locks."""
    dev, ino = ident
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and want in fields:
                    return fields[fields.index(want) - 1]
    except OSError:
        pass
    return None


class OutputLock:
    """Two runs never write one output. The lock follows the file, not the name:

    - an advisory lock (``fcntl.flock``) on a sidecar ``.<name>.lock`` beside the output's real
      path (symlinks resolved, so a symlink to the output finds the same sidecar), held for the
      run's lifetime; the sidecar holds the owner's pid (for the refusal message) and is removed
      on release;
    - a flock on the output file itself while it exists (taken at acquire, or when the run
      creates it): a hard link is another name for the same inode, so a run writing through it
      is refused as well (the holder's pid read from /proc/locks).
    """

    def __init__(self, out):
        out = Path(out).expanduser()
        self.out = out
        self.real = real_path(out)
        self.path = self.real.parent / f".{self.real.name}.lock"
        self._fd: int | None = None
        self._file_fd: int | None = None
        self._file_id: tuple[int, int] | None = None
        self._created: list[Path] = []

    def acquire(self) -> OutputLock:
        import fcntl

        missing = []  # folders this lock creates, removed again on release when still empty
        d = self.path.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        self._created = missing
        for _ in range(20):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self.release()
                raise InputError(
                    f"cannot be created here ({e.strerror}); choose another --out", self.out
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                self.release()
                raise InputError(
                    f"is in use by another cai run (pid {holder}); "
                    "wait for it to finish or choose another --out",
                    self.out,
                ) from None
            # the holder may have released and removed the sidecar between our open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                pid = str(os.getpid()).encode()
                if os.write(fd, pid) != len(pid):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.hold_file()
            except OSError as e:
                self.release()
                raise write_error(e, self.out) from None
            except BaseException:
                self.release()
                raise
            _HELD[self.real] = self
            return self
        self.release()
        raise InputError("could not take the output lock; retry", self.out)

    def hold_file(self) -> None:
        """flock the output file itself (a regular file that exists), so that a run writing
        through another name for it (a hard link) is refused."""
        import fcntl

        try:
            st = os.stat(self.real)
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode) or ident == self._file_id:
            return
        try:
            fd = os.open(self.real, os.O_RDONLY)
        except OSError:
            return  # unreadable: the sidecar alone guards it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _flock_holder(ident) or "another process"
            raise InputError(
                f"is in use by another cai run (pid {holder}) under another name for the same file "
                "(a hard link); wait for it to finish or choose another --out",
                self.out,
            ) from None
        if self._file_fd is not None:
            os.close(self._file_fd)
        self._file_fd, self._file_id = fd, ident

    def release(self):
        if _HELD.get(self.real) is self:
            del _HELD[self.real]
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = self._file_id = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        for d in self._created:  # innermost first; stops at the first non-empty one
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def claim_output(
    out,
    inputs: Iterable = (),
    kind: str = "file",
    exists_ok: bool = True,
    option: str = "--out",
    marker: tuple[str, str] | None = None,
    discard_on_error: bool = False,
):
    """``check_output`` then hold ``OutputLock`` for the block: every command's one output guard.

    Use it around the whole run, before any model loads::

        with claim_output(cfg.out, inputs=[cfg.pairs]):
            ...

    ``discard_on_error`` (report folders): a folder that did not exist before the claim is removed
    again when the block fails or is interrupted, so nothing half-made is left behind.
    """
    path = check_output(out, inputs, kind=kind, exists_ok=exists_ok, option=option, marker=marker)
    if str(path) == "-":
        yield path
        return
    fresh = not path.exists() and not path.is_symlink()
    with OutputLock(path):
        try:
            yield path
        except BaseException:
            if discard_on_error and fresh and path.is_dir() and not path.is_symlink():
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            raise
