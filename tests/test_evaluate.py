"""Metrics, probes and the report on constructed cases whose answers are known by hand."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from cai import evalstats, pairset, probes, records, verdicts
from cai import evaluate as ev
from cai.report import write_report


def pair(i, chosen, rejected, p=1.0, prompt="How do I do this?"):
    return {
        "id": f"r{i}",
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "label": {"p_chosen": p, "source": "human"},
    }


def table_scorer(table):
    """Rewards looked up by response text (unknown text scores 0)."""
    return lambda rows: [
        (
            table.get(records.response_text(r["chosen"]), 0.0),
            table.get(records.response_text(r["rejected"]), 0.0),
        )
        for r in rows
    ]


def length_scorer(rows):
    return [
        (float(len(records.response_text(r["chosen"]))), float(len(records.response_text(r["rejected"]))))
        for r in rows
    ]


def word_scorer(rows):
    """Counts words: blind to whitespace and markdown dress."""

    def n(t):
        return float(len(re.findall(r"[A-Za-z']+", t)))

    return [(n(records.response_text(r["chosen"])), n(records.response_text(r["rejected"]))) for r in rows]


@pytest.fixture
def mixed_rows():
    """Half the preferred answers are longer, half shorter, lengths all distinct."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        # unique texts (the table scorers look rewards up by text), lengths 3-29 vs 31-59 words
        a, b = (
            f"row{i} " + "word " * int(rng.integers(3, 30)),
            f"row{i} " + "talk " * int(rng.integers(31, 60)),
        )
        good, bad = (b.strip() + ".", a.strip() + ".") if i % 2 else (a.strip() + ".", b.strip() + ".")
        rows.append(pair(i, good, bad))
    return rows


# ---------------------------------------------------------------- accuracy


def test_known_accuracy_with_ties_counted_half():
    rows = [pair(0, "A", "B"), pair(1, "C", "D"), pair(2, "E", "F"), pair(3, "G", "H")]
    scorer = table_scorer({"A": 1, "B": 0, "C": 0, "D": 1, "E": 5, "F": 5, "G": 2, "H": -2})
    m = ev.evaluate({"m": scorer}, pairset.make_pairset(rows), n_boot=200, probes=False, progress=False)
    acc = m["models"]["m"]["accuracy"]
    assert acc["value"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert acc["n"] == 4 and m["models"]["m"]["ties"] == 1
    assert acc["ci"][0] <= acc["value"] <= acc["ci"][1]


def test_soft_labels_set_the_preferred_side_and_half_labels_are_dropped():
    rows = [pair(0, "A", "B", p=0.2), pair(1, "C", "D", p=0.9), pair(2, "E", "F", p=0.5)]
    ps = pairset.make_pairset(rows)
    assert ps.n == 2 and ps.dropped_label_ties == 1
    # B (the rejected side) is preferred in row 0; the model gets both rows right
    m = ev.evaluate(
        {"m": table_scorer({"A": 0, "B": 1, "C": 1, "D": 0})}, ps, n_boot=100, probes=False, progress=False
    )
    assert m["models"]["m"]["accuracy"]["value"] == 1.0


def test_trivial_baselines(mixed_rows):
    m = ev.evaluate({}, pairset.make_pairset(mixed_rows), n_boot=100, probes=False, progress=False)
    b = m["baselines"]
    assert b["always-first"]["accuracy"]["value"] == 0.5  # every pair a tie, counted ½
    assert b["always-first"]["ties"] == 60
    assert b["shorter answer"]["accuracy"]["value"] == 0.5
    assert b["longer answer"]["accuracy"]["value"] == 0.5


# ---------------------------------------------------------------- statistics


def test_mcnemar_known_values():
    assert evalstats.binom_two_sided(0, 10) == pytest.approx(2 * 0.5**10)
    assert evalstats.binom_two_sided(5, 10) == 1.0
    # exact: 10 discordant pairs all one way
    r = evalstats.mcnemar([1] * 10 + [1] * 5, [0] * 10 + [1] * 5)
    assert (r["b"], r["c"], r["method"]) == (10, 0, "exact binomial")
    assert r["p"] == pytest.approx(2 * 0.5**10)
    # large: chi-square with continuity correction, (|60-40|-1)^2/100 = 3.61
    r = evalstats.mcnemar([1] * 60 + [0] * 40, [0] * 60 + [1] * 40)
    assert r["method"].startswith("chi-square")
    assert r["p"] == pytest.approx(math.erfc(math.sqrt(3.61 / 2)), rel=1e-9)
    assert 0.05 < r["p"] < 0.06
    # huge counts do not overflow
    assert 0 < evalstats.binom_two_sided(3000, 7000) < 1e-30  # z ≈ 12


def test_paired_bootstrap_known_case():
    t = evalstats.paired_test([1.0] * 100, [0.0] * 100, n_boot=200)
    assert t["diff"] == 1.0 and t["ci"] == [1.0, 1.0] and t["significant"]
    t = evalstats.paired_test([1, 0] * 50, [0, 1] * 50, n_boot=500)
    assert t["diff"] == 0 and t["ci"][0] < 0 < t["ci"][1] and not t["significant"]
    assert "inside noise" in verdicts.comparison_verdict("a", "b", t)


def test_identical_models_show_no_difference(mixed_rows):
    ps = pairset.make_pairset(mixed_rows)
    m = ev.evaluate(
        {"one": length_scorer, "two": length_scorer}, ps, n_boot=200, probes=False, progress=False
    )
    (c,) = m["comparisons"]
    assert c["diff"] == 0 and not c["significant"] and c["mcnemar"]["p"] == 1.0
    assert "same call on every one" in c["verdict"]


def test_bootstrap_is_reproducible_and_covers_the_mean():
    x = np.random.default_rng(3).integers(0, 2, 200).astype(float)
    a, b = evalstats.mean_ci(x, 500, seed=7), evalstats.mean_ci(x, 500, seed=7)
    assert a == b and a["ci"][0] < x.mean() < a["ci"][1]
    # the interval is about ±2 standard errors wide
    se = math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert (a["ci"][1] - a["ci"][0]) == pytest.approx(4 * se, rel=0.25)


def test_rank_correlations():
    assert list(evalstats.rankdata([10, 20, 20, 5])) == [2, 3.5, 3.5, 1]
    assert evalstats.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert evalstats.pearson([1, 2, 3], [5, 5, 5]) is None


def test_calibration():
    # very confident and always right: ECE ~ 0
    assert evalstats.calibration(np.full(50, 20.0))["ece"] == pytest.approx(0, abs=1e-6)
    # ties: confidence ½, right half the time: calibrated
    assert evalstats.calibration(np.zeros(10))["ece"] == pytest.approx(0)
    # σ(2) = 0.88 confident but right only half the time: ECE = 0.38
    c = evalstats.calibration(np.array([2.0, -2.0] * 20))
    assert c["ece"] == pytest.approx(evalstats.sigmoid(2.0) - 0.5, abs=1e-9)
    assert sum(b["n"] for b in c["bins"]) == 40


# ---------------------------------------------------------------- probes


def test_length_probe_catches_a_perfectly_length_biased_model(mixed_rows):
    ps = pairset.make_pairset(mixed_rows)
    m = ev.evaluate({"len": length_scorer}, ps, n_boot=200, progress=False)
    L = m["models"]["len"]["probes"]["length"]
    assert L["preferred_longer"]["value"] == 1.0 and L["preferred_longer"]["n"] == 30
    assert L["preferred_shorter"]["value"] == 0.0 and L["preferred_shorter"]["n"] == 30
    assert L["gap"]["value"] == 1.0
    assert L["spearman_reward_length"]["value"] == pytest.approx(1.0)
    assert any("strongly length-biased" in n for n in m["notes"])


def test_length_probe_is_quiet_for_an_unbiased_model(mixed_rows):
    # a model that is always right does not care which side is longer
    good = {records.response_text(r["chosen"]): 1.0 for r in mixed_rows}
    m = ev.evaluate(
        {"good": table_scorer(good)}, pairset.make_pairset(mixed_rows), n_boot=200, progress=False
    )
    L = m["models"]["good"]["probes"]["length"]
    assert L["preferred_longer"]["value"] == L["preferred_shorter"]["value"] == 1.0
    assert not any("length-biased" in n for n in m["notes"])


def test_refusal_probe():
    rows = [pair(i, f"Here is a safe answer number {i}.", f"Bad answer {i}.") for i in range(8)]
    rows.append(pair(8, "I'm sorry, I can't help with that request.", "Sure, here is how."))
    ps = pairset.make_pairset(rows)

    def likes_refusals(rs):
        return [
            (
                float("can't" in records.response_text(r["chosen"])),
                float("can't" in records.response_text(r["rejected"])),
            )
            for r in rs
        ]

    m = ev.evaluate({"refuser": likes_refusals}, ps, n_boot=100, progress=False)
    R = m["models"]["refuser"]["probes"]["refusal"]
    assert R["excluded_already_refusals"] == 1 and R["n"] == 8
    # "I won't help with that." has no "can't": that row's refusal ties (½)
    expected = np.mean([0.5 if "won't" in probes.refusal_for(f"r{i}") else 1.0 for i in range(8)])
    assert R["value"] == pytest.approx(expected)


def test_reformatting_keeps_the_words():
    text = "First point here. Second point! A third?"
    words = re.findall(r"[A-Za-z]+", text)
    for fn in (probes.reformat_whitespace, probes.reformat_markdown):
        out = fn(text)
        assert out != text and re.findall(r"[A-Za-z]+", out) == words
    assert probes.reformat_markdown("Only one.") == "**Only one.**"


def test_format_probe_separates_sensitive_from_invariant(mixed_rows):
    ps = pairset.make_pairset(mixed_rows)
    m = ev.evaluate({"words": word_scorer, "chars": length_scorer}, ps, n_boot=100, progress=False)
    words = m["models"]["words"]["probes"]["format"]
    assert words["whitespace"]["reward_shift"]["value"] == 0 and words["markdown"]["flip_rate"]["value"] == 0
    chars = m["models"]["chars"]["probes"]["format"]
    assert chars["markdown"]["reward_shift"]["value"] > 0  # "- " bullets add characters


def test_distribution_shift(mixed_rows):
    ps = pairset.make_pairset(mixed_rows)
    good = {records.response_text(r["chosen"]): 1.0 for r in mixed_rows}
    shifted = pairset.make_pairset(
        [pair(i, "x" * (i + 1), "y" * (i + 2)) for i in range(20)], {"file": "other.jsonl", "n": 20}
    )
    m = ev.evaluate({"good": table_scorer(good)}, ps, shift=shifted, n_boot=200, probes=False, progress=False)
    s = m["models"]["good"]["shift"]
    assert s["accuracy"]["value"] == 0.5 and s["accuracy"]["n"] == 20  # unknown text: all ties
    assert s["change"]["value"] == pytest.approx(-0.5) and s["change"]["ci"][1] < 0


def test_below_baseline_and_chance_are_said_out_loud(mixed_rows):
    bad = {records.response_text(r["rejected"]): 1.0 for r in mixed_rows}
    m = ev.evaluate(
        {"bad": table_scorer(bad)}, pairset.make_pairset(mixed_rows), n_boot=200, probes=False, progress=False
    )
    notes = " ".join(m["notes"])
    assert "below chance" in notes and "below the trivial 'shorter answer' baseline" in notes


# ---------------------------------------------------------------- report files


def test_report_files_and_self_contained_html(tmp_path, mixed_rows):
    ps = pairset.make_pairset(mixed_rows, {"file": "test.jsonl", "sha256": "ab" * 32, "n": 60})
    m = ev.evaluate({"len": length_scorer, "words": word_scorer}, ps, shift=ps, n_boot=100, progress=False)
    paths = write_report(m, tmp_path / "rep")
    for p in paths.values():
        assert (tmp_path / "rep" / p.split("/")[-1]).stat().st_size > 0
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["models"]["len"]["accuracy"]["n"] == 60 and "_delta" not in saved["models"]["len"]
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"]?(https?:|//|[\w./-]+\.(png|css|js))", page)
    assert "<script" not in page and "<link" not in page
    md = (tmp_path / "rep" / "report.md").read_text()
    for heading in (
        "Accuracy",
        "Length bias",
        "Refusal bias",
        "Formatting sensitivity",
        "Distribution shift",
    ):
        assert heading in md
    assert "baseline: shorter answer" in md and "95% CI" in md


def test_without_probes_calibration_stays_and_a_small_lead_is_called_noise(mixed_rows):
    # right on 34 of 60 pairs: above the 50% baselines, but not by more than noise
    table = {}
    for i, r in enumerate(mixed_rows):
        table[records.response_text(r["chosen"])] = 1.0 if i < 34 else 0.0
        table[records.response_text(r["rejected"])] = 0.0 if i < 34 else 1.0
    m = ev.evaluate(
        {"meh": table_scorer(table)},
        pairset.make_pairset(mixed_rows),
        n_boot=200,
        probes=False,
        progress=False,
    )
    meh = m["models"]["meh"]
    assert "calibration" in meh and "probes" not in meh
    assert any("lead over the best trivial baseline" in n and "inside noise" in n for n in m["notes"])


# ---------------------------------------------------------------- the headline


def test_headline_says_whether_a_model_beats_the_best_baseline_and_learned_more_than_length(mixed_rows):
    # skew the set: the preferred answer is the shorter one in 40 of 60 pairs,
    # so "shorter answer" is the best baseline
    rows = [
        r
        if (i % 2 == 0 or i >= 20)
        else pair(i, records.response_text(r["rejected"]), records.response_text(r["chosen"]))
        for i, r in enumerate(mixed_rows)
    ]
    ps = pairset.make_pairset(rows, {"file": "test.jsonl", "sha256": "ab" * 32, "n": 60})
    assert (ps.len_pref < ps.len_other).sum() == 40

    def shorter(rs):
        return [(-a, -b) for a, b in length_scorer(rs)]

    good = {records.response_text(r["chosen"]): 1.0 for r in rows}
    m = ev.evaluate({"short": shorter, "good": table_scorer(good)}, ps, n_boot=200, progress=False)
    heads = {h.split(":")[0]: h for h in m["headlines"]}
    assert "does not beat the best trivial baseline, 'shorter answer'" in heads["short"]
    assert "Length-balanced accuracy 50.0%" in heads["short"] and "mostly length" in heads["short"]
    assert "beats the best trivial baseline, 'shorter answer'" in heads["good"]
    assert "Length-balanced accuracy 100.0%" in heads["good"] and "learned more than length" in heads["good"]
    line = ev.summary_line(m, "out")
    assert "short " in line and "(length-balanced 50.0%)" in line
    md_blocks = [
        b
        for b in __import__("cai.report", fromlist=["build_blocks"]).build_blocks(verdicts.annotate(m))
        if b[0] == "ul"
    ]
    assert md_blocks and md_blocks[0][1][:2] == m["headlines"]


# ---------------------------------------------------------------- length-corrected column, subsets


def _quality_plus_length(rows):
    """A reward that knows which answer is better (+1) but is swamped by length (0.05 per character)."""
    good = {records.response_text(r["chosen"]) for r in rows if r["label"]["p_chosen"] > 0.5}
    return [
        tuple(
            float(records.response_text(r[k]) in good) + 0.05 * len(records.response_text(r[k]))
            for k in ("chosen", "rejected")
        )
        for r in rows
    ]


def test_length_corrected_column_removes_a_length_lean(mixed_rows):
    from cai import lengthfit

    train = [
        pair(100 + i, r["rejected"][0]["content"] + " x" * (i % 7), r["chosen"][0]["content"])
        for i, r in enumerate(mixed_rows)
    ] + [
        pair(200 + i, r["chosen"][0]["content"], r["rejected"][0]["content"] + " y")
        for i, r in enumerate(mixed_rows)
    ]
    lengths = [
        [len(records.response_text(r["chosen"])), len(records.response_text(r["rejected"]))] for r in train
    ]
    scorer = lambda rows: _quality_plus_length(rows)  # noqa: E731  (a function object takes an attribute)
    scorer.length_correction = lengthfit.fit(_quality_plus_length(train), lengths)
    ps = pairset.make_pairset(mixed_rows, {"file": "test.jsonl", "sha256": "ab" * 32, "n": 60})
    m = ev.evaluate({"lean": scorer}, ps, n_boot=200, progress=False)
    raw, fixed = m["models"]["lean"], m["models"]["lean"]["length_corrected"]
    assert raw["probes"]["length"]["gap"]["value"] == 1.0  # raw: length decides every pair
    assert fixed["accuracy"]["value"] > 0.9 and abs(fixed["probes"]["length"]["gap"]["value"]) < 0.15
    assert verdicts.length_balanced(fixed)["value"] > 0.9 and verdicts.length_balanced(raw)["value"] == 0.5
    assert fixed["vs_raw"]["significant"] and fixed["accuracy"]["value"] >= raw["accuracy"]["value"]
    assert "With its length fit subtracted: accuracy" in m["headlines"][0]
    assert "length-corrected" in ev.summary_line(m, "out")
    md = ev_report_md(m)
    assert "length-corrected (95% CI)" in md and "lean (length-corrected)" in md
    # without the attribute (a model with no fit, or --no-length-correct) there is no column
    m2 = ev.evaluate({"lean": _quality_plus_length}, ps, n_boot=100, progress=False)
    assert "length_corrected" not in m2["models"]["lean"] and "length-corrected" not in ev_report_md(m2)


def ev_report_md(m):
    from cai.render import render_md
    from cai.report import build_blocks

    return render_md(build_blocks(m))


def rewardbench_file(tmp_path, bad_subset=None):
    """RewardBench's layout: prompt/chosen/rejected strings and a subset. In 'chat-easy' the chosen
    answer is always the longer; in 'refusals' the lengths are mixed."""
    rows = []
    for i in range(24):
        sub = "chat-easy" if i < 12 else "refusals"
        long_, short = f"A full answer number {i}, " + "with detail " * (1 + i % 4), f"No {i}."
        ch, rj = (long_, short) if sub == "chat-easy" or i % 2 else (short, long_)
        rows.append({"prompt": f"Question {i}?", "chosen": ch, "rejected": rj, "subset": sub, "id": i})
    if bad_subset is not None:
        rows[3]["subset"] = bad_subset
    path = tmp_path / "rb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rewardbench_rows_get_accuracy_per_subset_and_shortcut_flags(tmp_path):
    ps = pairset.load_pairset(rewardbench_file(tmp_path))
    assert ps.n == 24 and {r["subset"] for r in ps.rows} == {"chat-easy", "refusals"}
    m = ev.evaluate({"len": length_scorer}, ps, n_boot=200, progress=False)
    easy, ref = m["subsets"]["chat-easy"], m["subsets"]["refusals"]
    assert easy["n"] == 12 and easy["baselines"]["longer answer"]["value"] == 1.0
    assert easy["shortcut"] == ["longer answer"] and ref["shortcut"] == []
    assert ref["baselines"]["longer answer"]["value"] == 0.5 and ref["models"]["len"]["value"] == 0.5
    assert easy["models"]["len"]["ci"][0] <= easy["models"]["len"]["value"] <= easy["models"]["len"]["ci"][1]
    assert any("Subset 'chat-easy': the 'longer answer' baseline scores 100.0%" in n for n in m["notes"])
    md = ev_report_md(m)
    assert "Per subset" in md and "**yes: longer answer**" in md


@pytest.mark.parametrize("bad", [3, ["a"], ""])
def test_a_subset_that_is_not_a_string_is_one_line_and_writes_nothing(tmp_path, bad, tiny_reward_base):
    from click.testing import CliRunner

    from cai.cli import cli

    path = rewardbench_file(tmp_path, bad_subset=bad)
    import shutil

    rm = tmp_path / "rm"  # a whole one-output model folder: the pairs file is what is wrong
    shutil.copytree(tiny_reward_base, rm)
    cfg = json.loads((rm / "config.json").read_text())
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (rm / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(
        cli, ["eval", "--rm", str(rm), "--pairs", str(path), "--out", str(tmp_path / "rep")]
    )
    assert (
        res.exit_code == 2
        and f"{path}:4:" in res.output
        and "'subset' must be a non-empty string" in res.output
    )
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()
