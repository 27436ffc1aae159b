"""Writing a bench/RESULTS-*.md file without losing what a person wrote in it.

A benchmark rewrites its measured block on every run; the hand-written reading below it (from a
line ``## Reading ...`` or a ``<!-- READING`` marker on) is carried over. When the run it was
written for is not this one, the reading gets one line saying which run that was (the first
date in the old file), so nobody takes an old reading for the new numbers; a reading that
already says so keeps its line.
"""

from __future__ import annotations

import re
from pathlib import Path

_MARK = re.compile(r"^(?:<!-- READING|## Reading)", re.M)  # where the hand-written part starts
NOTE = "for the run of"  # a reading that names its run already
_DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2}(?: \d{2}:\d{2})?)\b")


def reading(old: str) -> str:
    """The hand-written part of ``old``: from the first line that starts with a mark, or ''."""
    m = _MARK.search(old)
    return old[m.start() :] if m else ""


def write(path: str | Path, text: str) -> None:
    """Write ``text`` (this run's block) to ``path``, then the old file's reading, if any."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    kept = reading(old)
    if kept and NOTE not in kept:
        date = _DATE.search(old[: len(old) - len(kept)])
        when = f"the run of {date.group(1)}" if date else "an earlier run"
        # the line goes under the "## Reading" heading (or the first line)
        end = kept.find("\n", max(kept.find("## Reading"), 0)) + 1 or len(kept)
        kept = f"{kept[:end]}\n(written for {when}; the block above is from a later run)\n{kept[end:]}"
    text = text if text.endswith("\n") else text + "\n"
    path.write_text(text + ("\n" + kept if kept else ""))
