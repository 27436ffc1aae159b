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
