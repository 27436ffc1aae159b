"""Load, validate and render a constitution folder.

    constitutions/NAME/
      constitution.toml        name, description, [defaults]  (a fixed schema: unknown keys are errors)
      principles/*.txt         one principle per file: "critique:", "revision:", "compare:" sections
      templates/*.jinja        critique, revision, compare (+ any others): chat messages
      templates/**/*.jinja     partials a template may include / import
      fewshot/*.txt            optional few-shot examples, exposed to templates as `fewshot`

Templates produce chat messages with call blocks::

    {{ chat(conversation) }}                       the conversation so far, turn by turn
    {% call message("user") %} ... {% endcall %}   one more message
    {{ conversation | transcript }}                the conversation as Human:/Assistant: text

A trailing assistant message is a prefix the model continues (e.g. ``The answer is: (``).
A template with no message blocks renders to a single user message.

Confinement: every file is read once at load, from inside the folder only (a symlink that
resolves outside it is refused), hashed into ``sha256`` from the very bytes that are used, and
templates are served from that in-memory copy: an include or import can name only a
``templates/**/*.jinja`` file by a relative path, never an absolute or ``..`` path.

Templates run in Jinja's immutable sandbox with StrictUndefined and with caps on what one render
may do (characters produced, range sizes, loop steps and calls, macro nesting, time); any error
while rendering (an unknown variable, 1/0, a cap) is an InputError naming the template file and
line.
"""

from __future__ import annotations

import codecs
import contextvars
import difflib
import functools
import hashlib
import math
import os
import random
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import InputError
from cai.records import check_input_file, to_transcript

REQUIRED_TEMPLATES = ("critique", "revision", "compare")
RECHECK_TEMPLATE = "recheck"  # optional: the re-check judge (`--recheck`), else compare per principle
SECTIONS = ("critique", "revision", "compare")
_SECTION = re.compile(r"^(critique|revision|compare)\s*:\s?", re.IGNORECASE | re.MULTILINE)

# What one render may do. A real prompt is far below every cap; a runaway template hits one
# quickly and deterministically instead of hanging or exhausting memory.
MAX_RENDER_CHARS = 1_000_000  # characters one render (or any value inside it) may hold
MAX_RANGE = 100_000  # items in one range()
MAX_STEPS = 1_000_000  # loop iterations + calls in one render
MAX_DEPTH = 50  # macros nested inside macros (a recursive macro stops here)
MAX_SECONDS = 10.0  # wall-clock time of one render

# What one file may hold, checked when it is read (naming the file), far below the render cap:
# a principle, the few-shot examples and a prompt (records.MAX_TEXT_CHARS) all fit one render.
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

    def has_template(self, name: str) -> bool:
        return f"{name}.jinja" in self._env.loader.sources

    def render(self, name: str, **variables) -> list[dict]:
        """Render ``templates/<name>.jinja`` into chat messages (InputError on any failure)."""
        return _render(self._env, self.path / "templates", name, dict(fewshot=self.fewshot, **variables))

    def provenance(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path)}


# ------------------------------------------------------------------------------ the sandbox


class _Limit(Exception):
    """A render went past one of the caps above."""


class _Outside(Exception):
    """An include/import named a file outside the constitution's templates."""


class _Budget:
    def __init__(self):
        self.steps = 0
        self.depth = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self, n: int = 1):
        self.steps += n
        if self.steps > MAX_STEPS:
            raise _Limit(f"more than {MAX_STEPS:,} loop steps and calls in one render (a runaway loop?)")
        if self.steps % 1024 < n and time.monotonic() > self.deadline:
            raise _Limit(f"rendering took longer than {MAX_SECONDS:.0f} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("cai_template_budget", default=None)


def _step(n: int = 1):
    b = _BUDGET.get()
    if b is not None:
        b.step(n)


def _size(value, what: str = "a value"):
    """Refuse a string or collection bigger than one render may hold; return it otherwise."""
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset, range)):
        n = len(value)
        if n > MAX_RENDER_CHARS:
            unit = "characters" if isinstance(value, (str, bytes)) else "items"
            raise _Limit(f"{what} of {n:,} {unit}; one render may hold at most {MAX_RENDER_CHARS:,}")
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4096:
        raise _Limit(f"{what} is a number of {value.bit_length():,} bits; too large for a template")
    return value


# widths and precisions in %-formats and {:...} format specs
_WIDTHS = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?[a-zA-Z%]|\{[^{}:]*:[^{}\d]*(\d*)(?:\.(\d+))?[^{}]*\}")


def _check_format(fmt):
    """A format string whose widths/precisions add up past the cap would build too long a string."""
    if isinstance(fmt, str) and ("%" in fmt or "{" in fmt):
        total = sum(int(n) for m in _WIDTHS.finditer(fmt) for n in m.groups() if n)
        if total > MAX_RENDER_CHARS:
            raise _Limit(
                f"format widths and precisions adding up to {total:,}; one render may hold at most "
                f"{MAX_RENDER_CHARS:,} characters"
            )


def _check_growth(what: str, pieces: int, piece: int):
    """Refuse an operation that would make `pieces` copies of something `piece` long, past the cap."""
    if pieces * piece > MAX_RENDER_CHARS:
        raise _Limit(
            f"{what} would make more than {MAX_RENDER_CHARS:,} characters; one render may hold at most that"
        )


def _check_multiplying(name: str, value, args, kwargs):
    """join, indent and expandtabs multiply one input by another: check before building."""
    if name == "join" and isinstance(value, str) and args and isinstance(args[0], (list, tuple)):
        _check_growth("join()", len(args[0]), len(value))  # str.join(list)
    elif name == "join" and isinstance(value, (list, tuple, str)):
        sep = args[0] if args else kwargs.get("d", "")
        if isinstance(sep, str):
            _check_growth("join", len(value), len(sep))
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_growth("indent", value.count("\n") + 1, width)
    elif name == "expandtabs" and isinstance(value, str):
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_growth("expandtabs()", value.count("\t"), size)


def _check_args(what: str, args, kwargs):
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_RENDER_CHARS:
            raise _Limit(f"{what} was given {v:,}; numbers above {MAX_RENDER_CHARS:,} are refused here")
        _size(v, f"an argument to {what}")


def _check_replace(text=None, old=None, new=None, *_):
    """str.replace / |replace: refuse before building a string past the cap."""
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        count = text.count(old) if old else len(text) + 1
        if len(text) + count * (len(new) - len(old)) > MAX_RENDER_CHARS:
            raise _Limit(
                f"replace() would make more than {MAX_RENDER_CHARS:,} characters; "
                "one render may hold at most that"
            )


def _range(*args):
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > 10**18:
            raise _Limit("range() bound too large")
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _Limit(f"range() of {len(r):,} items; one range may hold at most {MAX_RANGE:,}")
    return r


def _counted(iterable):
    """Wraps the iterable of every {% for %}: each iteration counts against the budget."""
    for item in iterable:
        _step()
        yield item


def _guard_filter(name: str, fn):
    @functools.wraps(fn)  # keeps jinja_pass_arg (pass_context & co.)
    def guarded(*args, **kwargs):
        # numbers given to a filter (after the value filtered) are capped: center(10**10) & co.
        _check_args(f"filter '{name}'", [a for a in args[1:] if isinstance(a, int)], kwargs)
        if name == "format" and args:
            _check_format(args[0] if isinstance(args[0], str) else args[1] if len(args) > 1 else None)
        if name == "replace":  # value, old, new (after the eval context)
            _check_replace(*[a for a in args if isinstance(a, str)][:3])
        if name in ("join", "indent"):
            rest = [a for a in args if not hasattr(a, "environment") and not hasattr(a, "autoescape")]
            if rest:
                _check_multiplying(name, rest[0], rest[1:], kwargs)
        return _size(fn(*args, **kwargs), f"filter '{name}' produced a value")

    return guarded


def _make_env(template_dir: Path, sources: dict[str, str]):
    from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.runtime import Macro, Namespace
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class ConfinedLoader(BaseLoader):
        """Serves the templates read (and hashed) at load; nothing else, nothing outside."""

        def __init__(self):
            self.sources = sources

        def get_source(self, environment, template):
            name = _template_name(template)
            if name not in self.sources:
                raise TemplateNotFound(template)
            return self.sources[name], str(template_dir / name), lambda: True

        def list_templates(self):
            return sorted(self.sources)

    class Generator(CodeGenerator):
        def visit_Template(self, node, frame=None):
            for loop in node.find_all(nodes.For):  # every loop iteration counts against the budget
                if not (isinstance(loop.iter, nodes.Filter) and loop.iter.name == "cai_counted"):
                    loop.iter = nodes.Filter(loop.iter, "cai_counted", [], [], None, None, lineno=loop.lineno)
            super().visit_Template(node, frame)

        def visit_Concat(self, node, frame):  # `a ~ b`: the joined string is checked
            self.write("environment.cai_size(")
            super().visit_Concat(node, frame)
            self.write(")")

    class SafeNamespace(Namespace):
        def __setitem__(self, name, value):
            super().__setitem__(name, _size(value, f"namespace value '{name}'"))

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})

        def cai_size(self, value):
            return _size(value, "a joined string")

        def call_binop(self, context, operator, left, right):
            _step()
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    if len(seq) * max(n, 0) > MAX_RENDER_CHARS:
                        raise _Limit(
                            f"repeating a value {n:,} times gives more than {MAX_RENDER_CHARS:,} "
                            "characters/items; one render may hold at most that"
                        )
            elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 4096:
                    raise _Limit(f"{left!r} ** {right!r} is too large a number for a template")
            elif operator == "%":
                _check_format(left)
            return _size(super().call_binop(context, operator, left, right), f"the result of '{operator}'")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own spelling)
            b = _BUDGET.get()
            _step()
            target = getattr(__obj, "__wrapped__", __obj)
            owner = getattr(target, "__self__", None)
            if isinstance(owner, (str, bytes, list, tuple, dict)):  # str.center(10**9) & co.
                _check_args(f"'{getattr(target, '__name__', 'method')}'", args, kwargs)
                if getattr(target, "__name__", "") in ("format", "format_map"):
                    _check_format(owner)
                if getattr(target, "__name__", "") == "replace":
                    _check_replace(owner, *args)
                _check_multiplying(getattr(target, "__name__", ""), owner, args, kwargs)
            if isinstance(__obj, Macro) and b is not None:
                b.depth += 1
                try:
                    if b.depth > MAX_DEPTH:
                        raise _Limit(
                            f"macros nested more than {MAX_DEPTH} deep (a macro that calls itself "
                            "without end?)"
                        )
                    result = super().call(__context, __obj, *args, **kwargs)
                finally:
                    b.depth -= 1
            else:
                result = super().call(__context, __obj, *args, **kwargs)
            return _size(result, "a call's result")

    env = Env(
        loader=ConfinedLoader(),
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        optimized=False,  # nothing is evaluated at compile time, outside the caps
        cache_size=-1,
    )
    env.filters["transcript"] = lambda msgs: to_transcript(msgs).strip()
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters["cai_counted"] = _counted
    env.globals["range"] = _range
    env.globals["namespace"] = SafeNamespace
    env.globals.pop("lipsum", None)  # lipsum(10**6) would write for minutes; templates have no use for it
    env.concat = lambda parts: _size("".join(_sized_parts(parts)), "the rendered text")
    return env


def _sized_parts(parts):
    total = 0
    for p in parts:
        total += len(p)
        if total > MAX_RENDER_CHARS:
            raise _Limit(f"the template produced more than {MAX_RENDER_CHARS:,} characters")
        yield p


def _template_name(template) -> str:
    """A template name as includes/imports give it -> its key under templates/ (or _Outside)."""
    if not isinstance(template, str) or not template.strip():
        raise _Outside(f"{template!r} is not a template name")
    if (
        template.startswith(("/", "\\", "~"))
        or "\\" in template
        or "\0" in template
        or re.match(r"^[A-Za-z]:", template)
    ):
        raise _Outside(f"'{template}' is outside the constitution: an absolute path")
    parts = [p for p in template.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Outside(f"'{template}' is outside the constitution: '..' leaves the templates/ folder")
    name = "/".join(parts)
    if not name.endswith(".jinja"):
        raise _Outside(
            f"'{template}' is not a template: only templates/**/*.jinja files can be included or imported"
        )
    return name


class _Collector:
    def __init__(self):
        self.messages: list[dict] = []
        self.chars = 0

    def _add(self, role, content):
        if not isinstance(content, str):
            raise TypeError(f"message content must be text, not {type(content).__name__}")
        self.chars += len(content)
        if self.chars > MAX_RENDER_CHARS:
            raise _Limit(f"the messages hold more than {MAX_RENDER_CHARS:,} characters")
        self.messages.append({"role": role, "content": content})

    def message(self, role, caller=None):
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, not {role!r}")
        self._add(role, caller().strip() if caller else "")
        return ""

    def chat(self, conversation):
        if not isinstance(conversation, (list, tuple)):
            raise TypeError(f"chat() takes a list of messages, not {type(conversation).__name__}")
        for m in conversation:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TypeError("chat() takes messages with 'role' and 'content'")
            self._add(m["role"], m["content"])
        return ""


def _template_location(exc: BaseException) -> tuple[Path | None, int | None]:
    """Find the template file and line in a (Jinja-rewritten) traceback: the innermost one."""
    import traceback

    lineno = getattr(exc, "lineno", None)
    fname = getattr(exc, "filename", None)
    if fname and lineno:
        return Path(fname), lineno
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename and frame.filename.endswith(".jinja"):
            return Path(frame.filename), frame.lineno
    return None, None


_HINTS = {
    "UndefinedError": "use only the variables documented in docs/constitution.md",
    "SecurityError": "templates run sandboxed and cannot reach Python internals",
    "TemplateSyntaxError": "fix the Jinja syntax",
}


def _render(env, template_dir: Path, name: str, variables: dict) -> list[dict]:
    from jinja2 import TemplateNotFound

    col = _Collector()
    token = _BUDGET.set(_Budget())
    try:
        tpl = env.get_template(f"{name}.jinja")
        text = tpl.render(message=col.message, chat=col.chat, **variables)
    except InputError:
        raise
    except TemplateNotFound as e:
        path, line = _template_location(e)
        if path is None:  # the template itself
            raise InputError(f"template '{name}.jinja' is missing; add it", template_dir) from None
        raise InputError(
            f"included template '{e.name}' not found in {template_dir}; check the name "
            "(relative to templates/)",
            path,
            line,
        ) from None
    except _Outside as e:
        path, line = _template_location(e)
        raise InputError(
            f"include/import {e}; a template may include or import only .jinja files inside "
            "its templates/ folder, by a relative path such as 'parts/header.jinja'",
            path or template_dir / f"{name}.jinja",
            line,
        ) from None
    except _Limit as e:
        path, line = _template_location(e)
        raise InputError(
            f"render limit: {e}; simplify the template", path or template_dir / f"{name}.jinja", line
        ) from None
    except (RecursionError, MemoryError) as e:
        path, line = _template_location(e)
        what = (
            "recursion too deep (a template or macro that includes or calls itself?)"
            if isinstance(e, RecursionError)
            else "out of memory (the template builds too large a value)"
        )
        raise InputError(
            f"render limit: {what}; simplify the template", path or template_dir / f"{name}.jinja", line
        ) from None
    except Exception as e:  # any other error while rendering is the template's: 1/0, a bad call, ...
        path, line = _template_location(e)
        kind = type(e).__name__
        msg = " ".join(str(e).split())[:300]
        raise InputError(
            f"{kind}: {msg}; {_HINTS.get(kind, 'fix the template')}",
            path or template_dir / f"{name}.jinja",
            line,
        ) from None
    finally:
        _BUDGET.reset(token)
    if not col.messages:
        col.messages.append({"role": "user", "content": text.strip()})
    elif text.strip():
        raise InputError(
            "text outside {% call message(...) %} blocks; put every line inside a message block",
            template_dir / f"{name}.jinja",
        )
    return col.messages


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
    env = _make_env(tdir, sources)
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
        except _Outside as e:  # {% extends %} / {% import %} resolved at compile time
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
    if c.has_template(RECHECK_TEMPLATE) and len(c.principles) > 1:
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
