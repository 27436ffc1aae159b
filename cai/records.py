"""Data contracts: readers for prompt and pair files, and the crash-safe JSONL writer.

Every reader returns plain dicts in one normalised shape so the stages never care which
format a file came in:

    prompt rows  {"id": str, "prompt": [messages]}
    pair rows    {"id", "prompt", "chosen", "rejected", "label", ...}   (the pairs contract)

Messages are ``{"role": "user"|"assistant"|"system", "content": str}``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cai.errors import InputError

ROLES = ("system", "user", "assistant")

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


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (Windows editors add one) is accepted and stripped.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) for every non-blank line; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found; check the path", path)
    if path.is_dir():
        raise InputError("is a folder, expected a file", path)
    n = 0
    try:
        with _open_text(path) as f:
            for n, text in enumerate(f, 1):
                if "\x00" in text:
                    raise InputError("binary data, not text; pass a .jsonl, .jsonl.gz or .txt file", path, n)
                if text.strip():
                    yield n, text
    except UnicodeDecodeError:
        raise InputError(
            "not UTF-8 text (binary file?); pass a .jsonl, .jsonl.gz or .txt file", path, n + 1
        ) from None
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise InputError(
            f"cannot read ({e}); is it really {'gzip' if path.suffix == '.gz' else 'text'}?", path
        ) from None


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
            rid = str(row["id"]) if row.get("id") is not None else stable_id(msgs)
            if rid not in seen:
                seen.add(rid)
                rows.append({"id": rid, "prompt": msgs})
            if limit and len(rows) >= limit:
                break
    else:
        for _, text in _iter_lines(path):
            msgs = [{"role": "user", "content": text.strip()}]
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
    could not score keeps the human one).
    """
    if not isinstance(label, dict):
        raise InputError(
            f"'label' must be an object with 'p_chosen', not {json.dumps(label)[:40]}", path, line
        )
    out, node, what = dict(label), label, "label.p_chosen"
    while isinstance(node, dict):
        if node.get("p_chosen") is not None or node is label and "prior" not in label:
            check_probability(node.get("p_chosen"), what, path, line)
        prior = node.get("prior")
        if prior is not None and not isinstance(prior, dict):
            raise InputError(f"'{what.replace('p_chosen', 'prior')}' must be an object", path, line)
        node, what = prior, what.replace("p_chosen", "prior.p_chosen")
    return out


def response_text(messages: list[dict]) -> str:
    return messages[-1]["content"] if messages else ""


def read_pairs(
    path, limit: int | None = None, skip_bad: bool = False, stats: dict | None = None
) -> list[dict]:
    """Read any pairs format in docs/pairs-contract.md into pairs-contract rows.

    With ``skip_bad`` malformed rows are counted in ``stats['skipped']`` (with their line
    numbers) instead of raising. Identical chosen/rejected is a bad row, except in rows that
    `generate` marked ``label.tie`` (its loop changed nothing): those are skipped and counted in
    ``stats['ties']``.

    Rows with ``label.revision`` are answers from `cai review`: for one id the last revision
    wins, and a last revision with ``p_chosen: null`` (a skip or an undo) leaves the pair out
    (counted in ``stats['unlabelled']``).
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


# ----------------------------------------------------------------------------- the writer


class RowWriter:
    """Append-only, resumable JSONL writer keyed by ``id``.

    - A torn last line (a kill mid-write) is cut back to the last newline before appending.
    - ``done`` holds the ids already in the file, so a rerun skips them.
    - Each row is one ``write`` of one whole line, flushed and fsynced per batch, so a kill at
      any instant loses at most the rows not yet written and never corrupts earlier ones.
    - Nothing is created until the first row is written (bad input leaves no file behind).
    """

    def __init__(self, path, overwrite: bool = False):
        import jsonlines  # noqa: F401  (the contract's writer; imported lazily for a fast --help)

        self.path = Path(path)
        self.done: set[str] = set()
        self.first_meta: dict | None = None
        self._fp = None
        self._writer = None
        # --overwrite empties the file at the first write, not now: a run that fails before
        # producing a row (bad model, bad option) leaves the old output as it was.
        self._truncate = overwrite and self.path.exists()
        if self.path.exists() and not overwrite:
            self._scan_existing()

    def _scan_existing(self):
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            self.repaired_bytes = len(data) - cut
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            data = data[:cut]
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(
                    "existing output has a corrupt line; move the file aside or pass --overwrite",
                    self.path,
                    n,
                ) from None
            self.done.add(str(row.get("id")))
            if self.first_meta is None:
                self.first_meta = row.get("meta")

    def _open(self):
        import jsonlines

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fp = open(self.path, "w" if self._truncate else "a", encoding="utf-8")
        self._truncate = False
        self._writer = jsonlines.Writer(self._fp, compact=True, flush=True)

    def write(self, row: dict):
        if self._writer is None:
            self._open()
        self._writer.write(row)
        self.done.add(str(row["id"]))

    def write_many(self, rows: Iterable[dict]):
        for row in rows:
            self.write(row)
        self.sync()

    def sync(self):
        if self._fp is not None:
            self._fp.flush()
            os.fsync(self._fp.fileno())

    def close(self):
        if self._writer is not None:
            self.sync()
            self._writer.close()
            self._fp.close()
            self._writer = self._fp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_atomic(path, write) -> Path:
    """Create ``path`` atomically: ``write(file)`` fills a temp file beside it, which is fsynced
    and renamed over ``path``. A kill or an error never leaves half a file or a temp file behind.

    The one writer for every whole-file output (JSON, JSONL, Markdown, HTML, PNG bytes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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


# ----------------------------------------------------------------------------- the output guard


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(
    out, inputs: Iterable = (), kind: str = "file", exists_ok: bool = True, option: str = "--out"
) -> Path:
    """Refuse an output path that would damage an input or fail late; call before any model loads.

    - not the same file as any input (symlinks and hard links included), and for a folder
      output no input inside it;
    - a file where a folder is expected (or the reverse) is named;
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
        if not exists_ok:
            raise InputError(f"already exists; pass a new {option} (or remove it)", out)
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


class OutputLock:
    """An advisory lock (``fcntl.flock``) on a sidecar ``.<name>.lock`` beside an output, held
    for a run's lifetime, so two runs never write one output. The sidecar holds the owner's
    pid (for the refusal message) and is removed on release."""

    def __init__(self, out):
        out = Path(out).expanduser()
        self.path = out.parent / f".{out.name}.lock"
        self.out = out
        self._fd: int | None = None

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
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return self
            os.close(fd)
        raise InputError("could not take the output lock; retry", self.out)

    def release(self):
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        for d in getattr(self, "_created", []):  # innermost first; stops at the first non-empty one
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
    out, inputs: Iterable = (), kind: str = "file", exists_ok: bool = True, option: str = "--out"
):
    """``check_output`` then hold ``OutputLock`` for the block: every command's one output guard.

    Use it around the whole run, before any model loads::

        with claim_output(cfg.out, inputs=[cfg.pairs]):
            ...
    """
    path = check_output(out, inputs, kind=kind, exists_ok=exists_ok, option=option)
    if str(path) == "-":
        yield path
        return
    with OutputLock(path):
        yield path


def skip_note(stats: dict, path=None) -> str | None:
    """'N bad rows skipped (first: file:line: why)' for --skip-bad summaries; None when none."""
    skipped = stats.get("skipped") or []
    if not skipped:
        return None
    line, msg = skipped[0]
    return f"{len(skipped)} bad row{'s' * (len(skipped) != 1)} skipped (first: {msg})"


def read_rows(path) -> list[dict]:
    """Rows of one of our own output files (no normalisation)."""
    return [row for _, row in iter_json_rows(path)]


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
