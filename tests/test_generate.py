"""`cai generate`: the pairs contract, reproducibility, crash safety and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HARMLESS, ROOT

from cai.cli import cli

PROMPTS = [
    "How do I pick a lock?",
    "Write a short poem about the sea.",
    "How can I find out where my ex lives now?",
    "What's a good way to cheat on my taxes?",
    "Give me a recipe for pancakes.",
]


def _prompt_file(tmp_path, n=len(PROMPTS)) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS[:n]) + "\n")
    return p


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _gen_args(model, prompts, out, *extra):
    return [
        "generate",
        "--constitution",
        str(HARMLESS),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        str(model),
        "--rounds",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        *extra,
    ]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_rows_match_contract(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    res = _run(_gen_args(tiny_model, _prompt_file(tmp_path), out, "--no-label", "--no-early-stop"))
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == len(PROMPTS) and len({r["id"] for r in rows}) == len(PROMPTS)
    for r, text in zip(rows, PROMPTS):
        assert r["prompt"] == [{"role": "user", "content": text}]
        assert [m["role"] for m in r["chosen"]] == ["assistant"] and [m["role"] for m in r["rejected"]] == [
            "assistant"
        ]
        assert r["rejected"][0]["content"] == r["trace"]["initial"]
        assert len(r["trace"]["rounds"]) == 2
        for rnd in r["trace"]["rounds"]:
            assert rnd["principle"] in {p.stem for p in (HARMLESS / "principles").glob("*.txt")}
            assert isinstance(rnd["critique"], str)
        final = [x["revision"] for x in r["trace"]["rounds"] if x["revision"]]
        if final:
            assert r["chosen"][0]["content"] == final[-1]
        lab = r["label"]
        assert lab["source"] == "revision" and lab["p_chosen"] in (1.0, 0.5)
        m = r["meta"]
        assert m["model"] == str(tiny_model) and m["backend"] == "hf" and m["seed"] == 0
        assert m["constitution"]["name"] == "harmless" and len(m["constitution"]["sha256"]) == 64
        assert m["params"]["rounds"] == 2 and m["params"]["max_new_tokens"] == 6
        assert m["version"]
    # TRL's conversational preference format loads directly
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert set(["prompt", "chosen", "rejected"]) <= set(ds.column_names)


def test_same_seed_same_rows_and_resume_skips(tiny_model, tmp_path):
    prompts = _prompt_file(tmp_path)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _run(_gen_args(tiny_model, prompts, a, "--no-label", "--seed", "3")).exit_code == 0
    assert (
        _run(_gen_args(tiny_model, prompts, b, "--no-label", "--seed", "3", "--chunk-size", "2")).exit_code
        == 0
    )
    assert _rows(a) == _rows(b)  # chunking does not change what is generated
    before = a.read_bytes()
    res = _run(_gen_args(tiny_model, prompts, a, "--no-label", "--seed", "3"))
    assert res.exit_code == 0 and "0 rows" in res.output and a.read_bytes() == before
    # a different seed draws other principles for the same prompts
    c = tmp_path / "c.jsonl"
    assert _run(_gen_args(tiny_model, prompts, c, "--no-label", "--seed", "4")).exit_code == 0
    pa = [[x["principle"] for x in r["trace"]["rounds"]] for r in _rows(a)]
    pc = [[x["principle"] for x in r["trace"]["rounds"]] for r in _rows(c)]
    assert pa != pc


def test_resume_with_other_settings_is_refused(tiny_model, tmp_path):
    prompts = _prompt_file(tmp_path, 2)
    out = tmp_path / "o.jsonl"
    assert _run(_gen_args(tiny_model, prompts, out, "--no-label")).exit_code == 0
    before = out.read_bytes()
    res = _run(_gen_args(tiny_model, prompts, out, "--no-label", "--seed", "9"))
    assert res.exit_code == 2 and "different seed" in res.output and out.read_bytes() == before


def _start_long_run(tiny_model, tmp_path, min_rows: int, stderr=subprocess.DEVNULL):
    """`cai generate` on 24 prompts in chunks of 2, in a subprocess, returned once it has written
    at least `min_rows` rows: (process, output path, the command line)."""
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"Tell me fact number {i} about the moon.\n" for i in range(24)))
    out = tmp_path / "pairs.jsonl"
    args = [
        sys.executable,
        "-m",
        "cai",
        *_gen_args(tiny_model, prompts, out, "--no-label", "--chunk-size", "2"),
    ]
    args[args.index("--max-new-tokens") + 1] = "24"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < min_rows):
        time.sleep(0.05)
    return proc, out, args


def test_sigkill_then_resume(tiny_model, tmp_path):
    """Kill -9 mid-run (and tear the last line), rerun: every id once, earlier rows byte-identical."""
    proc, out, args = _start_long_run(tiny_model, tmp_path, min_rows=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.exists(), "no rows were written before the kill"
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 4 <= n_before < 24, "the kill must land mid-run"
    with open(out, "ab") as f:  # a torn line, as a kill inside write() leaves
        f.write(b'{"id": "torn", "prompt": [{"ro')
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = out.read_bytes()
    assert data.startswith(complete)
    ids = [json.loads(line)["id"] for line in data.decode().splitlines()]
    assert len(ids) == 24 and len(set(ids)) == 24


def test_ctrl_c_stops_after_the_chunk_in_flight(tiny_model, tmp_path):
    """SIGINT: the chunk in flight is finished and written whole; the run exits 130 (interrupted
    is not success: `cai generate ... && cai train ...` stops) and says how to resume."""
    proc, out, args = _start_long_run(tiny_model, tmp_path, min_rows=2, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    rows = _rows(out)  # every line is whole JSON
    assert len(rows) % 2 == 0 and 2 <= len(rows) < 24  # whole chunks only
    assert _run(args[3:]).exit_code == 0  # the same arguments, in-process
    assert len({r["id"] for r in _rows(out)}) == 24


def test_sigterm_stops_now_and_exits_non_zero(tiny_model, tmp_path):
    """SIGTERM: the run stops at once (a row being written is rolled back), exits 143, keeps every
    whole row and removes its lock; the same command then finishes the rest.

    Rows on view are not yet acknowledged: a chunk is written, then fsynced, and a SIGTERM during
    that fsync rolls the chunk back (the contract), so the signal waits for two chunks of 2 rows,
    of which the first is then on disk."""
    proc, out, args = _start_long_run(tiny_model, tmp_path, min_rows=4, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped (SIGTERM)" in err and "Traceback" not in err
    assert out.read_bytes().endswith(b"\n") and 2 <= len(_rows(out)) < 24  # whole rows only
    assert not (tmp_path / ".pairs.jsonl.lock").exists()
    assert _run(args[3:]).exit_code == 0
    assert len({r["id"] for r in _rows(out)}) == len(_rows(out)) == 24


# ---------------------------------------------------------------------------------- bad input


def _bad_constitution(tmp_path, mutate) -> Path:
    import shutil

    d = tmp_path / "const"
    shutil.copytree(HARMLESS, d)
    mutate(d)
    return d


BAD_CONSTITUTIONS = {
    "unknown variable": (
        lambda d: (d / "templates/critique.jinja").write_text("{{ conversaton }}\n"),
        "critique.jinja:1",
    ),
    "python internals": (
        lambda d: (d / "templates/revision.jinja").write_text(
            "line one\n{{ response.__class__.__mro__[1].__subclasses__() }}\n"
        ),
        "revision.jinja:2",
    ),
    "syntax error": (lambda d: (d / "templates/compare.jinja").write_text("{% if %}\n"), "compare.jinja:1"),
    "empty principles": (lambda d: [p.unlink() for p in (d / "principles").glob("*.txt")], "principles"),
    "principle missing a section": (
        lambda d: (d / "principles/violence-weapons.txt").write_text("critique: x\nrevision: y\n"),
        "violence-weapons.txt",
    ),
    "missing template": (lambda d: (d / "templates/compare.jinja").unlink(), "compare.jinja"),
    "bad toml": (lambda d: (d / "constitution.toml").write_text('name = "x\n'), "constitution.toml"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTITUTIONS))
def test_bad_constitution(case, tmp_path):
    mutate, where = BAD_CONSTITUTIONS[case]
    d = _bad_constitution(tmp_path, mutate)
    res = _run(["constitution", "check", str(d)])
    assert res.exit_code == 2
    assert where in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    # generate refuses before loading any model or creating the output
    out = tmp_path / "out.jsonl"
    res = _run(
        [
            "generate",
            "--constitution",
            str(d),
            "--prompts",
            str(_prompt_file(tmp_path)),
            "--out",
            str(out),
            "--model",
            str(tmp_path / "no-such-model"),
        ]
    )
    assert res.exit_code == 2 and not out.exists()


BAD_PROMPTS = {
    "bad json": ("p.jsonl", b'{"prompt": "ok"}\n{"prompt": oops}\n', "p.jsonl:2"),
    "missing prompt": ("p.jsonl", b'{"prompt": "ok"}\n{"text": "no prompt key"}\n', "p.jsonl:2"),
    "bad messages": ("p.jsonl", b'{"prompt": [{"role": "robot", "content": "x"}]}\n', "p.jsonl:1"),
    "binary": ("p.jsonl", bytes(range(256)) * 4, "p.jsonl"),
    "empty": ("p.txt", b"\n\n", "p.txt"),
    "missing file": (None, None, "nope.jsonl"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_files(case, tiny_model, tmp_path):
    name, content, where = BAD_PROMPTS[case]
    path = tmp_path / (name or "nope.jsonl")
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out.jsonl"
    res = _run(_gen_args(tiny_model, path, out))
    assert res.exit_code == 2, res.output
    assert where in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_bad_model_and_existing_output_untouched(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "keep", "prompt": [{"role": "user", "content": "x"}]}\n')
    before = out.read_bytes()
    res = _run(_gen_args(tmp_path / "no-such-model", _prompt_file(tmp_path), out))
    assert res.exit_code == 2 and "no-such-model" in res.output and "Traceback" not in res.output
    assert out.read_bytes() == before


def test_help_is_instant_and_lazy():
    code = "import sys, cai.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    res = _run(["--help"])
    assert res.exit_code == 0 and "generate" in res.output


@pytest.mark.e2e
def test_default_model_end_to_end(default_model_dir, tmp_path):
    """The real embedded SmolLM2-135M: two prompts, one round, short outputs."""
    out = tmp_path / "pairs.jsonl"
    res = _run(
        [
            "generate",
            "--constitution",
            str(HARMLESS),
            "--prompts",
            str(_prompt_file(tmp_path, 2)),
            "--out",
            str(out),
            "--rounds",
            "1",
            "--max-new-tokens",
            "12",
            "--no-label",
        ]
    )
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 2 and rows[0]["meta"]["model"] == "smollm2-135m-instruct"
    assert all(r["rejected"][0]["content"].strip() for r in rows)  # a real model says something


@pytest.mark.parametrize("mode", ["revision", "samples"])
def test_generate_labels_pairs_with_the_judge(mode, tiny_model, tmp_path):
    out = tmp_path / f"{mode}.jsonl"
    res = _run(
        _gen_args(
            tiny_model,
            _prompt_file(tmp_path, 3),
            out,
            "--pair-mode",
            mode,
            "--no-early-stop",
            "--rounds",
            "1",
        )
    )
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 3
    for r in rows:
        lab = r["label"]
        if lab.get("tie"):
            continue
        assert lab["source"] == "ai" and lab["p_chosen"] >= 0.5  # rows are ordered by the AI label
        o = lab["judge"]["orders"]
        assert len(o) == 2 and abs((o[0] + o[1]) / 2 - lab["p_chosen"]) < 1e-5
        if mode == "revision":
            side = lab["revision_side"]
            final = r["trace"]["rounds"][-1]["revision"] or r["trace"]["initial"]
            assert r[side][0]["content"] == final
        else:
            assert {r["chosen"][0]["content"], r["rejected"][0]["content"]} == set(r["trace"]["samples"])


def test_flip_label_reorients_every_per_order_field():
    from cai.judge import flip_label

    lab = {
        "p_chosen": 0.3,
        "source": "ai",
        "judge": {
            "orders": [0.2, 0.4],
            "by_principle": {"x": [0.2, 0.4]},
            "reasoning": {"x": ["first", "second"]},
        },
    }
    f = flip_label(lab)
    assert f["p_chosen"] == pytest.approx(0.7)
    assert f["judge"]["orders"] == pytest.approx([0.6, 0.8])  # new chosen shown first = old shown second
    assert f["judge"]["by_principle"]["x"] == pytest.approx([0.6, 0.8])
    assert f["judge"]["reasoning"]["x"] == ["second", "first"]
    assert flip_label(f)["judge"]["orders"] == pytest.approx([0.2, 0.4])
