"""Data contracts: readers for prompt and pair files, the label validator, and whole-file writes.

Every reader returns plain dicts in one normalised shape so the stages never care which
format a file came in:

    prompt rows  {"id": str, "prompt": [messages]}
    pair rows    {"id", "prompt", "chosen", "rejected", "label", ...}   (the pairs contract)

Messages are ``{"role": "user"|"assistant"|"system", "content": str}``.

Whole-file outputs (JSON, JSONL, Markdown, HTML, PNG) go through ``write_atomic``; run outputs
are appended by ``cai.rowwriter.RowWriter``; both are claimed first through ``cai.guard``.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cai.errors import InputError, OutputError

ROLES = ("system", "user", "assistant")

# Sizes checked where an input is read, so an oversized row is named (file:line) before any
# model loads instead of failing a render or a forward pass later. A row's text (prompt and
# responses together) stays far below what one template render may hold (sandbox.py's
# MAX_RENDER_CHARS, 1,000,000), leaving room for the principle, few-shot examples and template.
MAX_TEXT_CHARS = 100_000
MAX_LINE_BYTES = 16 << 20  # one line of a JSONL/text input (JSON escapes included)

# "\n\nHuman: ...\n\nAssistant: ..." (Anthropic HH-RLHF). Speaker tags start a line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


# ----------------------------------------------------------------------------- helpers


def stable_id(obj) -> str:
    """A short content hash: the same prompt gets the same id on every machine."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_hh_transcript(text: str) -> bool:
    return isinstance(text, str) and bool(re.match(r"\s*Human:", text))


def parse_hh(text: str) -> list[dict]:
    """Split an HH-RLHF transcript into chat messages."""
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    parts = _HH_TURN.split(text)
    # parts = [preamble, speaker, body, speaker, body, ...]
    msgs = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        msgs.append({"role": role, "content": body.strip()})
    return msgs


def to_transcript(messages: list[dict]) -> str:
    """The plain Human/Assistant rendering, for models without a chat template."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)


def upto_last_user(messages: list[dict]) -> list[dict]:
    """The conversation up to and including the last user turn."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return messages[: i + 1]
    return messages


def _check_messages(value, path, line, field) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InputError(f"'{field}' must be a non-empty list of chat messages", path, line)
    if field in ("chosen", "rejected") and not any(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"].strip() for m in value
    ):
        raise InputError(f"'{field}' is empty; a response needs some text", path, line)
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(
                f"'{field}' has a message that is not {{'role': user|assistant|system, 'content': str}}: "
                f"{json.dumps(m)[:80]}",
                path,
                line,
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


# ----------------------------------------------------------------------------- raw file reading


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_input_file(path) -> Path:
    """An input file is a regular file: a FIFO, socket or device would block the reader (or never
    end), so it is refused in one line before anything is opened."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError("file not found; check the path", path) from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError("is a folder, expected a file", path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"must be a regular file, not {file_kind(st.st_mode)}; pass a file saved on disk", path
        )
    return path


def _iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) for every non-blank line; errors name the file and its real line.

    Lines are read as bytes and decoded one by one, so a decoding error names the line it is on
    (a text stream decodes ahead in blocks). A UTF-8 byte-order mark (Windows editors add one) is
    accepted and stripped.
    """
    path = check_input_file(path)
    gz = path.suffix == ".gz"
    n = 0
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            while raw := f.readline(MAX_LINE_BYTES + 1):
                n += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise InputError(
                        f"line is longer than {MAX_LINE_BYTES >> 20} MiB; split or shorten the row", path, n
                    )
                if n == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                if b"\x00" in raw:
                    raise InputError("binary data, not text; pass a .jsonl, .jsonl.gz or .txt file", path, n)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(
                        "not UTF-8 text (binary file?); pass a .jsonl, .jsonl.gz or .txt file", path, n
                    ) from None
                if text.strip():
                    yield n, text
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise InputError(
            f"cannot read ({e}); is it really {'gzip' if gz else 'text'}?", path, n + 1 if n else None
        ) from None


def _check_text_size(parts: Iterable[list[dict]], what: str, path, line) -> None:
    chars = sum(len(m["content"]) for msgs in parts for m in msgs)
    if chars > MAX_TEXT_CHARS:
        raise InputError(
            f"{what} holds {chars:,} characters of text; a row may hold at most {MAX_TEXT_CHARS:,} "
            "(prompt and responses together): shorten it or drop the row",
            path,
            line,
        )


def _parse_line(path, n: int, text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"bad JSON ({e.msg}); fix or delete this line", path, n) from None
    if not isinstance(row, dict):
        raise InputError("each line must be a JSON object", path, n)
    return row


def iter_json_rows(path) -> Iterator[tuple[int, dict]]:
    for n, text in _iter_lines(path):
        yield n, _parse_line(path, n, text)


def read_rows(path) -> list[dict]:
    """Rows of one of our own output files (no normalisation)."""
    return [row for _, row in iter_json_rows(path)]


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson"))


# ----------------------------------------------------------------------------- prompts


def read_prompts(path, limit: int | None = None) -> list[dict]:
    """Read prompts from JSONL (string / messages / HH transcript / raw HH pair) or .txt.

    Duplicate ids keep their first occurrence. Raises InputError naming file and line.
    """
    path = Path(path)
    rows: list[dict] = []
    seen: set[str] = set()
    if _is_jsonl(path):
        for n, row in iter_json_rows(path):
            if "prompt" in row:
                p = row["prompt"]
                if isinstance(p, str):
                    if not p.strip():
                        raise InputError("'prompt' is empty", path, n)
                    msgs = (
                        upto_last_user(parse_hh(p))
                        if is_hh_transcript(p)
                        else [{"role": "user", "content": p}]
                    )
                else:
                    msgs = _check_messages(p, path, n, "prompt")
            elif isinstance(row.get("chosen"), str) and is_hh_transcript(row["chosen"]):
                msgs = upto_last_user(parse_hh(row["chosen"]))
            else:
                raise InputError(
                    "row has no 'prompt' (a string or a list of chat messages); add one", path, n
                )
            _check_text_size([msgs], "the prompt", path, n)
            rid = str(row["id"]) if row.get("id") is not None else stable_id(msgs)
            if rid not in seen:
                seen.add(rid)
                rows.append({"id": rid, "prompt": msgs})
            if limit and len(rows) >= limit:
                break
    else:
        for n, text in _iter_lines(path):
            msgs = [{"role": "user", "content": text.strip()}]
            _check_text_size([msgs], "the prompt", path, n)
            rid = stable_id(msgs)
            if rid not in seen:
                seen.add(rid)
                rows.append({"id": rid, "prompt": msgs})
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise InputError("no prompts found (the file is empty); add one prompt per line", path)
    return rows


# ----------------------------------------------------------------------------- pairs


def _split_common(a: list[dict], b: list[dict]):
    """Shared leading turns, then the two differing tails."""
    k = 0
    while k < min(len(a), len(b)) - 1 and a[k] == b[k]:
        k += 1
    return a[:k], a[k:], b[k:]


def normalise_pair(row: dict, path=None, line: int | None = None) -> dict:
    """One pairs-contract row from our rows, TRL rows or raw HH-RLHF rows."""
    if "chosen" not in row or "rejected" not in row:
        raise InputError("row needs both 'chosen' and 'rejected'", path, line)
    ch, rj = row["chosen"], row["rejected"]
    if isinstance(ch, str) and isinstance(rj, str) and is_hh_transcript(ch) and "prompt" not in row:
        prompt, ch_t, rj_t = _split_common(parse_hh(ch), parse_hh(rj))
        ch, rj = ch_t, rj_t
        label = {"p_chosen": 1.0, "source": "human"}
    else:
        if isinstance(ch, str):
            ch = [{"role": "assistant", "content": ch}]
        if isinstance(rj, str):
            rj = [{"role": "assistant", "content": rj}]
        ch = _check_messages(ch, path, line, "chosen")
        rj = _check_messages(rj, path, line, "rejected")
        if "prompt" in row:
            p = row["prompt"]
            if isinstance(p, str):
                p = upto_last_user(parse_hh(p)) if is_hh_transcript(p) else [{"role": "user", "content": p}]
            prompt = _check_messages(p, path, line, "prompt")
        else:  # TRL implicit-prompt rows: the conversation is inside chosen/rejected
            prompt, ch, rj = _split_common(ch, rj)
        label = row.get("label")
        if label is None or (
            isinstance(label, dict) and label.get("p_chosen") is None and "prior" not in label
        ):
            label = {"p_chosen": 1.0, "source": "human"}
        else:
            label = check_label(label, path, line)
    if not prompt:
        raise InputError("cannot find the prompt: 'chosen' and 'rejected' share no turns", path, line)
    # the final assistant turn is the response being compared
    ch = [m for m in ch if m["role"] == "assistant"][-1:] or ch
    rj = [m for m in rj if m["role"] == "assistant"][-1:] or rj
    for field, msgs in (("chosen", ch), ("rejected", rj)):
        if not response_text(msgs).strip():
            raise InputError(f"'{field}' response is empty; a response needs some text", path, line)
    _check_text_size([prompt, ch, rj], "the row", path, line)
    sub = row.get("subset")
    if sub is not None and not (isinstance(sub, str) and sub.strip()):
        raise InputError(
            f"'subset' must be a non-empty string naming the row's group (as in RewardBench), "
            f"not {json.dumps(sub)[:40]}",
            path,
            line,
        )
    out = dict(row)
    out["prompt"], out["chosen"], out["rejected"] = prompt, ch, rj
    out["label"] = label
    out["id"] = str(row["id"]) if row.get("id") is not None else stable_id([prompt, ch, rj])
    return out


def check_probability(value, what: str, path=None, line: int | None = None) -> float:
    """A preference probability: a finite number in [0, 1] (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a number in [0, 1], not {json.dumps(value)[:40]}", path, line)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{what} must be in [0, 1], not {value}", path, line)
    return float(value)


def check_label(label, path=None, line: int | None = None) -> dict:
    """The pairs contract's label: ``p_chosen`` (and every nested ``prior.p_chosen``) a probability.

    The one validator every pair reader goes through, so label/train/score/eval/compare agree.
    A row may carry ``p_chosen: null`` only when a ``prior`` holds a label (a pair the judge
    could not score keeps the human one): some ``prior`` below it has a probability.
    """
    if not isinstance(label, dict):
        raise InputError(
            f"'label' must be an object with 'p_chosen', not {json.dumps(label)[:40]}", path, line
        )
    node, what, held = label, "label", False
    while isinstance(node, dict):
        if node.get("p_chosen") is not None:
            check_probability(node["p_chosen"], f"{what}.p_chosen", path, line)
            held = True
        prior = node.get("prior")
        if prior is not None and not isinstance(prior, dict):
            raise InputError(f"'{what}.prior' must be an object", path, line)
        node, what = prior, f"{what}.prior"
    if not held:
        raise InputError(
            "label.p_chosen is null and no label.prior holds a label; give label.p_chosen a number in [0, 1]",
            path,
            line,
        )
    return dict(label)


def response_text(messages: list[dict]) -> str:
    return messages[-1]["content"] if messages else ""


def read_pairs(
    path,
    limit: int | None = None,
    skip_bad: bool = False,
    stats: dict | None = None,
    need_label: bool = False,
) -> list[dict]:
    """Read any pairs format in docs/pairs-contract.md into pairs-contract rows.

    With ``skip_bad`` malformed rows are counted in ``stats['skipped']`` (with their line
    numbers) instead of raising. Identical chosen/rejected is a bad row, except in rows that
    `generate` marked ``label.tie`` (its loop changed nothing): those are skipped and counted in
    ``stats['ties']``.

    Rows with ``label.revision`` are answers from `cai review`: for one id the last revision
    wins, and a last revision with ``p_chosen: null`` (a skip or an undo) leaves the pair out
    (counted in ``stats['unlabelled']``).

    ``need_label``: the command uses the label itself (train, eval, compare), so a row whose
    ``p_chosen`` is null (only a ``prior`` holds one) is a bad row there.
    """
    path = Path(path)
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", [])
    rows, seen, revised = [], set(), {}
    for n, text in _iter_lines(path):
        try:
            raw = _parse_line(path, n, text)
            lab = raw.get("label")
            if isinstance(lab, dict) and lab.get("tie"):
                # `generate` rows whose loop changed nothing: kept for their trace, not a preference
                stats["ties"] = stats.get("ties", 0) + 1
                continue
            answer = isinstance(lab, dict) and "revision" in lab
            row = normalise_pair(raw, path, n)
            if need_label and not answer and row["label"].get("p_chosen") is None:
                raise InputError(
                    "label.p_chosen is null (only label.prior holds a label); this command needs "
                    "a label on every row: label it (cai label) or drop the row",
                    path,
                    n,
                )
            if response_text(row["chosen"]).strip() == response_text(row["rejected"]).strip():
                raise InputError("'chosen' and 'rejected' are identical; nothing to compare", path, n)
        except InputError as e:
            if not skip_bad:
                raise InputError(f"{e}; fix the row, or pass --skip-bad to skip bad rows (counted)") from None
            stats["skipped"].append((n, str(e)))
            continue
        if answer:
            revised[row["id"]] = row if lab.get("p_chosen") is not None else None
            continue
        if row["id"] in seen:
            stats["duplicates"] = stats.get("duplicates", 0) + 1
            continue
        seen.add(row["id"])
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    for rid, row in revised.items():
        if row is None:
            stats["unlabelled"] = stats.get("unlabelled", 0) + 1
        elif rid not in seen and not (limit and len(rows) >= limit):
            seen.add(rid)
            rows.append(row)
    if not rows:
        first = stats["skipped"][0][1] if stats["skipped"] else None
        why = (
            f"; first problem: {first}"
            if first
            else (" (every row is an unrevised tie)" if stats.get("ties") else "")
        )
        raise InputError(f"no usable pairs in the file{why}", path)
    return rows


def skip_note(stats: dict, path=None) -> str | None:
    """'N bad rows skipped (first: file:line: why)' for --skip-bad summaries; None when none."""
    skipped = stats.get("skipped") or []
    if not skipped:
        return None
    line, msg = skipped[0]
    return f"{len(skipped)} bad row{'s' * (len(skipped) != 1)} skipped (first: {msg})"


# ----------------------------------------------------------------------------- whole-file writes

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "the file is too large for its file system",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "input/output error (a failing disk?)",
}


def write_error(e: OSError, path, kept: str = "") -> OutputError:
    """A failed write as one line naming the output, what happened and what to do."""
    reason = _REASONS.get(e.errno) or (e.strerror or str(e)).lower()
    todo = (
        "free some space (or choose another --out) and rerun"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else "choose another --out and rerun"
    )
    return OutputError(f"cannot write: {reason}; {todo}{kept}", path)


def write_atomic(path, write) -> Path:
    """Create ``path`` atomically: ``write(file)`` fills a temp file beside it, which is fsynced
    and renamed over ``path``. A kill or an error never leaves half a file or a temp file behind;
    a failed write (a full disk) is one ``OutputError`` naming the file.

    The one writer for every whole-file output (JSON, JSONL, Markdown, HTML, PNG bytes).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        raise
    return path


def write_text(path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, obj) -> Path:
    """Write a JSON file atomically (temp file + rename): a kill never leaves half a file."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    """Write a whole JSONL file atomically (for derived files; run outputs use RowWriter)."""
    return write_atomic(
        path, lambda f: f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in rows)
    )
