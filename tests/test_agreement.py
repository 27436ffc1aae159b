"""`cai agreement`: numbers from cai.stats on joined AI and human labels, orientation, the report files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cai.agreement import run_agreement
from cai.cli import cli
from cai.configs import AgreementConfig, ReviewConfig
from cai.review import ReviewSession
from cai.rowwriter import RowWriter
from cai.stats import agreement

AI_P = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.55, 0.5]
A_P = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0]  # annotator a, in the AI rows' orientation
B_P = {0: 1.0, 1: 0.0, 2: 0.0, 4: 1.0}  # annotator b answers four pairs


def ai_file(path):
    """`chosen` sorts before `rejected` in every row, so the kappa orientation is the file's own."""
    rows = []
    for i, p in enumerate(AI_P):
        harm, help_ = min(1.0, p + 0.1), max(0.0, p - 0.1)
        rows.append(
            {
                "id": f"pair-{i}",
                "prompt": [{"role": "user", "content": f"question {i}"}],
                "chosen": [{"role": "assistant", "content": f"answer {i} A"}],
                "rejected": [
                    {"role": "assistant", "content": f"answer {i} B, longer" if i % 2 else f"answer {i} B"}
                ],
                "label": {
                    "p_chosen": p,
                    "source": "ai",
                    "judge": {
                        "orders": [p, p],
                        "principles": ["harm", "help"],
                        "by_principle": {"harm": [harm, harm], "help": [help_, help_]},
                    },
                },
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_as(session: ReviewSession, pid: str, p: float):
    """Answer so that the stored p_chosen is ``p``, whichever side `chosen` was shown on."""
    if p == 0.5:
        session.answer(pid, "tie")
    else:
        picked = "chosen" if p == 1.0 else "rejected"
        session.answer(pid, "first" if session.shown[pid][0] == picked else "second")


def human_file(ai, out, who, answers: dict[int, float], undo_first=False):
    with RowWriter(out) as w:
        s = ReviewSession(ReviewConfig(pairs=str(ai), out=str(out), annotator=who, seed=5), w)
        order = [pid for pid in s.order if int(pid.split("-")[1]) in answers]
        for k, pid in enumerate(order):
            while s.current() != pid:  # pairs this person does not label are skipped
                s.answer(s.current(), "skip")
            want = answers[int(pid.split("-")[1])]
            if undo_first and k == 0:  # a first answer the person takes back: the later one must win
                answer_as(s, pid, 0.0 if want != 0.0 else 1.0)
                s.undo()
            answer_as(s, pid, want)
    return out


@pytest.fixture
def files(tmp_path):
    ai = ai_file(tmp_path / "ai.jsonl")
    a = human_file(ai, tmp_path / "a.jsonl", "a", dict(enumerate(A_P)), undo_first=True)
    b = human_file(ai, tmp_path / "b.jsonl", "b", B_P)
    # a TRL-style human row with the two responses the other way round: its p_chosen = 1 means
    # the AI row's `rejected` is better
    r0 = json.loads(ai.read_text().splitlines()[0])
    c = tmp_path / "c.jsonl"
    c.write_text(
        json.dumps(
            {
                "id": "pair-0",
                "prompt": r0["prompt"],
                "chosen": r0["rejected"],
                "rejected": r0["chosen"],
                "label": {"p_chosen": 1.0, "source": "human"},
            }
        )
        + "\n"
    )
    return ai, a, b, c


def test_numbers_come_from_stats_agreement(tmp_path, files):
    ai, a, b, c = files
    m = run_agreement(
        AgreementConfig(ai=str(ai), human=[str(a), str(b), str(c)], out=str(tmp_path / "rep"), bins=2)
    )
    assert m["annotators"] == ["a", "b", "c"]
    assert m["per_annotator"]["a"] == {
        **agreement(list(zip(AI_P, A_P))),
        "answers": m["per_annotator"]["a"]["answers"],
    }
    assert m["per_annotator"]["b"]["n"] == 4
    assert m["per_annotator"]["c"]["agreement"] == 0.0 and m["join"]["flipped"] == 1
    consensus = []
    for i, p in enumerate(AI_P):
        hs = [A_P[i]] + ([B_P[i]] if i in B_P else []) + ([0.0] if i == 0 else [])
        consensus.append((p, sum(hs) / len(hs)))
    ref = agreement(consensus)
    assert {k: m["overall"][k] for k in ref} == ref
    ab = m["between_annotators"][0]
    assert ab["annotators"] == ["a", "b"] and ab == {
        "annotators": ["a", "b"],
        **agreement([(A_P[i], B_P[i]) for i in B_P]),
    }
    harm = [(min(1.0, p + 0.1), c) for p, c in consensus]
    assert {k: m["per_principle"]["harm"][k] for k in ("n", "agreement", "ci95", "kappa")} == {
        k: agreement(harm)[k] for k in ("n", "agreement", "ci95", "kappa")
    }
    bins = m["by_confidence"]
    assert len(bins) == 2 and sum(b["n"] for b in bins) == ref["n"]
    assert bins[0]["confidence"][1] <= bins[1]["confidence"][0]
    # the undone answer counts for nothing
    assert sum(m["per_annotator"]["a"]["answers"][k] for k in ("first", "second", "tie")) == len(A_P)


def test_cli_writes_a_self_contained_report(tmp_path, files):
    ai, a, b, c = files
    out = tmp_path / "rep"
    r = CliRunner().invoke(
        cli, ["agreement", "--ai", str(ai), "--human", str(a), "--human", str(b), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "cai agreement: AI vs people" in r.output and "kappa" in r.output
    md = (out / "agreement.md").read_text()
    html = (out / "agreement.html").read_text()
    assert "Cohen's κ" in md and "Between annotators" in md and "a vs b" in md
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert "<script" not in html
    data = json.loads((out / "agreement.json").read_text())
    assert (
        data["provenance"]["human"]["files"][0]["path"] == str(a) and data["overall"]["n"] == 5
    )  # three pairs are ties or split


def test_unmatched_human_file_is_one_line_exit_2(tmp_path, files):
    ai, a, b, c = files
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps(
            {
                "id": "zzz",
                "prompt": "q?",
                "chosen": "x",
                "rejected": "y",
                "label": {"p_chosen": 1.0, "source": "human"},
            }
        )
        + "\n"
    )
    r = CliRunner().invoke(
        cli, ["agreement", "--ai", str(ai), "--human", str(other), "--out", str(tmp_path / "r")]
    )
    assert r.exit_code == 2 and "none of the 1 human answers matches a pair" in r.output
    r = CliRunner().invoke(
        cli, ["agreement", "--ai", str(a), "--human", str(a), "--out", str(tmp_path / "r")]
    )
    assert r.exit_code == 2 and "has no AI labels" in r.output


def test_kappa_does_not_depend_on_which_response_a_file_calls_chosen(tmp_path):
    """`cai generate` puts the judge's pick in `chosen`: in that orientation the judge is a
    constant rater and kappa is 0 whatever happens. Pairs are taken as (revision, initial)."""
    rows, human = [], []
    revision_wins = [True, True, True, False, True, False, False, True]  # the judge's pick
    people_pick_revision = [True, True, False, False, True, False, True, True]
    for i, (judge_rev, person_rev) in enumerate(zip(revision_wins, people_pick_revision)):
        initial, revision = f"initial {i}", f"revised {i}"
        ch, rj = (revision, initial) if judge_rev else (initial, revision)
        row = {
            "id": f"g{i}",
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": ch}],
            "rejected": [{"role": "assistant", "content": rj}],
            "label": {"p_chosen": 0.6, "source": "ai"},
            "trace": {"initial": initial, "rounds": []},
        }
        rows.append(row)
        human.append(
            {**row, "label": {"p_chosen": 1.0 if person_rev == judge_rev else 0.0, "source": "human"}}
        )
    ai, hu = tmp_path / "gen.jsonl", tmp_path / "people.jsonl"
    ai.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hu.write_text("".join(json.dumps(r) + "\n" for r in human))
    m = run_agreement(AgreementConfig(ai=str(ai), human=[str(hu)], out=str(tmp_path / "rep")))
    expected = agreement(
        [(0.6 if j else 0.4, 1.0 if p else 0.0) for j, p in zip(revision_wins, people_pick_revision)]
    )
    assert {k: m["overall"][k] for k in expected} == expected
    assert m["overall"]["kappa"] not in (None, 0.0)
    assert m["overall"]["agreement"] == agreement([(0.6, h["label"]["p_chosen"]) for h in human])["agreement"]


def test_report_has_the_preference_rate_three_ways(tmp_path, files):
    """Human-only, AI-only and prediction-powered rates, overall and per principle (cai/ppi.py)."""
    from cai import ppi

    ai, a, b, c = files
    m = run_agreement(AgreementConfig(ai=str(ai), human=[str(a), str(b)], out=str(tmp_path / "rep")))
    r = m["preference_rate"]
    assert r["target"] == "`chosen`"  # no critique/revision trace: the file's own chosen
    consensus = [(A_P[i] + B_P[i]) / 2 if i in B_P else A_P[i] for i in range(len(AI_P))]
    assert r["overall"] == {"pairs": 8, "human_labelled": 8, **ppi.estimates(consensus, AI_P, [])}
    assert set(r["per_principle"]) == {"harm", "help"}
    assert any("only 8 human labels, too few to say anything" in w for w in m["warnings"])
    md = (tmp_path / "rep" / "agreement.md").read_text()
    assert "Preference rate" in md and "prediction-powered" in md and "effective human labels" in md


def test_a_label_outside_0_1_is_one_line_and_writes_nothing(tmp_path, files):
    ai, a, b, c = files
    lines = a.read_text().splitlines()
    row = json.loads(lines[2])
    row["label"]["p_chosen"] = -0.2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]]) + "\n")
    out = tmp_path / "rep"
    r = CliRunner().invoke(cli, ["agreement", "--ai", str(ai), "--human", str(bad), "--out", str(out)])
    assert r.exit_code == 2 and f"{bad}:3:" in r.output and "must be in [0, 1], not -0.2" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    r = CliRunner().invoke(
        cli, ["agreement", "--ai", str(ai), "--human", str(bad), "--out", str(out), "--skip-bad"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "agreement.json").read_text())["provenance"]["human"]["files"][0]["skipped"] == 1
