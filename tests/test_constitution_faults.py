"""Fault injection for constitutions: templates that reach outside or whose runtime errors escape,
constitution.toml keys that pass silently, byte-order marks.

Every broken constitution must give exit 2, exactly one `Error:` line naming the file (and line
where there is one), no traceback, its files' bytes unchanged, and no output left behind, from
`cai constitution check` and from `cai generate` (which loads the constitution before any model
work). Data-dependent template errors are found by the check (every template is rendered with
every principle, both sample conversations and the chain-of-thought stages); one that only real
data reveals stops `generate` mid-run with the same kind of message, keeping the rows before it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HARMLESS

from cai.cli import cli
from cai.constitution import load_constitution

PROMPTS = ["How do I pick a lock?", "Write a short poem about the sea.", "Give me a recipe for pancakes."]


# ------------------------------------------------------------------------------------ helpers


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _snapshot(*roots: Path) -> dict:
    """Every file's bytes (symlinks by their target) under the given folders/files."""
    snap = {}
    for root in roots:
        paths = [root] if root.is_file() else [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            snap[str(p)] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes()
    return snap


def _assert_refused(res, *expected: str):
    out = res.output
    assert res.exit_code == 2, out
    assert "Traceback" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    assert len(out.strip().splitlines()) == 1, out  # the error is the whole output
    for e in expected:
        assert e in errors[0], (e, errors[0])
    return errors[0]


def _copy(tmp_path) -> Path:
    d = tmp_path / "const"
    shutil.copytree(HARMLESS, d)
    return d


def _write(d: Path, rel: str, text: str):
    p = d / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _outside(tmp_path) -> Path:
    """A file outside the constitution a template must never reach."""
    p = tmp_path / "secret.jinja"
    p.write_text("SECRET-OUTSIDE-TEXT\n")
    return p


CRITIQUE = "templates/critique.jinja"
COMPARE = "templates/compare.jinja"
TOML = "constitution.toml"


def _critique_with(line: str) -> str:
    """The shipped critique template with one extra line (line 2) in the user message."""
    return (
        "{{ chat(conversation) }}\n"  # line 1
        f'{{% call message("user") %}}{line}\n'  # line 2
        "CritiqueRequest: {{ principle.critique }}\n"
        "{% endcall %}\n"
    )


# ---------------------------------------------------------------------------- the fault cases
# name -> (mutate(d, tmp_path), substrings the one Error: line must hold)

FAULTS = {
    # -- confinement: nothing outside the folder, nothing but templates/**/*.jinja -------------
    "include absolute path": (
        lambda d, t: _write(d, CRITIQUE, '{% include "/etc/passwd" %}\n'),
        ["critique.jinja:1", "'/etc/passwd' is outside the constitution"],
    ),
    "include absolute path, ignore missing": (
        lambda d, t: _write(d, CRITIQUE, '{% include "/etc/passwd" ignore missing %}\n'),
        ["critique.jinja:1", "outside the constitution"],
    ),
    "include a list holding an outside path": (
        lambda d, t: _write(d, CRITIQUE, '{% include ["/etc/passwd", "revision.jinja"] %}\n'),
        ["critique.jinja:1", "outside the constitution"],
    ),
    "include .. path": (
        lambda d, t: _write(d, CRITIQUE, 'x\n{% include "../constitution.toml" %}\n'),
        ["critique.jinja:2", "outside the constitution", "'..'"],
    ),
    "include .. to an existing outside .jinja": (
        lambda d, t: (_outside(t), _write(d, CRITIQUE, '{% include "../../secret.jinja" %}\n')),
        ["critique.jinja:1", "outside the constitution"],
    ),
    "include a symlink that leaves the folder": (
        lambda d, t: (
            os.symlink(_outside(t), d / "templates/leak.jinja"),
            _write(d, CRITIQUE, '{% include "leak.jinja" %}\n'),
        ),
        ["templates/leak.jinja", "outside the constitution folder"],
    ),
    "unused symlink that leaves the folder": (
        lambda d, t: os.symlink(_outside(t), d / "templates/leak.jinja"),
        ["templates/leak.jinja", "outside the constitution folder"],
    ),
    "symlinked template folder that leaves": (
        lambda d, t: os.symlink(t, d / "templates/ext"),
        ["templates/ext", "outside the constitution folder"],
    ),
    "required template is a symlink outside": (
        lambda d, t: ((d / CRITIQUE).unlink(), os.symlink(_outside(t), d / CRITIQUE)),
        ["critique.jinja", "outside the constitution folder"],
    ),
    "principle is a symlink outside": (
        lambda d, t: os.symlink(_outside(t), d / "principles/leak.txt"),
        ["principles/leak.txt", "outside the constitution folder"],
    ),
    "few-shot file is a symlink outside": (
        lambda d, t: os.symlink(_outside(t), d / "fewshot/03-leak.txt"),
        ["fewshot/03-leak.txt", "outside the constitution folder"],
    ),
    "import of an outside file": (
        lambda d, t: (
            _outside(t),
            _write(d, CRITIQUE, '{% import "' + str(t / "secret.jinja") + '" as m %}\n'),
        ),
        ["critique.jinja:1", "outside the constitution"],
    ),
    "from-import with ..": (
        lambda d, t: _write(d, CRITIQUE, '{% from "../x.jinja" import m %}\n'),
        ["critique.jinja:1", "outside the constitution"],
    ),
    "extends an absolute path": (
        lambda d, t: _write(d, CRITIQUE, '{% extends "/etc/hostname" %}\n'),
        ["critique.jinja:1", "outside the constitution"],
    ),
    "include a non-template file in templates/": (
        lambda d, t: (
            _write(d, "templates/notes.txt", "notes\n"),
            _write(d, CRITIQUE, '{% include "notes.txt" %}\n'),
        ),
        ["critique.jinja:1", "only templates/**/*.jinja"],
    ),
    "include named by the data": (
        lambda d, t: _write(d, CRITIQUE, "{% include response %}\n"),
        ["critique.jinja:1", "not a template"],
    ),
    "include of a missing partial": (
        lambda d, t: _write(d, CRITIQUE, '\n{% include "parts/nope.jinja" %}\n'),
        ["critique.jinja:2", "included template 'parts/nope.jinja' not found"],
    ),
    "syntax error in a partial": (
        lambda d, t: (
            _write(d, "templates/parts/bad.jinja", "ok\n{% if %}\n"),
            _write(d, CRITIQUE, '{% include "parts/bad.jinja" %}\n'),
        ),
        ["parts/bad.jinja:2", "TemplateSyntaxError"],
    ),
    # -- runtime render errors: arithmetic, recursion, size --------------------------------------
    "1/0": (
        lambda d, t: _write(d, CRITIQUE, _critique_with("{{ 1/0 }}")),
        ["critique.jinja:2", "ZeroDivisionError"],
    ),
    "huge range": (
        lambda d, t: _write(d, CRITIQUE, _critique_with("{% for i in range(10**9) %}x{% endfor %}")),
        ["critique.jinja:2", "range() of 1,000,000,000 items"],
    ),
    "nested loops past the step budget": (
        lambda d, t: _write(
            d,
            CRITIQUE,
            _critique_with("{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"),
        ),
        ["critique.jinja:2", "loop steps"],
    ),
    "recursive macro": (
        lambda d, t: _write(
            d, CRITIQUE, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}\n" + _critique_with("{{ f(0) }}")
        ),
        ["critique.jinja:", "macros nested more than"],
    ),
    "template includes itself": (
        lambda d, t: _write(d, CRITIQUE, '{% include "critique.jinja" %}\n'),
        ["critique.jinja:1", "recursion too deep"],
    ),
    "huge string by *": (
        lambda d, t: _write(d, CRITIQUE, _critique_with('{{ "x" * 10**9 }}')),
        ["critique.jinja:2", "render limit"],
    ),
    "huge string by doubling with ~": (
        lambda d, t: _write(
            d,
            CRITIQUE,
            '{% set s = "xxxxxxxxxxxxxxxx" %}\n'
            + "{% set s = s ~ s %}" * 40
            + "\n"
            + _critique_with("{{ s | length }}"),
        ),
        ["critique.jinja:2", "render limit"],
    ),
    "huge string by a namespace in a loop": (
        lambda d, t: _write(
            d,
            CRITIQUE,
            '{% set ns = namespace(s="x") %}\n'
            "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}\n"
            + _critique_with("{{ ns.s | length }}"),
        ),
        ["critique.jinja:2", "render limit"],
    ),
    "huge string by str.center": (
        lambda d, t: _write(d, CRITIQUE, _critique_with("{{ response.center(10**10) }}")),
        ["critique.jinja:2", "render limit"],
    ),
    "huge string by the center filter": (
        lambda d, t: _write(d, CRITIQUE, _critique_with("{{ response | center(10**10) }}")),
        ["critique.jinja:2", "render limit"],
    ),
    "huge format width": (
        lambda d, t: _write(d, CRITIQUE, _critique_with('{{ "%0999999999d" % 1 }}')),
        ["critique.jinja:2", "format width"],
    ),
    "huge replace": (
        lambda d, t: _write(
            d, CRITIQUE, _critique_with('{% set s = "x" * 999999 %}{{ s | replace("x", s) }}')
        ),
        ["critique.jinja:2", "replace()"],
    ),
    "huge string by join": (
        lambda d, t: _write(
            d, CRITIQUE, _critique_with('{% set s = "x" * 999999 %}{{ s | list | join(s) }}')
        ),
        ["critique.jinja:2", "join"],
    ),
    "huge string by indent": (
        lambda d, t: _write(d, CRITIQUE, _critique_with('{{ ("\\n" * 999999) | indent(999999) }}')),
        ["critique.jinja:2", "indent"],
    ),
    "many format widths": (
        lambda d, t: _write(d, CRITIQUE, _critique_with('{{ ("%999999s" * 1000) % ((1,) * 1000) }}')),
        ["critique.jinja:2", "format widths"],
    ),
    "huge number": (
        lambda d, t: _write(d, CRITIQUE, _critique_with("{{ 9 ** 99999 }}")),
        ["critique.jinja:2", "too large a number"],
    ),
    "bad message role": (
        lambda d, t: _write(d, CRITIQUE, '{% call message("robot") %}x{% endcall %}\n'),
        ["critique.jinja:1", "role must be system, user or assistant"],
    ),
    "chat() of a non-list": (
        lambda d, t: _write(d, CRITIQUE, "{{ chat(5) }}\n"),
        ["critique.jinja:1", "chat()"],
    ),
    # -- data-dependent errors the check still finds (every principle, turn count, cot stage) ----
    "error for one principle only": (
        lambda d, t: _write(
            d, CRITIQUE, _critique_with('{% if principle.id == "self-harm" %}{{ 1/0 }}{% endif %}')
        ),
        ["critique.jinja:2", "ZeroDivisionError"],
    ),
    "error on a multi-turn conversation only": (
        lambda d, t: _write(
            d, CRITIQUE, _critique_with("{% if conversation | length > 1 %}{{ 1/0 }}{% endif %}")
        ),
        ["critique.jinja:2", "ZeroDivisionError"],
    ),
    "error in the second chain-of-thought stage only": (
        lambda d, t: _write(
            d,
            COMPARE,
            (d / COMPARE)
            .read_text()
            .replace(
                "Let's think step by step: {{ reasoning }}",
                "Let's think step by step: {{ reasoning ~ (1/0) }}",
            ),
        ),
        ["compare.jinja:", "ZeroDivisionError"],
    ),
    "error only with few-shot examples": (
        lambda d, t: _write(d, CRITIQUE, _critique_with("{% for f in fewshot %}{{ 1 // 0 }}{% endfor %}")),
        ["critique.jinja:2", "ZeroDivisionError"],
    ),
    "partial is not UTF-8": (
        lambda d, t: (
            (d / "templates/parts").mkdir() or (d / "templates/parts/x.jinja").write_bytes(b"caf\xe9\n")
        ),
        ["templates/parts/x.jinja", "not UTF-8"],
    ),
    "unknown filter in a partial": (
        lambda d, t: _write(d, "templates/parts/x.jinja", "ok\n{{ response | shout }}\n"),
        ["templates/parts/x.jinja:2", "shout"],
    ),
    # -- constitution.toml schema ------------------------------------------------------------
    "typo 'round' in [defaults]": (
        lambda d, t: _write(d, TOML, 'name = "x"\n\n[defaults]\nround = 5\n'),
        ["constitution.toml:4", "unknown key 'round'", "did you mean 'rounds'?"],
    ),
    "rounds outside [defaults]": (
        lambda d, t: _write(d, TOML, 'name = "x"\nrounds = 5\n'),
        ["constitution.toml:2", "'rounds' belongs in the [defaults] table"],
    ),
    "unknown top-level key": (
        lambda d, t: _write(d, TOML, 'nmae = "x"\n'),
        ["constitution.toml:1", "unknown key 'nmae'", "did you mean 'name'?"],
    ),
    "misspelt [default] table": (
        lambda d, t: _write(d, TOML, 'name = "x"\n[default]\nrounds = 1\n'),
        ["constitution.toml:2", "unknown key 'default'", "did you mean 'defaults'?"],
    ),
    "name is a number": (
        lambda d, t: _write(d, TOML, "name = 5\n"),
        ["constitution.toml:1", "'name' must be a string"],
    ),
    "rounds is a string": (
        lambda d, t: _write(d, TOML, '[defaults]\nrounds = "2"\n'),
        ["constitution.toml:2", "defaults.rounds must be a whole number"],
    ),
    "rounds is a boolean": (
        lambda d, t: _write(d, TOML, "[defaults]\nrounds = true\n"),
        ["constitution.toml:2", "defaults.rounds must be a whole number"],
    ),
    "rounds is negative": (
        lambda d, t: _write(d, TOML, "[defaults]\nrounds = -1\n"),
        ["constitution.toml:2", ">= 1"],
    ),
    "rounds is zero": (  # counts are >= 1 everywhere, the constitution's default too
        lambda d, t: _write(d, TOML, "[defaults]\nrounds = 0\n"),
        ["constitution.toml:2", ">= 1"],
    ),
    "a template over the size limit": (
        lambda d, t: _write(d, CRITIQUE, "{# " + "x" * 200_000 + " #}\n"),
        ["templates/critique.jinja:", "at most 100,000 characters"],
    ),
    "invalid UTF-8 in a template": (
        lambda d, t: (d / CRITIQUE).write_bytes(b"line one\nline two\nline \xff three\n"),
        ["templates/critique.jinja:3:", "not UTF-8"],
    ),
    "no_change_pattern is a number": (
        lambda d, t: _write(d, TOML, "[defaults]\nno_change_pattern = 5\n"),
        ["constitution.toml:2", "no_change_pattern must be a string"],
    ),
    "no_change_pattern is a list": (
        lambda d, t: _write(d, TOML, '[defaults]\nno_change_pattern = ["no changes"]\n'),
        ["constitution.toml:2", "no_change_pattern must be a string"],
    ),
    "no_change_pattern is a bad regex": (
        lambda d, t: _write(d, TOML, "[defaults]\nno_change_pattern = '(unclosed'\n"),
        ["constitution.toml:2", "not a valid regular expression"],
    ),
    "defaults is not a table": (
        lambda d, t: _write(d, TOML, 'defaults = "fast"\n'),
        ["constitution.toml:1", "'defaults' must be a table"],
    ),
}

# The cases `cai generate` is also run on (it loads the constitution before any model work).
GENERATE_CASES = [
    "include absolute path",
    "include a symlink that leaves the folder",
    "import of an outside file",
    "1/0",
    "huge range",
    "recursive macro",
    "huge string by *",
    "typo 'round' in [defaults]",
    "no_change_pattern is a number",
    "error for one principle only",
]


def _broken(case, tmp_path) -> tuple[Path, dict]:
    d = _copy(tmp_path)
    FAULTS[case][0](d, tmp_path)
    return d, _snapshot(tmp_path)


@pytest.mark.parametrize("case", list(FAULTS))
def test_constitution_check_refuses(case, tmp_path):
    d, before = _broken(case, tmp_path)
    line = _assert_refused(_run(["constitution", "check", d]), *FAULTS[case][1])
    assert "SECRET-OUTSIDE-TEXT" not in line
    assert _snapshot(tmp_path) == before  # nothing read was changed, nothing written


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_refuses_before_any_work(case, tiny_model, tmp_path):
    d, _ = _broken(case, tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _snapshot(tmp_path)
    res = _run(
        [
            "generate",
            "--constitution",
            d,
            "--prompts",
            prompts,
            "--out",
            out_dir / "pairs.jsonl",
            "--model",
            tiny_model,
            "--rounds",
            "1",
            "--max-new-tokens",
            "4",
            "--no-label",
        ]
    )
    _assert_refused(res, *FAULTS[case][1])
    assert list(out_dir.iterdir()) == []  # no output, no temp or lock file left behind
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------- what must still work


def test_shipped_constitutions_pass():
    for name in ("harmless", "helpful-honest"):
        res = _run(["constitution", "check", HARMLESS.parent / name])
        assert res.exit_code == 0 and res.output.rstrip().endswith("OK"), res.output


def test_partials_and_inside_symlinks_work(tmp_path):
    d = _copy(tmp_path)
    _write(d, "templates/parts/ask.jinja", "CritiqueRequest: {{ principle.critique }}\n")
    _write(d, "templates/macros.jinja", "{% macro shout(s) %}{{ s | upper }}{% endmacro %}\n")
    _write(
        d,
        CRITIQUE,
        '{% import "macros.jinja" as m %}\n{{ chat(conversation) }}\n'
        '{% call message("user") %}{{ m.shout("look again") }} {% include "./parts/ask.jinja" %}'
        "{% endcall %}\n",
    )
    os.symlink("revision.jinja", d / "templates/alias.jinja")  # a symlink that stays inside is fine
    res = _run(["constitution", "check", d])
    assert res.exit_code == 0, res.output
    assert "[user] LOOK AGAIN CritiqueRequest:" in res.output
    c = load_constitution(d)
    assert {"templates/parts/ask.jinja", "templates/macros.jinja", "templates/alias.jinja"} <= set(c.files)


def test_editing_an_included_file_changes_the_sha256(tmp_path):
    """Provenance: every file a template can read is part of the hash, used or not."""
    d = _copy(tmp_path)
    _write(d, "templates/parts/ask.jinja", "CritiqueRequest: {{ principle.critique }}\n")
    _write(
        d,
        CRITIQUE,
        '{{ chat(conversation) }}\n{% call message("user") %}{% include "parts/ask.jinja" %}{% endcall %}\n',
    )
    h0 = load_constitution(d).sha256
    _write(d, "templates/parts/ask.jinja", "CritiqueRequest: {{ principle.critique }} Be brief.\n")
    h1 = load_constitution(d).sha256
    _write(d, "templates/parts/unused.jinja", "{# not included anywhere, still readable #}\n")
    h2 = load_constitution(d).sha256
    assert len({h0, h1, h2}) == 3
    # and what is rendered is what was hashed: the edit shows
    c = load_constitution(d)
    p = c.principles["self-harm"]
    msgs = c.render("critique", conversation=[{"role": "user", "content": "hi"}], response="r", principle=p)
    assert msgs[-1]["content"].endswith("Be brief.")


def test_include_edit_refuses_resume(tiny_model, tmp_path):
    """A resumed run with an edited partial is a different constitution: refused, file untouched."""
    d = _copy(tmp_path)
    _write(d, "templates/parts/ask.jinja", "CritiqueRequest: {{ principle.critique }}\n")
    _write(
        d,
        CRITIQUE,
        '{{ chat(conversation) }}\n{% call message("user") %}{% include "parts/ask.jinja" %}{% endcall %}\n',
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "pairs.jsonl"
    args = [
        "generate",
        "--constitution",
        d,
        "--prompts",
        prompts,
        "--out",
        out,
        "--model",
        tiny_model,
        "--rounds",
        "1",
        "--max-new-tokens",
        "4",
        "--no-label",
        "--limit",
        "2",
    ]
    res = _run(args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["meta"]["constitution"]["sha256"] == load_constitution(d).sha256
    _write(d, "templates/parts/ask.jinja", "CritiqueRequest: {{ principle.critique }} Be brief.\n")
    before = out.read_bytes()
    res = CliRunner().invoke(cli, [str(a) for a in args[:-2]])  # the rest of the prompts
    assert res.exit_code == 2 and "constitution" in res.output and "Traceback" not in res.output, res.output
    assert out.read_bytes() == before


def test_byte_order_marks_are_accepted(tmp_path):
    d = _copy(tmp_path)
    plain = load_constitution(d)
    for rel in (TOML, "principles/self-harm.txt", CRITIQUE, "fewshot/01-neighbour-wifi.txt"):
        (d / rel).write_bytes(b"\xef\xbb\xbf" + (d / rel).read_bytes())
    res = _run(["constitution", "check", d])
    assert res.exit_code == 0, res.output
    c = load_constitution(d)
    assert c.name == plain.name and c.defaults == plain.defaults
    assert c.principles["self-harm"] == plain.principles["self-harm"]
    assert c.fewshot == plain.fewshot
    p = c.principles["self-harm"]
    args = dict(conversation=[{"role": "user", "content": "hi"}], response="r", principle=p)
    assert c.render("critique", **args) == plain.render("critique", **args)
    assert "\ufeff" not in res.output
    assert c.sha256 != plain.sha256  # the hash is over the exact bytes


def test_render_error_mid_run_keeps_earlier_rows(tiny_model, tmp_path):
    """A template error only real data reveals: clean error mid-run, rows before it kept."""
    d = _copy(tmp_path)
    _write(d, CRITIQUE, _critique_with('{% if "pancakes" in conversation[-1].content %}{{ 1/0 }}{% endif %}'))
    assert _run(["constitution", "check", d]).exit_code == 0  # the sample data cannot reveal it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")  # pancakes is the third prompt
    out = tmp_path / "pairs.jsonl"
    res = _run(
        [
            "generate",
            "--constitution",
            d,
            "--prompts",
            prompts,
            "--out",
            out,
            "--model",
            tiny_model,
            "--rounds",
            "1",
            "--max-new-tokens",
            "4",
            "--no-label",
            "--no-early-stop",
            "--chunk-size",
            "1",
            "--batch-size",
            "1",
        ]
    )
    line = _assert_refused_mid_run(res, "critique.jinja:2", "ZeroDivisionError")
    assert "Traceback" not in line
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == PROMPTS[:2]


def _assert_refused_mid_run(res, *expected):
    """Like _assert_refused, but progress output may precede the one Error: line."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert lines[-1] == errors[0]  # on a line of its own (the progress bar ended its line), last
    for e in expected:
        assert e in errors[0], (e, errors[0])
    return errors[0]


def test_caps_do_not_touch_ordinary_templates(tmp_path):
    """Loops, macros, filters and a long (but sane) input render as before."""
    d = _copy(tmp_path)
    _write(
        d,
        CRITIQUE,
        "{% macro turn(m) %}{{ m.role | upper }}: {{ m.content }}{% endmacro %}\n"
        '{% call message("user") %}\n'
        "{% for m in conversation %}{{ turn(m) }}\n{% endfor %}"
        "{% for i in range(3) %}{{ loop.index }}{% endfor %} {{ '%5s' % 'x' }}"
        " {{ '{:>4}'.format(principle.id | length) }} {{ response | truncate(20) }}\n"
        "{% endcall %}\n",
    )
    c = load_constitution(d)
    long = "word " * 100_000  # 500k characters: under the cap
    msgs = c.render(
        "critique",
        conversation=[{"role": "user", "content": long}],
        response="r",
        principle=c.principles["self-harm"],
    )
    assert msgs[0]["content"].startswith("USER: word word") and "123     x    9 r" in msgs[0]["content"]


def _pairs_file(tmp_path) -> Path:
    p = tmp_path / "pairs.jsonl"
    rows = [
        {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": text}],
            "chosen": [{"role": "assistant", "content": "A careful answer."}],
            "rejected": [{"role": "assistant", "content": "A careless answer."}],
        }
        for i, text in enumerate(PROMPTS)
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_label_refuses_a_broken_compare_template(tiny_model, tmp_path):
    d = _copy(tmp_path)
    _write(d, COMPARE, '{% include "../constitution.toml" %}\n')
    pairs = _pairs_file(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _snapshot(tmp_path)
    res = _run(
        [
            "label",
            "--pairs",
            pairs,
            "--constitution",
            d,
            "--out",
            out_dir / "labelled.jsonl",
            "--model",
            tiny_model,
        ]
    )
    _assert_refused(res, "compare.jinja:1", "outside the constitution")
    assert list(out_dir.iterdir()) == [] and _snapshot(tmp_path) == before


def test_label_render_error_mid_run_keeps_earlier_rows(tiny_model, tmp_path):
    d = _copy(tmp_path)
    text = (d / COMPARE).read_text()
    _write(d, COMPARE, '{% if "pancakes" in (conversation | transcript) %}{{ 1/0 }}{% endif %}\n' + text)
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "labelled.jsonl"
    res = _run(
        [
            "label",
            "--pairs",
            pairs,
            "--constitution",
            d,
            "--out",
            out,
            "--model",
            tiny_model,
            "--chunk-size",
            "1",
            "--batch-size",
            "1",
        ]
    )
    _assert_refused_mid_run(res, "compare.jinja:1", "ZeroDivisionError")
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p0", "p1"]


def test_render_time_cap(tmp_path, monkeypatch):
    import cai.constitution as constitution
    import cai.sandbox as sandbox
    from cai.errors import InputError

    d = _copy(tmp_path)
    _write(d, "templates/slow.jinja", "{% for i in range(5000) %}{% endfor %}\n")
    c = load_constitution(d)
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.0)
    with pytest.raises(InputError, match=r"slow\.jinja:1: render limit: rendering took longer than"):
        c.render("slow", **constitution.SAMPLE, principle=c.principles["self-harm"], question="q")


def test_what_is_rendered_is_what_was_hashed(tmp_path):
    """Templates are served from the copy read at load: an edit on disk mid-run cannot slip in
    text the recorded sha256 does not cover (nor a new symlink appear)."""
    d = _copy(tmp_path)
    _write(d, "templates/parts/ask.jinja", "CritiqueRequest: {{ principle.critique }}\n")
    _write(
        d,
        CRITIQUE,
        '{{ chat(conversation) }}\n{% call message("user") %}{% include "parts/ask.jinja" %}{% endcall %}\n',
    )
    c = load_constitution(d)
    args = dict(
        conversation=[{"role": "user", "content": "hi"}], response="r", principle=c.principles["self-harm"]
    )
    first = c.render("critique", **args)
    _write(d, "templates/parts/ask.jinja", "EDITED {{ principle.critique }}\n")
    (d / "templates/parts/ask.jinja").unlink()
    os.symlink(_outside(tmp_path), d / "templates/parts/ask.jinja")
    assert c.render("critique", **args) == first
