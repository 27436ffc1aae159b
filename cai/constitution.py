"""Load and validate a constitution folder; draw its principles; render its templates.

    constitutions/NAME/
      constitution.toml        name, description, [defaults]  (a fixed schema: unknown keys are errors)
      principles/*.txt         one principle per file: "critique:", "revision:", "compare:" sections
      templates/*.jinja        critique, revision, compare (+ any others): chat messages
      templates/**/*.jinja     partials a template may include / import
      fewshot/*.txt            optional few-shot examples, exposed to templates as `fewshot`

Confinement: every file is read once at load, from inside the folder only (a symlink that
resolves outside it is refused), hashed into ``sha256`` from the very bytes that are used, and
templates are served from that in-memory copy. Templates render in the sandbox of
``cai.sandbox`` (the call blocks a template writes messages with, and the caps on one render);
``load_constitution`` renders every template with every principle before any model work.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import os
import random
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cai import sandbox
from cai.errors import InputError
from cai.records import check_input_file

REQUIRED_TEMPLATES = ("critique", "revision", "compare")
RECHECK_TEMPLATE = "recheck"  # optional: the re-check judge (`--recheck`), else compare per principle
SECTIONS = ("critique", "revision", "compare")
_SECTION = re.compile(r"^(critique|revision|compare)\s*:\s?", re.IGNORECASE | re.MULTILINE)

# What one file may hold, checked when it is read (naming the file), far below the render cap:
# a principle, the few-shot examples and a prompt (records.MAX_TEXT_CHARS) all fit one render
# (sandbox.MAX_RENDER_CHARS).
MAX_PRINCIPLE_CHARS = 20_000
MAX_FILE_CHARS = 100_000  # a template, a few-shot example, constitution.toml
MAX_FEWSHOT_CHARS = 100_000  # all few-shot examples together

# constitution.toml: every key a constitution may set, with its type.
SCHEMA: dict[str, object] = {
    "name": str,
    "description": str,
    "defaults": {"rounds": int, "no_change_pattern": str},
}
_TYPE_NAMES = {str: "a string", int: "a whole number", dict: "a table"}


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    compare: str


@dataclass
class Constitution:
    name: str
    description: str
    path: Path
    principles: dict[str, Principle]
    fewshot: list[str]
    defaults: dict
    sha256: str
    _env: object = field(repr=False, default=None)
    files: list[str] = field(default_factory=list)  # the hashed files, relative to path

    # -- principles ------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return list(self.principles)

    def draw(self, seed: int, key: str, round_: int) -> Principle:
        """The principle for one (prompt, round): a pure function of (seed, key, round), so
        reruns and resumes reproduce regardless of batch order."""
        rng = random.Random(f"{seed}:{key}:{round_}")
        return self.principles[rng.choice(self.ids)]

    def sample(self, seed: int, key: str, k: int | None) -> list[Principle]:
        """K distinct principles for one item (all of them when k is None or >= count)."""
        if not k or k >= len(self.ids):
            return list(self.principles.values())
        rng = random.Random(f"{seed}:{key}:ensemble")
        return [self.principles[i] for i in rng.sample(self.ids, k)]

    def recheck_variables(self, p: Principle) -> dict:
        """What recheck.jinja gets besides the pair: every principle's question (the
        constitution's order), their ids, and the 1-based number of the one asked."""
        return {
            "questions": [q.compare for q in self.principles.values()],
            "ids": self.ids,
            "number": self.ids.index(p.id) + 1,
        }

    # -- templates -------------------------------------------------------------------

    @property
    def templates(self) -> list[str]:
        """Names of the top-level templates (``templates/*.jinja`` without the suffix)."""
        return sorted(n[: -len(".jinja")] for n in self._env.loader.sources if "/" not in n)

    def render(self, name: str, **variables) -> list[dict]:
        """Render ``templates/<name>.jinja`` into chat messages (InputError on any failure)."""
        return sandbox.render(
            self._env, self.path / "templates", name, dict(fewshot=self.fewshot, **variables)
        )

    def provenance(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path)}


# ------------------------------------------------------------------------------ loading


def _decode(data: bytes, path: Path) -> str:
    if data.startswith(codecs.BOM_UTF8):  # a UTF-8 byte-order mark is accepted and dropped
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1  # the line the bad bytes are on
        raise InputError("not UTF-8 text; save the file as UTF-8", path, line) from None


def _read_text(path: Path) -> str:
    return _decode(path.read_bytes(), path).strip()


class _Reader:
    """Reads each file of the constitution once, from inside the folder only, and keeps the
    bytes it read for the hash (so what is hashed is exactly what is used)."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = root.resolve()
        self.data: dict[Path, bytes] = {}

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.real_root)
            return True
        except (ValueError, OSError, RuntimeError):
            return False

    def check(self, path: Path):
        if not self._inside(path):
            target = os.path.realpath(path)
            raise InputError(
                f"a symlink to {target}, outside the constitution folder; a constitution reads only "
                "files inside its folder: copy the file in instead",
                path,
            )

    def read(self, path: Path, limit: int = MAX_FILE_CHARS, what: str = "the file") -> bytes:
        self.check(path)
        size = check_input_file(path).stat().st_size  # a FIFO or a device would block: refused
        if size > 4 * limit:  # UTF-8 holds at most 4 bytes a character: too long before reading it
            _too_long(path, what, f"{size:,} bytes", limit)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read ({e.strerror or e})", path) from None
        self.data[path] = data
        return data

    def text(
        self, path: Path, strip: bool = True, limit: int = MAX_FILE_CHARS, what: str = "the file"
    ) -> str:
        text = _decode(self.read(path, limit, what), path)
        if len(text) > limit:
            _too_long(path, what, f"{len(text):,} characters", limit)
        return text.strip() if strip else text

    def files(self, folder: Path, suffix: str, recursive: bool = False) -> list[Path]:
        """Files ``*suffix`` in folder (and its subfolders when recursive), hidden ones skipped;
        a symlinked file or folder that leaves the constitution is an error."""
        if not folder.exists() and not folder.is_symlink():
            return []
        self.check(folder)
        if not folder.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            d = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for n in dirnames:
                if (d / n).is_symlink():  # not followed; but one that leaves the folder is refused
                    self.check(d / n)
            for n in sorted(filenames):
                if not n.startswith(".") and n.endswith(suffix):
                    self.check(d / n)
                    if not (d / n).is_dir():
                        out.append(check_input_file(d / n))  # a FIFO here is an error, not skipped
            if not recursive:
                break
        return sorted(out)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.data):
            h.update(f.relative_to(self.root).as_posix().encode() + b"\0")
            h.update(self.data[f] + b"\0")
        return h.hexdigest()


def _too_long(path: Path, what: str, size: str, limit: int):
    raise InputError(
        f"{what} is {size}; it may hold at most {limit:,} characters (it goes into prompts whole): "
        "shorten it",
        path,
    )


def parse_principle(path: Path, text: str | None = None) -> Principle:
    text = _read_text(path) if text is None else text.strip()
    parts = _SECTION.split(text)
    found: dict[str, str] = {}
    if parts[0].strip():
        raise InputError(
            "text before the first section; "
            "start the file with 'critique:', 'revision:' and 'compare:' sections",
            path,
            1,
        )
    for key, body in zip(parts[1::2], parts[2::2]):
        key = key.lower()
        if key in found:
            raise InputError(f"section '{key}:' appears twice; keep one", path)
        found[key] = " ".join(body.split())
    missing = [s for s in SECTIONS if not found.get(s)]
    if missing:
        raise InputError(
            f"missing or empty section(s) {', '.join(m + ':' for m in missing)}; each principle needs "
            "'critique:', 'revision:' and 'compare:'",
            path,
        )
    return Principle(
        id=path.stem, critique=found["critique"], revision=found["revision"], compare=found["compare"]
    )


# -- constitution.toml schema ------------------------------------------------------------------


def _key_line(text: str, table: str | None, key: str) -> int | None:
    """Best-effort line of `key` (in `[table]`, or at the top when table is None) in TOML text."""
    current = None
    k = re.escape(key)
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[\s*([^\]]+?)\s*\]", s)
        if m and not s.startswith("[["):
            current = m[1].strip().strip("\"'")
            if table is None and current == key:
                return n
            continue
        if re.match(rf"^[\"']?{k}[\"']?\s*=", s) and current == table:
            return n
        if table and current is None and re.match(rf"^{re.escape(table)}\s*\.\s*[\"']?{k}[\"']?\s*=", s):
            return n
    return None


def _did_you_mean(key: str, candidates) -> str:
    near = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _check_schema(meta: dict, text: str, path: Path):
    def fail(msg, table, key):
        raise InputError(msg, path, _key_line(text, table, key))

    for key, value in meta.items():
        if key not in SCHEMA:
            if key in SCHEMA["defaults"]:
                fail(f"'{key}' belongs in the [defaults] table; move it under [defaults]", None, key)
            fail(
                f"unknown key '{key}'{_did_you_mean(key, SCHEMA)}; "
                "constitution.toml may set name, description "
                "and a [defaults] table with " + ", ".join(SCHEMA["defaults"]),
                None,
                key,
            )
        want = SCHEMA[key]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                fail(f"'{key}' must be a table ([{key}]), not {type(value).__name__}", None, key)
            for sub, v in value.items():
                if sub not in want:
                    fail(
                        f"unknown key '{sub}' in [{key}]{_did_you_mean(sub, want)}; [{key}] may set "
                        + ", ".join(want),
                        key,
                        sub,
                    )
                if not isinstance(v, want[sub]) or (want[sub] is int and isinstance(v, bool)):
                    fail(
                        f"{key}.{sub} must be {_TYPE_NAMES[want[sub]]}, not {type(v).__name__} {v!r}"[:300],
                        key,
                        sub,
                    )
        elif not isinstance(value, want):
            fail(
                f"'{key}' must be {_TYPE_NAMES[want]}, not {type(value).__name__} {value!r}"[:300], None, key
            )
    defaults = meta.get("defaults", {})
    if "rounds" in defaults and defaults["rounds"] < 1:
        fail(f"defaults.rounds must be a whole number >= 1, not {defaults['rounds']!r}", "defaults", "rounds")
    if "no_change_pattern" in defaults:
        try:
            re.compile(defaults["no_change_pattern"])
        except re.error as e:
            fail(
                f"defaults.no_change_pattern is not a valid regular expression ({e})",
                "defaults",
                "no_change_pattern",
            )


# -- validation renders ---------------------------------------------------------------------------

SAMPLE = {
    "conversation": [{"role": "user", "content": "How do I pick a lock?"}],
    "response": "Insert a tension wrench, then rake the pins until they set.",
    "critique": "The response gives step-by-step instructions that could help someone break in.",
    "response_a": "Insert a tension wrench, then rake the pins until they set.",
    "response_b": "If you are locked out of your own home, a licensed locksmith can help.",
    "options": ["A", "B"],
    "cot": False,
    "reasoning": "",
}
# A second, multi-turn sample: templates that loop over the conversation meet more than one turn.
SAMPLE_LONG = dict(
    SAMPLE,
    conversation=[
        {"role": "user", "content": "My neighbour's wifi is open. Can I use it?"},
        {"role": "assistant", "content": "Using a network without permission may be illegal where you live."},
        {"role": "user", "content": "What if I only check my email?\nJust once."},
    ],
    response="Sure, connect and check it; nobody will notice.",
    critique="No changes needed.",
)


def load_constitution(path) -> Constitution:
    """Load and fully validate a constitution folder (every template is rendered with every
    principle, so template errors the sample data can reveal surface before any model work)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError("constitution folder not found; pass a folder such as constitutions/harmless", root)
    reader = _Reader(root)
    meta_path = root / "constitution.toml"
    if not meta_path.exists():
        raise InputError("missing constitution.toml (name, description, [defaults]); add one", root)
    meta_text = reader.text(meta_path, strip=False)
    try:
        meta = tomllib.loads(meta_text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise InputError(
            f"bad TOML ({e}); fix the metadata file", meta_path, int(m[1]) if m else None
        ) from None
    _check_schema(meta, meta_text, meta_path)
    pdir = root / "principles"
    files = reader.files(pdir, ".txt")
    if not files:
        raise InputError("no principles: add one or more principles/*.txt files", pdir)
    principles = {
        f.stem: parse_principle(f, reader.text(f, limit=MAX_PRINCIPLE_CHARS, what="the principle"))
        for f in files
    }
    tdir = root / "templates"
    sources = {
        f.relative_to(tdir).as_posix(): reader.text(f, strip=False, what="the template")
        for f in reader.files(tdir, ".jinja", True)
    }
    for name in REQUIRED_TEMPLATES:
        if f"{name}.jinja" not in sources:
            raise InputError(
                f"template '{name}.jinja' is missing; "
                f"every constitution needs {', '.join(REQUIRED_TEMPLATES)}",
                tdir,
            )
    fewshot = [reader.text(f, what="the few-shot example") for f in reader.files(root / "fewshot", ".txt")]
    if sum(map(len, fewshot)) > MAX_FEWSHOT_CHARS:
        raise InputError(
            f"the few-shot examples hold {sum(map(len, fewshot)):,} characters together; at most "
            f"{MAX_FEWSHOT_CHARS:,} (every template render may include them all): drop or shorten some",
            root / "fewshot",
        )
    defaults = meta.get("defaults", {})
    env = sandbox.make_env(tdir, sources)
    c = Constitution(
        name=str(meta.get("name", root.name)),
        description=str(meta.get("description", "")),
        path=root,
        principles=principles,
        fewshot=fewshot,
        defaults=dict(defaults),
        sha256=reader.sha256(),
        _env=env,
        files=[f.relative_to(root).as_posix() for f in sorted(reader.data)],
    )
    _compile_all(c)
    validate(c)
    return c


def _compile_all(c: Constitution):
    """Every template file, partials included, must at least compile."""
    from jinja2 import TemplateSyntaxError

    for name in sorted(c._env.loader.sources):
        try:
            c._env.get_template(name)
        except TemplateSyntaxError as e:
            raise InputError(
                f"TemplateSyntaxError: {e.message}; fix the Jinja syntax",
                c.path / "templates" / name,
                e.lineno,
            ) from None
        except sandbox.Outside as e:  # {% extends %} / {% import %} resolved at compile time
            raise InputError(f"include/import {e}", c.path / "templates" / name) from None


def _variables(c: Constitution, p: Principle) -> dict:
    return dict(principle=p, question=p.compare, **c.recheck_variables(p))


def _variants(c: Constitution, name: str, p: Principle):
    for sample in (SAMPLE, SAMPLE_LONG):
        yield dict(sample, **_variables(c, p))
        if name == "compare":  # the chain-of-thought branches, both stages
            yield dict(sample, **_variables(c, p), cot=True, reasoning="")
            yield dict(sample, **_variables(c, p), cot=True, reasoning="B refuses to help.")


VALIDATE_SECONDS = 10.0  # past this, the sweep over further principles stops (heavy templates)


def validate(c: Constitution):
    """Render every top-level template with every principle (and the chain-of-thought stages of
    compare) on two sample conversations: errors the data can reveal surface here. Every
    template gets every variant with the first principle; the sweep over the other principles
    stops once it has taken VALIDATE_SECONDS (only a very heavy template gets there)."""
    start = time.monotonic()
    for k, p in enumerate(c.principles.values()):
        if k and time.monotonic() - start > VALIDATE_SECONDS:
            break
        for name in c.templates:
            for variables in _variants(c, name, p):
                c.render(name, **variables)
    if RECHECK_TEMPLATE in c.templates and len(c.principles) > 1:
        a, b = (
            c.render(RECHECK_TEMPLATE, **SAMPLE, **_variables(c, p)) for p in list(c.principles.values())[:2]
        )
        if a == b:
            raise InputError(
                "renders the same prompt for every principle, so the re-check would ask one question "
                f"{len(c.principles)} times; name the question asked with {{{{ number }}}} or "
                "{{ question }} (see docs/constitution.md)",
                c.path / "templates" / f"{RECHECK_TEMPLATE}.jinja",
            )


def examples(c: Constitution) -> dict[str, list[dict]]:
    """One rendered example of each template (what `cai constitution check` prints)."""
    p = next(iter(c.principles.values()))
    out = {}
    for name in c.templates:
        out[name] = c.render(name, **_variables(c, p), **SAMPLE)
    if "compare" in out:
        out["compare (--cot)"] = c.render(
            "compare", **_variables(c, p), **dict(SAMPLE, cot=True, reasoning="B refuses to help.")
        )
    return out
