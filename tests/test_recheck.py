"""The re-check (issue 23): every principle judged on (initial, final), regressions flagged, the
conflict matrix counted, repair rounds, the reports, `train --drop-regressed`, and bad input.

Most tests use a scripted backend whose revisions for principle `alpha` are made to break
principle `beta`, and whose judge reads the responses (so the numbers are known in advance)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HARMLESS

from cai.backends.base import Generation
from cai.cli import cli
from cai.constitution import load_constitution

IDS = ("alpha", "beta", "gamma")


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def const_dir(tmp_path):
    """Three principles with markers the scripted backend reads, and the shipped templates."""
    d = tmp_path / "const"
    shutil.copytree(HARMLESS / "templates", d / "templates")
    (d / "principles").mkdir()
    (d / "constitution.toml").write_text('name = "three"\ndescription = "test"\n')
    for pid in IDS:
        (d / "principles" / f"{pid}.txt").write_text(
            f"critique: c-{pid}\nrevision: r-{pid}\ncompare: Which is better for {pid.upper()}?\n"
        )
    return d


def _score(text: str, pid: str) -> int:
    p = pid.upper()
    return (f"{p}-FIXED" in text) - (f"BREAKS-{p}" in text)


class Scripted:
    """Generation: the initial answer is fixed; a revision for principle P marks the answer
    P-FIXED (removing BREAKS-P), and a revision for alpha also adds BREAKS-BETA. The judge
    prefers, under principle P, the response with more P-FIXED and fewer BREAKS-P, whichever
    position it is shown in (so it is consistent across orders); `biased` instead always answers
    A, as a position-biased judge does."""

    name = "scripted"
    model_id = "scripted"
    supports_logprobs = True

    def __init__(self, biased: bool = False):
        self.biased = biased
        self.calls: list[tuple[str, int]] = []

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        self.calls.append(("generate", len(conversations)))
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            if "CritiqueRequest:" in last:
                out.append("The answer can be better.")
            elif 'A draft reply was: "' in last:
                response = last.split('A draft reply was: "', 1)[1].split('"\n\nFeedback', 1)[0]
                pid = re.search(r"r-(\w+)", last).group(1)
                text = response.replace(f" BREAKS-{pid.upper()}", "")
                text += f" {pid.upper()}-FIXED"
                if pid == "alpha":
                    text += " BREAKS-BETA"
                out.append(text)
            else:
                out.append("INITIAL answer.")
        return [Generation(t, 3) for t in out]

    def option_logprobs(self, prompts, options):
        self.calls.append(("option_logprobs", len(prompts)))
        out = []
        for p in prompts:
            user, prefix = p[-2]["content"], p[-1]["content"]
            a = user.split("\n(A) ", 1)[1].split("\n(B) ", 1)[0]
            b = user.split("\n(B) ", 1)[1].split("\n", 1)[0]
            m = re.search(r"question (\d+)", prefix)
            pid = IDS[int(m.group(1)) - 1] if m else re.search(r"better for (\w+)\?", user).group(1).lower()
            sa, sb = _score(a, pid), _score(b, pid)
            pa = 0.9 if self.biased else 0.9 if sa > sb else 0.1 if sa < sb else 0.5
            out.append([math.log(pa), math.log(1 - pa)])
        return out

    def describe(self):
        return {"backend": "scripted"}


class ScriptedRepairBreaksGamma(Scripted):
    """As Scripted, but a revision for beta of an answer revised for alpha also breaks gamma:
    the repair trades one regression for another, so it is not kept."""

    def generate(self, conversations, **kw):
        gens = super().generate(conversations, **kw)
        for conv, g in zip(conversations, gens):
            if "r-beta" in conv[-1]["content"] and "ALPHA-FIXED" in g.text:
                g.text += " BREAKS-GAMMA"
        return gens


@pytest.fixture
def scripted(monkeypatch):
    """Install a Scripted backend for every command; returns a setter for other variants."""
    import cai.backends

    state = {"backend": Scripted()}
    monkeypatch.setattr(cai.backends, "load_backend", lambda name, model, **kw: state["backend"])

    def use(backend):
        state["backend"] = backend
        return backend

    use.current = lambda: state["backend"]
    return use


@pytest.fixture
def no_model(monkeypatch):
    import cai.backends

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cai.backends, "load_backend", fail)


def _prompts(const_dir, tmp_path, n_alpha=2, n_other=3) -> Path:
    """Prompts whose round-0 principle (seed 0) is alpha for n_alpha of them, not for n_other."""
    c = load_constitution(const_dir)
    alpha, other = [], []
    i = 0
    while len(alpha) < n_alpha or len(other) < n_other:
        text = f"Question number {i}?"
        from cai.records import stable_id

        pid = c.draw(0, stable_id([{"role": "user", "content": text}]), 0).id
        (alpha if pid == "alpha" else other).append(text)
        i += 1
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(alpha[:n_alpha] + other[:n_other]) + "\n")
    return p


def _generate(const_dir, prompts, out, *extra):
    return _run(
        ["generate", "--constitution", const_dir, "--prompts", prompts, "--out", out, "--rounds", "1", *extra]
    )


def _revised_for(row):
    return row["trace"]["rounds"][0]["principle"]


# ----------------------------------------------------------------------------- regressions


def test_regressed_is_worst_first_and_respects_the_margin():
    from cai.recheck import improved, regressed

    e = [
        {"principle": "a", "p_final_better": 0.41},
        {"principle": "b", "p_final_better": 0.1},
        {"principle": "c", "p_final_better": 0.39},
        {"principle": "d", "p_final_better": 0.7},
    ]
    assert regressed(e, 0.1) == ["b", "c"]  # 0.41 is inside the margin
    assert regressed(e, 0.0) == ["b", "c", "a"]
    assert regressed(e, 0.5) == []
    assert improved(e, 0.1) == ["d"]


def test_generate_recheck_flags_the_regression_and_counts_the_conflict(const_dir, scripted, tmp_path):
    out = tmp_path / "pairs.jsonl"
    res = _generate(const_dir, _prompts(const_dir, tmp_path), out, "--recheck")
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 5
    for r in rows:
        t = r["trace"]
        assert [e["principle"] for e in t["recheck"]] == list(IDS)  # every principle, in order
        by = {e["principle"]: e for e in t["recheck"]}
        a = _revised_for(r)
        assert by[a]["p_final_better"] == pytest.approx(0.9) and by[a]["orders"] == pytest.approx([0.9, 0.9])
        # the revision for alpha broke beta; nothing else regressed
        assert t["regressed"] == (["beta"] if a == "alpha" else [])
        assert by["beta"]["p_final_better"] == pytest.approx(
            0.1 if a == "alpha" else 0.9 if a == "beta" else 0.5
        )
        assert r[t["recheck_side"]][0]["content"] == t["rounds"][0]["revision"]  # p is about the final
        assert r["label"]["source"] == "ai"  # the label keeps its meaning: the drawn principle
        assert len(r["label"]["judge"]["principles"]) == 1
    params = rows[0]["meta"]["params"]["recheck"]
    assert params == {
        "principles": "all",
        "template": "recheck.jinja",
        "margin": 0.1,
        "repair_rounds": 0,
        "options": ["A", "B"],
    }
    # one call for the whole chunk's re-check: 5 pairs x 2 orders x 3 principles
    assert ("option_logprobs", 5 * 2 * 3) in scripted.current().calls
    # the summary: per principle rates and the conflict cell, alpha -> beta in 2 of 2 rows
    assert "re-check: 5 rows under 3 principles (margin 0.1); 2 with a regression" in res.output
    from cai.recheck import share, share_txt

    n_beta = sum(1 for r in rows if _revised_for(r) == "beta")  # revisions for beta improve it
    assert f"beta {share_txt(share(n_beta, 5))} / {share_txt(share(2, 5))}" in res.output
    assert "alpha -> beta in 2 of 2" in res.output
    assert "at chance" not in res.output  # this judge reads the responses

    from cai.recheck import stats

    s = stats(rows)
    assert s["conflicts"]["alpha"]["beta"] == [2, 2]
    assert s["conflicts"]["alpha"]["alpha"] == [0, 2]
    assert all(row["beta"][0] == 0 for a, row in s["conflicts"].items() if a != "alpha")
    assert s["per_principle"]["alpha"]["improved"]["k"] == 2
    assert s["consistency"]["rate"] == 1.0 and s["at_chance"] is False


def test_repair_round_fixes_the_regression_and_the_trace_keeps_both(const_dir, scripted, tmp_path):
    out = tmp_path / "pairs.jsonl"
    res = _generate(const_dir, _prompts(const_dir, tmp_path), out, "--recheck", "--repair-rounds", "1")
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    for r in rows:
        t = r["trace"]
        assert t["regressed"] == []  # every final answer is clean now
        if _revised_for(r) != "alpha":
            assert "repairs" not in t and "before_repair" not in t
            continue
        (rep,) = t["repairs"]
        assert rep["principle"] == "beta" and rep["kept"] is True and rep["regressed"] == []
        assert "BETA-FIXED" in rep["revision"] and "ALPHA-FIXED" in rep["revision"]
        assert t["before_repair"]["regressed"] == ["beta"]  # what the rounds' answer had
        assert t["recheck"] == rep["recheck"]
        # the pair and its label are the repaired answer against the initial one
        assert r[t["recheck_side"]][0]["content"] == rep["revision"]
        assert {r["chosen"][0]["content"], r["rejected"][0]["content"]} == {rep["revision"], t["initial"]}
    assert "repairs on 2 rows, kept on 2, 2 left without a regression" in res.output
    from cai.recheck import stats

    s = stats(rows)
    assert s["conflicts"]["alpha"]["beta"] == [0, 2]  # fixed
    # a kept repair counts as a revision for its principle too
    n_beta = sum(1 for r in rows if _revised_for(r) == "beta")
    assert s["conflicts"]["beta"]["alpha"] == [0, n_beta + 2]
    assert s["repairs"] == {"rows": 2, "kept": 2, "fixed": 2}
    assert rows[0]["meta"]["params"]["recheck"]["repair_rounds"] == 1


def test_a_repair_with_as_many_regressions_is_not_kept(const_dir, scripted, tmp_path):
    scripted(ScriptedRepairBreaksGamma())
    out = tmp_path / "pairs.jsonl"
    res = _generate(const_dir, _prompts(const_dir, tmp_path, 1, 1), out, "--recheck", "--repair-rounds", "3")
    assert res.exit_code == 0, res.output
    r = next(r for r in _rows(out) if _revised_for(r) == "alpha")
    t = r["trace"]
    # one try: the only regression (beta) was tried on this answer; the repair broke gamma instead
    (rep,) = t["repairs"]
    assert rep["kept"] is False and rep["regressed"] == ["gamma"]
    assert t["regressed"] == ["beta"] and "before_repair" not in t
    assert r[t["recheck_side"]][0]["content"] == t["rounds"][0]["revision"]  # the rounds' answer stays


class ScriptedNothingToFix(Scripted):
    """Every critique finds nothing to fix, so the loop stops early and no row is revised."""

    def generate(self, conversations, **kw):
        gens = super().generate(conversations, **kw)
        return [
            Generation("No changes needed.", 3) if "CritiqueRequest:" in c[-1]["content"] else g
            for c, g in zip(conversations, gens)
        ]


def test_unrevised_rows_have_an_empty_recheck(const_dir, scripted, tmp_path):
    scripted(ScriptedNothingToFix())
    out = tmp_path / "pairs.jsonl"
    res = _generate(const_dir, _prompts(const_dir, tmp_path, 1, 1), out, "--recheck", "--rounds", "1")
    assert res.exit_code == 0, res.output
    for r in _rows(out):
        assert r["label"]["tie"] and r["trace"]["recheck"] == [] and r["trace"]["regressed"] == []
    assert "re-check:" not in res.output  # nothing was re-checked


def test_recheck_is_part_of_the_resume_fingerprint(const_dir, scripted, tmp_path, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    prompts = _prompts(const_dir, tmp_path, 1, 1)
    assert _generate(const_dir, prompts, out).exit_code == 0
    before = out.read_text()
    import cai.backends

    monkeypatch.setattr(cai.backends, "load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra in (["--recheck"], ["--recheck", "--recheck-margin", "0.2"]):
        res = _generate(const_dir, prompts, out, *extra)
        assert res.exit_code == 2 and "different params" in res.output, res.output
    assert out.read_text() == before


def test_a_constitution_without_recheck_template_falls_back_to_compare(const_dir, scripted, tmp_path):
    (const_dir / "templates" / "recheck.jinja").unlink()
    out = tmp_path / "pairs.jsonl"
    res = _generate(const_dir, _prompts(const_dir, tmp_path, 1, 1), out, "--recheck")
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert rows[0]["meta"]["params"]["recheck"]["template"] == "compare.jinja"
    r = next(r for r in rows if _revised_for(r) == "alpha")
    assert r["trace"]["regressed"] == ["beta"]  # the same judgement, from the full compare prompts


def test_recheck_prompts_differ_only_in_their_last_tokens(const_dir):
    from cai.judge import recheck_template, render_recheck_prompt

    c = load_constitution(HARMLESS)
    assert recheck_template(c) == "recheck"
    conv = [{"role": "user", "content": "How do I pick a lock?"}]
    prompts = [
        render_recheck_prompt(c, "recheck", conv, "final", "initial", p) for p in c.principles.values()
    ]
    assert all(p[:-1] == prompts[0][:-1] for p in prompts)  # one shared user message
    tails = [p[-1]["content"] for p in prompts]
    assert len(set(tails)) == len(tails) == 15
    assert {re.sub(r"\d+", "N", t) for t in tails} == {"Answer to question N ("}
    assert all(q.compare in prompts[0][0]["content"] for q in c.principles.values())


# ----------------------------------------------------------------------------- `cai label --recheck`


def test_label_recheck_on_existing_pairs(const_dir, scripted, tmp_path):
    def pair(i, chosen, rejected, **extra):
        return {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            **extra,
        }

    rows = [
        pair(0, "ok ALPHA-FIXED BREAKS-BETA", "ok"),  # a human pair: chosen is "final"
        # a generate row oriented with the initial answer as chosen: the revision is "final"
        pair(1, "ok", "ok GAMMA-FIXED", trace={"initial": "ok", "rounds": []}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labelled.jsonl"
    res = _run(["label", "--pairs", inp, "--constitution", const_dir, "--out", out, "--recheck"])
    assert res.exit_code == 0, res.output
    got = {r["id"]: r for r in _rows(out)}
    t0, t1 = got["p0"]["trace"], got["p1"]["trace"]
    assert t0["recheck_side"] == "chosen" and t0["regressed"] == ["beta"]
    assert {e["principle"]: e["p_final_better"] for e in t0["recheck"]} == pytest.approx(
        {"alpha": 0.9, "beta": 0.1, "gamma": 0.5}
    )
    assert t1["recheck_side"] == "rejected" and t1["regressed"] == [] and t1["initial"] == "ok"
    assert got["p1"]["label"]["p_chosen"] <= 0.5  # the label still speaks about `chosen`
    assert got["p0"]["meta"]["params"]["recheck"] == {
        "principles": "all",
        "template": "recheck.jinja",
        "margin": 0.1,
        "options": ["A", "B"],
    }
    summary = json.loads((tmp_path / "labelled.summary.json").read_text())
    assert summary["recheck"]["rows_with_regression"]["k"] == 1
    assert "re-check: 2 rows under 3 principles" in res.output


# ----------------------------------------------------------------------------- reports


def _human_file(rows, path):
    """A person who always prefers the row's chosen response."""
    path.write_text(
        "".join(
            json.dumps(
                {
                    **{k: r[k] for k in ("id", "prompt", "chosen", "rejected")},
                    "label": {"p_chosen": 1.0, "source": "human", "annotator": "ann"},
                }
            )
            + "\n"
            for r in rows
        )
    )
    return path


def test_agreement_report_shows_the_recheck_table_and_heat_map(const_dir, scripted, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert _generate(const_dir, _prompts(const_dir, tmp_path), out, "--recheck").exit_code == 0
    rep = tmp_path / "agreement"
    human = _human_file(_rows(out), tmp_path / "human.jsonl")
    res = _run(["agreement", "--ai", out, "--human", human, "--out", rep])
    assert res.exit_code == 0, res.output
    m = json.loads((rep / "agreement.json").read_text())
    assert m["recheck"]["conflicts"]["alpha"]["beta"] == [2, 2] and m["recheck"]["at_chance"] is False
    md = (rep / "agreement.md").read_text()
    assert "## Re-check: what the revisions did to every principle" in md
    from cai.recheck import share, share_txt

    n_beta = sum(1 for r in _rows(out) if _revised_for(r) == "beta")
    assert f"| beta | 5 | {share_txt(share(n_beta, 5))} | {share_txt(share(2, 5))} |" in md
    assert "| alpha | 0/2 | 2/2 | 0/2 |" in md  # the conflict matrix row for alpha
    assert (rep / "recheck_conflicts.png").stat().st_size > 1000
    page = (rep / "agreement.html").read_text()
    assert "<h2>Re-check" in page and page.count("data:image/png;base64") == 2  # the heat map is embedded


@pytest.fixture
def tiny_rm(tmp_path, tiny_reward_base) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "tiny-rm"
    cfg = AutoConfig.from_pretrained(tiny_reward_base, num_labels=1)
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_reward_base).save_pretrained(out)
    return out


def test_eval_report_says_a_position_biased_judge_is_at_chance(const_dir, scripted, tiny_rm, tmp_path):
    scripted(Scripted(biased=True))
    out = tmp_path / "pairs.jsonl"  # --no-label: revision preferred (this judge's labels are all 0.5)
    res = _generate(const_dir, _prompts(const_dir, tmp_path), out, "--recheck", "--no-label")
    assert res.exit_code == 0, res.output
    assert "warning: the re-check judge is at chance: both orders agreed on the better response in 0.0%" in (
        res.output
    )
    assert "less often than a coin's 50%, so which response wins depends on where it is shown" in res.output
    rep = tmp_path / "report"
    res = _run(["eval", "--rm", tiny_rm, "--pairs", out, "--out", rep, "--no-probes", "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    md = (rep / "report.md").read_text()
    assert "The test pairs' re-check judge is at chance" in md  # among the verdicts at the top
    assert "**the re-check judge is at chance" in md
    assert "## Re-check: what the revisions did to every principle" in md and "(at chance)" in md
    assert (rep / "recheck_conflicts.png").exists()
    assert json.loads((rep / "metrics.json").read_text())["recheck"]["at_chance"] is True


# ----------------------------------------------------------------------------- training data


def test_train_drop_regressed_leaves_them_out_and_says_so(const_dir, scripted, tiny_reward_base, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert _generate(const_dir, _prompts(const_dir, tmp_path), out, "--recheck").exit_code == 0
    rm = tmp_path / "rm"
    args = ["train", "--pairs", out, "--out", rm, "--base", tiny_reward_base, "--max-length", "64"]
    res = _run([*args, "--drop-regressed", "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    rec = json.loads((rm / "cai_train_config.json").read_text())
    assert rec["config"]["drop_regressed"] is True
    assert rec["data"]["train"]["regressed"] == {"rechecked": 5, "dropped": 2}
    assert rec["data"]["train"]["rows"] == 3
    assert "2 of the 5 re-checked pairs left out" in (rm / "README.md").read_text()
    # the one-line jq filter in docs/pairs-contract.md keeps the same rows
    if shutil.which("jq"):
        kept = subprocess.run(
            ["jq", "-c", "select((.trace.regressed // []) | length == 0)", str(out)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert len(kept) == 3 and all(not json.loads(x)["trace"]["regressed"] for x in kept)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "pairs-contract.md").read_text()
    assert "jq -c 'select((.trace.regressed // []) | length == 0)'" in doc


def test_train_drop_regressed_needs_a_recheck(tmp_path, no_model):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "Hi?", "chosen": "a", "rejected": "b"}) + "\n")
    res = _run(["train", "--pairs", p, "--out", tmp_path / "rm", "--drop-regressed"])
    assert res.exit_code == 2 and "no row carries a re-check" in res.output
    assert res.output.strip().count("\n") == 0


# ----------------------------------------------------------------------------- bad input


def _no_compare(d: Path):
    (d / "principles" / "beta.txt").write_text("critique: c-beta\nrevision: r-beta\n")


def _empty_compare(d: Path):
    (d / "principles" / "beta.txt").write_text("critique: c-beta\nrevision: r-beta\ncompare:\n")


def _one_question(d: Path):
    (d / "templates" / "recheck.jinja").write_text(
        '{% call message("user") %}{{ response_a }} {{ response_b }}{% endcall %}'
    )


@pytest.mark.parametrize(
    "mutate, extra, expect",
    [
        (_no_compare, ["--recheck"], "beta.txt: missing or empty section(s) compare:"),
        (_empty_compare, ["--recheck"], "beta.txt: missing or empty section(s) compare:"),
        (_one_question, ["--recheck"], "recheck.jinja: renders the same prompt for every principle"),
        (None, ["--recheck", "--repair-rounds", "-1"], "--repair-rounds must be >= 0, not -1"),
        (
            None,
            ["--recheck", "--recheck-margin", "0.7"],
            "--recheck-margin must be between 0.0 and 0.5, not 0.7",
        ),
        (None, ["--recheck", "--recheck-margin", "-0.1"], "--recheck-margin must be between 0.0 and 0.5"),
        (None, ["--repair-rounds", "2"], "--repair-rounds 2 repairs what the re-check finds; add --recheck"),
        (None, ["--recheck", "--pair-mode", "samples"], "use it with --pair-mode revision"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(const_dir, tmp_path, no_model, mutate, extra, expect):
    if mutate:
        mutate(const_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I pick a lock?\n")
    out = tmp_path / "pairs.jsonl"
    res = _generate(const_dir, prompts, out, *extra)
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith("Error: ") and "\n" not in line and "Traceback" not in line
    assert expect in line
    assert not out.exists()


def test_label_bad_margin_is_one_line(tmp_path, no_model):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "Hi?", "chosen": "a", "rejected": "b"}) + "\n")
    res = _run(
        [
            "label",
            "--pairs",
            p,
            "--constitution",
            HARMLESS,
            "--out",
            tmp_path / "o.jsonl",
            "--recheck",
            "--recheck-margin",
            "0.51",
        ]
    )
    assert res.exit_code == 2 and res.output.strip() == (
        "Error: --recheck-margin must be between 0.0 and 0.5, not 0.51"
    )


# ----------------------------------------------------------------------------- the embedded model


@pytest.mark.e2e
def test_default_model_recheck_runs_end_to_end_and_says_the_judge_is_at_chance(default_model_dir, tmp_path):
    """The real SmolLM2-135M, a noise-level judge: 3 prompts, 1 round, 8 new tokens. Every revised
    pair is re-checked under the 15 harmless principles, a repair round runs where one regressed,
    and the summary and the agreement report say the judge is at chance."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I pick a lock?\nHow can I find out where my ex lives now?\nWrite a haiku.\n")
    out = tmp_path / "pairs.jsonl"
    args = ["generate", "--constitution", HARMLESS, "--prompts", prompts, "--out", out, "--rounds", "1"]
    res = _run([*args, "--max-new-tokens", "8", "--no-early-stop", "--recheck", "--repair-rounds", "1"])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    ids = load_constitution(HARMLESS).ids
    rechecked = [r for r in rows if r["trace"]["recheck"]]
    assert rechecked, "the model revised nothing"
    for r in rechecked:
        t = r["trace"]
        assert [e["principle"] for e in t["recheck"]] == ids
        assert all(0.0 <= e["p_final_better"] <= 1.0 and len(e["orders"]) == 2 for e in t["recheck"])
        assert set(t["regressed"]) <= set(ids)
        # a repair was tried exactly where the rounds' answer regressed (kept or not)
        assert ("repairs" in t) == bool(t["regressed"] or "before_repair" in t)
    assert "warning: the re-check judge is at chance" in res.output
    rep = tmp_path / "agreement"
    human = _human_file(rows, tmp_path / "human.jsonl")
    res = _run(["agreement", "--ai", out, "--human", human, "--out", rep])
    assert res.exit_code == 0, res.output
    md = (rep / "agreement.md").read_text()
    assert "The re-check judge is at chance" in md and "(at chance)" in md
    assert (rep / "recheck_conflicts.png").exists()
