"""Load, validate and render a constitution folder.

    constitutions/NAME/
      constitution.toml        name, description, [defaults]
      principles/*.txt         one principle per file: "critique:", "revision:", "compare:" sections
      templates/*.jinja        critique, revision, compare (+ any others): chat messages
      fewshot/*.txt            optional few-shot examples, exposed to templates as `fewshot`

Templates produce chat messages with call blocks::

    {{ chat(conversation) }}                       the conversation so far, turn by turn
    {% call message("user") %} ... {% endcall %}   one more message
    {{ conversation | transcript }}                the conversation as Human:/Assistant: text

A trailing assistant message is a prefix the model continues (e.g. ``The answer is: (``).
A template with no message blocks renders to a single user message. Templates run in Jinja's
sandbox with StrictUndefined: an unknown variable or a reach into Python internals is an error
naming the template file and line.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import InputError
from cai.records import to_transcript

REQUIRED_TEMPLATES = ("critique", "revision", "compare")
SECTIONS = ("critique", "revision", "compare")
_SECTION = re.compile(r"^(critique|revision|compare)\s*:\s?", re.IGNORECASE | re.MULTILINE)


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

    # -- templates -------------------------------------------------------------------

    def has_template(self, name: str) -> bool:
        return (self.path / "templates" / f"{name}.jinja").exists()

    def render(self, name: str, **variables) -> list[dict]:
        """Render ``templates/<name>.jinja`` into chat messages."""
        return _render(self._env, self.path / "templates", name, dict(fewshot=self.fewshot, **variables))

    def provenance(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path)}


# ------------------------------------------------------------------------------ rendering


class _Collector:
    def __init__(self):
        self.messages: list[dict] = []

    def message(self, role, caller=None):
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, not {role!r}")
        self.messages.append({"role": role, "content": caller().strip() if caller else ""})
        return ""

    def chat(self, conversation):
        for m in conversation:
            self.messages.append({"role": m["role"], "content": m["content"]})
        return ""


def _make_env(template_dir: Path):
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(str(template_dir)),
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["transcript"] = lambda msgs: to_transcript(msgs).strip()
    return env


def _template_location(exc: BaseException, template_dir: Path) -> tuple[Path | None, int | None]:
    """Find the template file and line in a (Jinja-rewritten) traceback."""
    import traceback

    lineno = getattr(exc, "lineno", None)
    fname = getattr(exc, "filename", None)
    if fname and lineno:
        return Path(fname), lineno
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename and frame.filename.endswith(".jinja"):
            return Path(frame.filename), frame.lineno
    return None, None


def _render(env, template_dir: Path, name: str, variables: dict) -> list[dict]:
    from jinja2 import TemplateError, TemplateNotFound

    col = _Collector()
    try:
        tpl = env.get_template(f"{name}.jinja")
        text = tpl.render(message=col.message, chat=col.chat, **variables)
    except TemplateNotFound:
        raise InputError(f"template '{name}.jinja' is missing; add it", template_dir) from None
    except (TemplateError, ValueError, TypeError, AttributeError) as e:
        path, line = _template_location(e, template_dir)
        kind = type(e).__name__
        hint = {
            "UndefinedError": "use only the variables documented in docs/constitution.md",
            "SecurityError": "templates run sandboxed and cannot reach Python internals",
            "TemplateSyntaxError": "fix the Jinja syntax",
        }.get(kind, "fix the template")
        raise InputError(f"{kind}: {e}; {hint}", path or template_dir / f"{name}.jinja", line) from None
    if not col.messages:
        col.messages.append({"role": "user", "content": text.strip()})
    elif text.strip():
        raise InputError(
            "text outside {% call message(...) %} blocks; put every line inside a message block",
            template_dir / f"{name}.jinja",
        )
    return col.messages


# ------------------------------------------------------------------------------ loading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text; save the file as UTF-8", path) from None


def parse_principle(path: Path) -> Principle:
    text = _read_text(path)
    parts = _SECTION.split(text)
    found: dict[str, str] = {}
    if parts[0].strip():
        raise InputError(
            "text before the first section; start the file with 'critique:', 'revision:' and 'compare:' sections",
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
    return Principle(id=path.stem, critique=found["critique"], revision=found["revision"], compare=found["compare"])


def _hash_folder(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


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


def load_constitution(path) -> Constitution:
    """Load and fully validate a constitution folder (every template is rendered once)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError("constitution folder not found; pass a folder such as constitutions/harmless", root)
    meta_path = root / "constitution.toml"
    meta: dict = {}
    if meta_path.exists():
        try:
            meta = tomllib.loads(_read_text(meta_path))
        except tomllib.TOMLDecodeError as e:
            line = getattr(e, "lineno", None)
            m = re.search(r"line (\d+)", str(e))
            raise InputError(f"bad TOML ({e}); fix the metadata file", meta_path, line or (int(m[1]) if m else None)) from None
    else:
        raise InputError("missing constitution.toml (name, description, [defaults]); add one", root)
    pdir = root / "principles"
    files = sorted(p for p in pdir.glob("*.txt")) if pdir.is_dir() else []
    if not files:
        raise InputError("no principles: add one or more principles/*.txt files", pdir)
    principles = {f.stem: parse_principle(f) for f in files}
    tdir = root / "templates"
    for name in REQUIRED_TEMPLATES:
        if not (tdir / f"{name}.jinja").exists():
            raise InputError(f"template '{name}.jinja' is missing; every constitution needs {', '.join(REQUIRED_TEMPLATES)}", tdir)
    fdir = root / "fewshot"
    fewshot_files = sorted(fdir.glob("*.txt")) if fdir.is_dir() else []
    fewshot = [_read_text(f) for f in fewshot_files]
    hashed = [meta_path, *files, *sorted(tdir.rglob("*.jinja")), *fewshot_files]
    defaults = meta.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError("[defaults] must be a table of settings", meta_path)
    if "rounds" in defaults and (not isinstance(defaults["rounds"], int) or defaults["rounds"] < 0):
        raise InputError(f"defaults.rounds must be a whole number >= 0, not {defaults['rounds']!r}", meta_path)
    try:
        re.compile(defaults.get("no_change_pattern", ""))
    except re.error as e:
        raise InputError(f"defaults.no_change_pattern is not a valid regular expression ({e})", meta_path) from None
    c = Constitution(
        name=str(meta.get("name", root.name)),
        description=str(meta.get("description", "")),
        path=root,
        principles=principles,
        fewshot=fewshot,
        defaults=dict(defaults),
        sha256=_hash_folder(root, hashed),
        _env=_make_env(tdir),
    )
    examples(c)  # render every template once so errors surface before any model work
    return c


def examples(c: Constitution) -> dict[str, list[dict]]:
    """One rendered example of each template (what `cai constitution check` prints)."""
    p = next(iter(c.principles.values()))
    out = {}
    for t in sorted((c.path / "templates").glob("*.jinja")):
        out[t.stem] = c.render(t.stem, principle=p, question=p.compare, **SAMPLE)
    if "compare" in out:  # the chain-of-thought branches too, both stages
        c.render("compare", principle=p, question=p.compare, **dict(SAMPLE, cot=True, reasoning=""))
        out["compare (--cot)"] = c.render(
            "compare", principle=p, question=p.compare, **dict(SAMPLE, cot=True, reasoning="B refuses to help.")
        )
    return out


if sys.version_info < (3, 11):  # pragma: no cover
    raise ImportError("cai needs Python 3.11+ (tomllib)")
