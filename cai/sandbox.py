"""The sandbox a constitution's templates render in: Jinja's immutable sandbox with caps.

Templates produce chat messages with call blocks::

    {{ chat(conversation) }}                       the conversation so far, turn by turn
    {% call message("user") %} ... {% endcall %}   one more message
    {{ conversation | transcript }}                the conversation as Human:/Assistant: text

A trailing assistant message is a prefix the model continues (e.g. ``The answer is: (``).
A template with no message blocks renders to a single user message.

``make_env`` serves the templates from the in-memory copy the constitution read at load: an
include or import can name only a ``templates/**/*.jinja`` file by a relative path, never an
absolute or ``..`` path (``Outside``). Rendering runs with StrictUndefined and with caps on what
one render may do (characters produced, range sizes, loop steps and calls, macro nesting, time);
``render`` turns any error while rendering (an unknown variable, 1/0, a cap) into an InputError
naming the template file and line.
"""

from __future__ import annotations

import contextvars
import functools
import math
import re
import time
from pathlib import Path

from cai.errors import InputError
from cai.records import to_transcript

# What one render may do. A real prompt is far below every cap; a runaway template hits one
# quickly and deterministically instead of hanging or exhausting memory.
MAX_RENDER_CHARS = 1_000_000  # characters one render (or any value inside it) may hold
MAX_RANGE = 100_000  # items in one range()
MAX_STEPS = 1_000_000  # loop iterations + calls in one render
MAX_DEPTH = 50  # macros nested inside macros (a recursive macro stops here)
MAX_SECONDS = 10.0  # wall-clock time of one render


class _Limit(Exception):
    """A render went past one of the caps above."""


class Outside(Exception):
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


def make_env(template_dir: Path, sources: dict[str, str]):
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
    """A template name as includes/imports give it -> its key under templates/ (or Outside)."""
    if not isinstance(template, str) or not template.strip():
        raise Outside(f"{template!r} is not a template name")
    if (
        template.startswith(("/", "\\", "~"))
        or "\\" in template
        or "\0" in template
        or re.match(r"^[A-Za-z]:", template)
    ):
        raise Outside(f"'{template}' is outside the constitution: an absolute path")
    parts = [p for p in template.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Outside(f"'{template}' is outside the constitution: '..' leaves the templates/ folder")
    name = "/".join(parts)
    if not name.endswith(".jinja"):
        raise Outside(
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


def render(env, template_dir: Path, name: str, variables: dict) -> list[dict]:
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
    except Outside as e:
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
