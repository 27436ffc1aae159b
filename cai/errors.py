"""Exceptions the library raises; only cli.py turns them into exit codes."""


class CaiError(Exception):
    """A problem the user can fix. The message says what went wrong and what to do."""


class InputError(CaiError):
    """Bad input: a file, a constitution, an option value. CLI exit code 2."""

    def __init__(self, message: str, path=None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class OutputError(CaiError):
    """An output could not be written (no space left, quota, read-only, I/O error). CLI exit
    code 2; what was written before is kept whole (``records`` rolls a failed write back)."""

    def __init__(self, message: str, path=None):
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path
