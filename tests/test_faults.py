"""Fault injection across the commands: every bad input is one `Error:` line, exit 2, no
traceback, the input bytes unchanged and nothing left behind (no output, no temp or lock file).

Cases are grouped by the class of defect they guard against (docs/architecture.md, "Invariants"):

  same-file   an output that is an input (also through a symlink or a hard link)
  pickle      weights that are not safetensors
  label       a label that is not a finite probability, or an empty response
  out         an --out that cannot be written (a folder, under a file, an existing report file)
  option      counts and limits below 1, in every command alike
  strict      a malformed row stops every command at its file:line by default
  noise       a folder that is not a reward model: one line, no load report
  model       a model folder checked from its files before use: whole safetensors (none that
              config.json redirects to a pickle), its own tokenizer, fitting the embedding
  folder      a whole-folder output never goes into a folder cai did not make

Templates and constitution.toml faults live in tests/test_constitution_faults.py; files, disks,
signals and links in tests/test_faults_io.py; the review server's bounds in tests/test_review.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HARMLESS

from cai.cli import cli

# ----------------------------------------------------------------------------- fixtures


def _pair(i, chosen="A careful answer.", rejected="A reckless answer!", label=None):
    row = {
        "id": f"p{i}",
        "prompt": [{"role": "user", "content": f"Question {i}?"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    if label is not None:
        row["label"] = label
    return row


def _write_rows(path: Path, rows, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny_reward_base) -> Path:
    """A 1-output sequence classifier on the tiny BERT: a reward model for score/eval faults."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-rm")
    cfg = AutoConfig.from_pretrained(tiny_reward_base, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_reward_base).save_pretrained(out)
    return out


def _as_pickle(src: Path, out: Path) -> Path:
    """A copy of model folder ``src`` whose weights are pytorch_model.bin only (a pickle)."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            state.update(load_file(f))
        else:
            (out / f.name).write_bytes(f.read_bytes())
    torch.save(state, out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, tiny_model) -> Path:
    return _as_pickle(tiny_model, tmp_path_factory.mktemp("pickle-llm"))


@pytest.fixture(scope="module")
def pickle_rm(tmp_path_factory, tiny_rm) -> Path:
    return _as_pickle(tiny_rm, tmp_path_factory.mktemp("pickle-rm"))


@pytest.fixture
def ws(tmp_path, tiny_model, tiny_reward_base, tiny_rm):
    """A workspace: good inputs and the argument lists of every command."""
    pairs = _write_rows(tmp_path / "pairs.jsonl", [_pair(i) for i in range(6)])
    test = _write_rows(tmp_path / "test.jsonl", [_pair(i + 10) for i in range(6)])
    prompts = _write_rows(
        tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}?"} for i in range(3)]
    )

    def args(cmd, inp=None, out=None, **kw):
        model = str(kw.get("model", tiny_model))
        base = str(kw.get("base", tiny_reward_base))
        rm = str(kw.get("rm", tiny_rm))
        inp = str(inp or (prompts if cmd == "generate" else pairs))
        if cmd == "generate":
            out = out or tmp_path / "gen.jsonl"
            return [
                "generate",
                "--constitution",
                str(HARMLESS),
                "--prompts",
                inp,
                "--out",
                str(out),
                "--model",
                model,
                "--rounds",
                "1",
                "--max-new-tokens",
                "2",
                "--no-label",
            ]
        if cmd == "label":
            out = out or tmp_path / "labelled.jsonl"
            return [
                "label",
                "--pairs",
                inp,
                "--constitution",
                str(HARMLESS),
                "--out",
                str(out),
                "--model",
                model,
            ]
        if cmd == "train":
            out = out or tmp_path / "rm-out"
            return [
                "train",
                "--pairs",
                inp,
                "--out",
                str(out),
                "--base",
                base,
                "--max-steps",
                "1",
                "--max-length",
                "32",
            ]
        if cmd == "score":
            out = out or tmp_path / "scores.jsonl"
            return ["score", "--rm", rm, "--pairs", inp, "--out", str(out)]
        if cmd == "eval":
            out = out or tmp_path / "report"
            return [
                "eval",
                "--rm",
                rm,
                "--pairs",
                inp,
                "--out",
                str(out),
                "--bootstrap",
                "100",
                "--no-probes",
            ]
        if cmd == "review":
            out = out or tmp_path / "human.jsonl"
            return ["review", "--pairs", inp, "--out", str(out), "--annotator", "a"]
        if cmd == "agreement":
            out = out or tmp_path / "agreement"
            return ["agreement", "--ai", inp, "--human", str(pairs), "--out", str(out)]
        if cmd == "compare":
            out = out or tmp_path / "study"
            return [
                "compare",
                "--human-train",
                inp,
                "--test",
                str(test),
                "--constitution",
                str(HARMLESS),
                "--out",
                str(out),
                "--model",
                model,
                "--base",
                base,
                "--dry-run",
            ]
        raise ValueError(cmd)

    return {"dir": tmp_path, "pairs": pairs, "test": test, "prompts": prompts, "args": args}


def _snapshot(root: Path) -> dict:
    """Every file's bytes and every folder (None) under root."""
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def assert_clean_failure(argv, root: Path, expect: str | None = None, allowed_new=()):
    """exit 2, exactly one `Error:` line, no traceback; every file byte-identical; nothing new."""
    before = _snapshot(root)
    res = CliRunner().invoke(cli, [str(a) for a in argv])
    out = res.output
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 2, f"exit {res.exit_code}\n{out}\n{res.exception!r}"
    assert len(errors) == 1, out
    assert "Traceback" not in out, out
    if expect:
        assert expect.lower() in errors[0].lower(), errors[0]
    after = _snapshot(root)
    for p, data in before.items():
        assert after.get(p) == data, f"{p} changed or vanished"
    new = [p for p in after if p not in before and p.name not in allowed_new]
    assert not new, f"left behind: {new}"
    return errors[0]


COMMANDS = ["generate", "label", "train", "score", "eval", "compare"]

# ----------------------------------------------------------------------------- same-file


@pytest.mark.parametrize("cmd", COMMANDS)
def test_output_that_is_the_input(ws, cmd):
    inp = ws["prompts"] if cmd == "generate" else ws["pairs"]
    if cmd in ("train", "eval", "compare"):  # folder outputs: the input may not be the folder's path
        assert_clean_failure(ws["args"](cmd, out=inp), ws["dir"])
    else:
        assert_clean_failure(ws["args"](cmd, out=inp), ws["dir"], "input file")


@pytest.mark.parametrize("cmd", ["generate", "label", "score"])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_that_is_the_input_through_a_link(ws, cmd, link):
    inp = ws["prompts"] if cmd == "generate" else ws["pairs"]
    alias = ws["dir"] / f"alias-{link}.jsonl"
    (os.symlink if link == "symlink" else os.link)(inp, alias)
    assert_clean_failure(ws["args"](cmd, inp=inp, out=alias), ws["dir"], "input file")


# ----------------------------------------------------------------------------- pickle


@pytest.mark.parametrize(
    "cmd,which",
    [
        ("generate", "model"),
        ("label", "model"),
        ("compare", "model"),
        ("train", "base"),
        ("compare", "base"),
        ("score", "rm"),
        ("eval", "rm"),
    ],
)
def test_pickle_weights_are_refused(ws, cmd, which, pickle_model, pickle_rm, tmp_path):
    import shutil

    kw = {}
    if which == "model":
        kw["model"] = pickle_model
    elif which == "rm":
        kw["rm"] = pickle_rm
    else:  # a reward base: the tiny BERT's weights as a pickle
        base = tmp_path / "pickle-base"
        shutil.copytree(pickle_rm, base)
        kw["base"] = base
    assert_clean_failure(ws["args"](cmd, **kw), ws["dir"], "safetensors only")


def _redirected(src: Path, out: Path) -> Path:
    """A copy of model folder ``src`` with its model.safetensors kept but config.json pointing
    transformers at a pickle (``transformers_weights``), which it then loads instead."""
    out.mkdir()
    _as_pickle(src, out)
    for f in src.glob("*.safetensors"):
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "pytorch_model.bin"}))
    return out


@pytest.mark.parametrize(
    "cmd,which",
    [("generate", "model"), ("label", "model"), ("train", "base"), ("score", "rm"), ("eval", "rm")],
)
def test_weights_redirected_to_a_pickle_are_refused(ws, cmd, which, tiny_model, tiny_rm, tmp_path):
    src = {"model": tiny_model, "rm": tiny_rm, "base": tiny_rm}[which]
    folder = _redirected(src, tmp_path / f"redirect-{which}")
    assert_clean_failure(ws["args"](cmd, **{which: folder}), ws["dir"], "safetensors only")


# ----------------------------------------------------------------------------- model folders

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _broken_model(src: Path, out: Path, fault: str, other_tokenizer: Path) -> Path:
    import shutil

    shutil.copytree(src, out)
    if fault == "truncated":
        (st,) = out.glob("*.safetensors")
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])  # a download cut short
    else:
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        if fault == "foreign-tokenizer":  # another model's, with more ids than this embedding has rows
            for name in TOKENIZER_FILES:
                if (other_tokenizer / name).exists():
                    shutil.copy(other_tokenizer / name, out / name)
    return out


@pytest.mark.parametrize(
    "cmd,which,fault,expect",
    [
        ("generate", "model", "truncated", "truncated"),
        ("label", "model", "truncated", "truncated"),
        ("train", "base", "truncated", "truncated"),
        ("score", "rm", "truncated", "truncated"),
        ("eval", "rm", "truncated", "truncated"),
        ("compare", "base", "truncated", "truncated"),
        ("generate", "model", "no-tokenizer", "no tokenizer files"),
        ("train", "base", "no-tokenizer", "no tokenizer files"),
        ("score", "rm", "no-tokenizer", "no tokenizer files"),
        ("eval", "rm", "no-tokenizer", "no tokenizer files"),
        ("score", "rm", "foreign-tokenizer", "belongs to another model"),
        ("eval", "rm", "foreign-tokenizer", "belongs to another model"),
        ("train", "base", "foreign-tokenizer", "belongs to another model"),
    ],
)
def test_a_model_folder_is_checked_before_use(ws, cmd, which, fault, expect, tiny_model, tiny_rm, tmp_path):
    """Weights readable, tokenizer present and fitting the embedding: one line before any load,
    not a SafetensorError, an IndexError mid-run, or every reward equal (a fallback tokenizer)."""
    src = {"model": tiny_model, "rm": tiny_rm, "base": tiny_rm}[which]
    folder = _broken_model(src, tmp_path / f"{fault}-{which}", fault, other_tokenizer=tiny_model)
    assert_clean_failure(ws["args"](cmd, **{which: folder}), ws["dir"], expect)


# ----------------------------------------------------------------------------- labels

BAD_LABELS = {
    "nan": "NaN",
    "above-one": "1.5",
    "negative": "-0.2",
    "string": '"0.7"',
    "bool": "true",
    "infinite": "Infinity",
}


@pytest.mark.parametrize("cmd", ["label", "train", "score", "eval", "compare"])
@pytest.mark.parametrize("bad", list(BAD_LABELS))
def test_labels_must_be_probabilities(ws, cmd, bad):
    good = [json.dumps(_pair(i, label={"p_chosen": 1.0, "source": "human"})) for i in range(3)]
    row = json.dumps(_pair(9)).rstrip("}") + f', "label": {{"p_chosen": {BAD_LABELS[bad]}, "source": "ai"}}}}'
    path = ws["dir"] / f"bad-{bad}.jsonl"
    path.write_text("\n".join([*good, row]) + "\n", encoding="utf-8")
    err = assert_clean_failure(ws["args"](cmd, inp=path), ws["dir"], "p_chosen")
    assert f"bad-{bad}.jsonl:4:" in err


@pytest.mark.parametrize("cmd", ["label", "train", "score", "eval"])
@pytest.mark.parametrize("shape", ["empty-string", "blank", "empty-content"])
def test_empty_responses_are_refused(ws, cmd, shape):
    row = _pair(0)
    if shape == "empty-string":
        row["chosen"] = ""
    elif shape == "blank":
        row["rejected"] = "   "
    else:
        row["chosen"] = [{"role": "assistant", "content": ""}]
    path = _write_rows(ws["dir"] / "empty.jsonl", [_pair(1), row])
    err = assert_clean_failure(ws["args"](cmd, inp=path), ws["dir"], "empty")
    assert "empty.jsonl:2:" in err


@pytest.mark.parametrize("cmd", ["label", "train", "score", "eval", "compare"])
def test_a_null_label_needs_a_prior_that_holds_one(ws, cmd):
    """`p_chosen: null` is allowed only when a prior holds a label; `prior: {}` holds none."""
    good = [_pair(i, label={"p_chosen": 1.0, "source": "human"}) for i in range(3)]
    path = _write_rows(ws["dir"] / "null.jsonl", [*good, _pair(9, label={"p_chosen": None, "prior": {}})])
    err = assert_clean_failure(ws["args"](cmd, inp=path), ws["dir"], "no label.prior holds a label")
    assert "null.jsonl:4:" in err


@pytest.mark.parametrize("cmd", ["train", "eval", "compare"])
def test_commands_that_use_the_label_refuse_a_null_one(ws, cmd):
    """A null p_chosen kept for its human prior is a row without a label where the label is the
    data (train, eval, compare): a bad row at its line, like any other."""
    row = _pair(9, label={"p_chosen": None, "source": "ai", "prior": {"p_chosen": 1.0, "source": "human"}})
    path = _write_rows(ws["dir"] / "null.jsonl", [_pair(0), _pair(1), row])
    err = assert_clean_failure(ws["args"](cmd, inp=path), ws["dir"], "needs a label")
    assert "null.jsonl:3:" in err


def test_score_makes_no_accuracy_of_rows_without_a_label(ws):
    prior = {"p_chosen": 1.0, "source": "human"}
    path = _write_rows(
        ws["dir"] / "null.jsonl",
        [_pair(i, label={"p_chosen": None, "source": "ai", "prior": prior}) for i in range(3)],
    )
    res = CliRunner().invoke(cli, ws["args"]("score", inp=path))
    assert res.exit_code == 0, res.output
    assert "scored 3 pairs" in res.output and "accuracy vs labels" not in res.output
    mixed = _write_rows(
        ws["dir"] / "mixed.jsonl",
        [_pair(0, label=prior), *[json.loads(x) for x in path.read_text().splitlines()]],
    )
    res = CliRunner().invoke(cli, ws["args"]("score", inp=mixed, out=ws["dir"] / "s2.jsonl"))
    assert res.exit_code == 0 and "on 1 pairs" in res.output, res.output  # the one labelled row only


def test_nested_human_prior_must_be_a_probability(ws):
    row = _pair(
        0, label={"p_chosen": 0.7, "source": "ai", "prior": {"p_chosen": float("nan"), "source": "human"}}
    )
    path = ws["dir"] / "prior.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert_clean_failure(ws["args"]("label", inp=path), ws["dir"], "prior.p_chosen")


# ----------------------------------------------------------------------------- out


@pytest.mark.parametrize("cmd", ["generate", "label", "score"])
def test_out_is_a_folder(ws, cmd):
    d = ws["dir"] / "a-folder"
    d.mkdir()
    assert_clean_failure(ws["args"](cmd, out=d), ws["dir"], "is a folder")


@pytest.mark.parametrize("cmd", ["train", "eval", "compare"])
def test_out_folder_is_a_file(ws, cmd):
    f = ws["dir"] / "a-file"
    f.write_text("keep me")
    assert_clean_failure(ws["args"](cmd, out=f), ws["dir"], "is a file")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_out_under_a_file(ws, cmd):
    f = ws["dir"] / "plain-file"
    f.write_text("keep me")
    assert_clean_failure(ws["args"](cmd, out=f / "sub" / "out"), ws["dir"], "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
@pytest.mark.parametrize("cmd", ["generate", "score", "eval"])
def test_out_under_a_read_only_folder(ws, cmd):
    ro = ws["dir"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_clean_failure(ws["args"](cmd, out=ro / "out"), ws["dir"], "not writable")
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("cmd", COMMANDS)
def test_out_where_nothing_can_be_created(ws, cmd):
    """/proc refuses new entries even to root: the run stops before any work, one line."""
    assert_clean_failure(
        ws["args"](cmd, out=Path(f"/proc/cai-test-{os.getpid()}/out")), ws["dir"], "cannot be"
    )


# ----------------------------------------------------------------------------- folder


@pytest.mark.parametrize("cmd", ["train", "eval", "compare", "agreement"])
def test_whole_folder_outputs_refuse_a_folder_cai_did_not_make(ws, cmd):
    """One rule for every whole-folder output: an existing folder that is not empty must be one
    this command made (its marker file), or nothing is written into it."""
    mine = ws["dir"] / "my-notes"
    mine.mkdir()
    (mine / "report.md").write_text("my own report; keep me\n")
    assert_clean_failure(ws["args"](cmd, out=mine), ws["dir"], "not a cai")


def test_eval_rewrites_its_own_report_folder_and_an_empty_one(ws):
    out = ws["dir"] / "report"
    out.mkdir()  # empty: fine
    for extra in ([], ["--probe-limit", "all"]):  # and again into what it made
        res = CliRunner().invoke(cli, [*ws["args"]("eval", out=out), *extra])
        assert res.exit_code == 0, res.output
    assert (out / "metrics.json").exists() and (out / "report.md").exists()


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "cmd,opt,value",
    [
        ("generate", "--chunk-size", "-1"),
        ("label", "--chunk-size", "0"),
        ("generate", "--limit", "0"),
        ("label", "--limit", "0"),
        ("train", "--limit", "0"),
        ("score", "--limit", "0"),
        ("eval", "--limit", "0"),
        ("compare", "--limit", "0"),
        ("generate", "--batch-size", "0"),
        ("train", "--batch-size", "0"),
        ("score", "--batch-size", "0"),
        ("generate", "--max-new-tokens", "0"),
        ("train", "--epochs", "0"),
        ("eval", "--bootstrap", "5"),
        ("compare", "--train-batch-size", "0"),
        ("compare", "--test-limit", "-3"),
        ("generate", "--rounds", "0"),
        ("review", "--sample", "0"),
        # seeds: what numpy and torch seed from (0 .. 2**32 - 1), refused before any model loads
        ("generate", "--seed", str(2**32)),
        ("generate", "--seed", "-1"),
        ("label", "--seed", str(2**64)),
        ("train", "--seed", str(2**32)),
        ("eval", "--seed", "-5"),
        ("compare", "--seed", str(2**40)),
        ("review", "--seed", str(2**32)),
        # a port is 0 .. 65535 (0: any free one)
        ("review", "--port", "70000"),
        ("review", "--port", "-1"),
        ("eval", "--probe-limit", "0"),  # a count: 'all' says all
        ("compare", "--probe-limit", "0"),
    ],
)
def test_counts_and_limits_are_checked_alike(ws, cmd, opt, value):
    assert_clean_failure([*ws["args"](cmd), opt, value], ws["dir"], opt)


# ----------------------------------------------------------------------------- strict


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_malformed_row_stops_every_command_at_its_line(ws, cmd):
    if cmd == "generate":
        path = _write_rows(ws["dir"] / "bad-prompts.jsonl", [{"prompt": "ok?"}], ["{not json"])
    else:
        path = _write_rows(ws["dir"] / "bad-pairs.jsonl", [_pair(0), _pair(1)], ["{not json"])
    err = assert_clean_failure(ws["args"](cmd, inp=path), ws["dir"], "bad JSON")
    assert f"{path.name}:{2 if cmd == 'generate' else 3}:" in err


@pytest.mark.parametrize("cmd", ["score", "train"])
def test_skip_bad_skips_counts_and_names_the_first(ws, cmd):
    path = _write_rows(
        ws["dir"] / "some-bad.jsonl", [_pair(i) for i in range(4)], ["{not json", '{"chosen": 1}']
    )
    res = CliRunner().invoke(cli, [*ws["args"](cmd, inp=path), "--skip-bad"])
    assert res.exit_code == 0, res.output
    if cmd == "score":
        assert "2 bad rows skipped (first:" in res.output and "some-bad.jsonl:5:" in res.output
    else:
        assert "skipped 2" in res.output or "2 bad rows skipped" in res.output


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("cmd", ["score", "eval"])
@pytest.mark.parametrize("what", ["encoder", "missing"])
def test_a_folder_that_is_not_a_reward_model_is_one_line(ws, cmd, what, tiny_reward_base):
    """A bare encoder (no 1-output head) or no folder at all: the one `Error:` line is the whole
    output — no transformers load report before it."""
    rm = tiny_reward_base if what == "encoder" else ws["dir"] / "nope"
    res = CliRunner().invoke(cli, ws["args"](cmd, rm=rm))
    assert res.exit_code == 2 and res.output.startswith("Error:") and len(res.output.splitlines()) == 1, (
        res.output
    )
    assert ("num_labels" if what == "encoder" else "no config.json") in res.output


# ----------------------------------------------------------------------------- byte-order marks


def test_bom_is_accepted_in_jsonl_and_txt(tmp_path):
    from cai.records import read_pairs, read_prompts

    j = tmp_path / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_pair(0)) + "\n").encode())
    assert read_pairs(j)[0]["id"] == "p0"
    t = tmp_path / "bom.txt"
    t.write_bytes(b"\xef\xbb\xbfHello there?\nSecond?\n")
    no_bom = tmp_path / "plain.txt"
    no_bom.write_text("Hello there?\nSecond?\n")
    rows = read_prompts(t)
    assert rows[0]["prompt"][0]["content"] == "Hello there?"
    assert [r["id"] for r in rows] == [r["id"] for r in read_prompts(no_bom)]  # same ids as without the BOM


# ----------------------------------------------------------------------------- resume identity


def test_resume_knows_a_model_by_its_content(tmp_path, tiny_model):
    """The same weights under another path resume; other weights under the same path are refused."""
    import shutil

    prompts = _write_rows(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Q{i}?"} for i in range(2)])
    out = tmp_path / "out.jsonl"
    base = [
        "generate",
        "--constitution",
        str(HARMLESS),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--rounds",
        "1",
        "--max-new-tokens",
        "2",
        "--no-label",
    ]
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model, copy)
    r = CliRunner().invoke(cli, [*base, "--model", str(copy), "--limit", "1"])
    assert r.exit_code == 0, r.output
    moved = tmp_path / "elsewhere" / "same-model"
    moved.parent.mkdir()
    shutil.copytree(copy, moved)
    r = CliRunner().invoke(cli, [*base, "--model", str(moved.resolve())])  # same bytes, another path: resumes
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 2
    # other weights under the first path: refused, file untouched
    import torch
    from safetensors.torch import load_file, save_file

    (st,) = copy.glob("*.safetensors")
    state = load_file(st)
    k = next(iter(state))
    state[k] = state[k] + torch.ones_like(state[k])
    save_file(state, st, metadata={"format": "pt"})
    prompts.write_text(prompts.read_text() + json.dumps({"id": "q9", "prompt": "Q9?"}) + "\n")
    before = out.read_bytes()
    r = CliRunner().invoke(cli, [*base, "--model", str(copy)])
    assert r.exit_code == 2 and "different model_sha256" in r.output, r.output
    assert out.read_bytes() == before


# ----------------------------------------------------------------------------- one run per output


def test_two_runs_on_one_output_the_second_is_refused(tmp_path, tiny_model):
    """Real processes: while one `cai generate` holds --out, a second is refused naming its pid."""
    prompts = _write_rows(
        tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Tell me about {i}."} for i in range(40)]
    )
    out = tmp_path / "out.jsonl"
    argv = [
        sys.executable,
        "-m",
        "cai",
        "generate",
        "--constitution",
        str(HARMLESS),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        str(tiny_model),
        "--rounds",
        "1",
        "--max-new-tokens",
        "24",
        "--no-label",
        "--batch-size",
        "2",
        "--chunk-size",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lock = tmp_path / ".out.jsonl.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first run never took the lock"
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 40  # every id exactly once
    assert not lock.exists()  # released and removed


# ----------------------------------------------------------------------------- property: readers never crash


def test_readers_give_rows_or_input_errors_on_random_input(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from cai.errors import InputError
    from cai.records import read_pairs, read_prompts

    json_values = st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
        lambda kids: (
            st.lists(kids, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    ["id", "prompt", "chosen", "rejected", "label", "p_chosen", "role", "content", "x"]
                ),
                kids,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
    counter = iter(range(10**9))

    def check(data: bytes, suffix: str):
        path = tmp_path / f"f{next(counter)}{suffix}"
        path.write_bytes(data)
        for reader in (read_pairs, read_prompts):
            try:
                rows = reader(path)
            except InputError:
                continue
            assert isinstance(rows, list) and rows

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=200), st.sampled_from([".jsonl", ".txt", ".jsonl.gz"]))
    def random_bytes(data, suffix):
        check(data, suffix)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(json_values, min_size=1, max_size=3))
    def random_json(values):
        check("\n".join(json.dumps(v) for v in values).encode(), ".jsonl")

    random_bytes()
    random_json()
    assert hypothesis.__version__
