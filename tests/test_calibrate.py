"""`cai calibrate`, `cai label --calibration` and prediction-powered rates: known synthetic judges.

The judge is a fake backend (tests/test_feedback.py's FakeJudge) whose probabilities depend on a
quality hidden in the response text, so labels are produced by the real `cai label` code path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import HARMLESS
from test_feedback import FakeJudge, _shown

from cai import calibration, ppi
from cai.cli import cli
from cai.configs import LabelConfig
from cai.feedback import run_label
from cai.prefrate import preference_rates
from cai.records import read_pairs

N_PAIRS = 60


def _quality(text: str) -> float:
    return float(text.rsplit(" q=", 1)[1]) if " q=" in text else 0.0


def pairs_file(path, n=N_PAIRS, seed=0):
    """Pairs whose responses carry a hidden quality q; people prefer the higher q (told apart below)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        qa, qb = rng.normal(size=2).round(3)
        rows.append(
            {
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": f"question {i}?"}],
                "chosen": [{"role": "assistant", "content": f"answer {i} one q={qa}"}],
                "rejected": [{"role": "assistant", "content": f"answer {i} two q={qb}"}],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge(scale=4.0, bias=0.0):
    """Overconfident when scale is large: P(A) = σ(scale · (q_A − q_B) + bias)."""

    def p_a(prompt):
        a, b = _shown(prompt)
        return 1 / (1 + math.exp(-(scale * (_quality(a) - _quality(b)) + bias)))

    return FakeJudge(p_a=p_a)


def human_file(pairs, path, ids=None, seed=1, noise=1.0):
    """People pick by q plus noise: the judge has signal but is overconfident."""
    rng = np.random.default_rng(seed)
    out = []
    for r in read_pairs(pairs):
        if ids is not None and r["id"] not in ids:
            continue
        d = _quality(r["chosen"][0]["content"]) - _quality(r["rejected"][0]["content"])
        p = float(d + noise * rng.normal() > 0)
        out.append({**r, "label": {"p_chosen": p, "source": "human", "annotator": "ann"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


@pytest.fixture
def labelled(tmp_path, monkeypatch):
    """(pairs, AI-labelled file, human file, the fake judge) from a real `cai label` run."""
    import cai.backends

    fake = judge()
    monkeypatch.setattr(cai.backends, "load_backend", lambda name, model, **kw: fake)
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    ai = tmp_path / "ai.jsonl"
    run_label(LabelConfig(pairs=str(pairs), constitution=str(HARMLESS), out=str(ai)))
    human = human_file(pairs, tmp_path / "human.jsonl")
    return pairs, ai, human, fake


def _calibrate(ai, human, out, *extra):
    return CliRunner().invoke(
        cli, ["calibrate", "--ai", str(ai), "--human", str(human), "--out", str(out), *extra]
    )


# ----------------------------------------------------------------------------- the map


def test_calibrate_writes_a_map_for_this_judge_and_label_applies_it(tmp_path, labelled):
    pairs, ai, human, fake = labelled
    res = _calibrate(ai, human, tmp_path / "calib")
    assert res.exit_code == 0, res.output
    assert "platt on 60 shared pairs" in res.output and "held-out log loss" in res.output
    rec = json.loads((tmp_path / "calib" / "calibration.json").read_text())
    assert rec["kind"] == calibration.KIND and rec["n"] == 60 and rec["map"]["method"] == "platt"
    assert rec["judge"]["model"] == "fake-judge" and rec["judge"]["principles"] == 1
    assert rec["judge"]["cot"] is False and rec["constitution"]["name"] == "harmless"
    assert 0 < rec["map"]["slope"] < 1  # the judge is overconfident: the map pulls toward ½
    for f in ("calibration.md", "calibration.html", "reliability.png"):
        assert (tmp_path / "calib" / f).stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "calib" / "calibration.html").read_text()
    cv = rec["cross_validation"]
    assert cv["calibrated"]["log_loss"] <= cv["raw"]["log_loss"]

    out = tmp_path / "calibrated.jsonl"
    run_label(
        LabelConfig(
            pairs=str(pairs),
            constitution=str(HARMLESS),
            out=str(out),
            calibration=str(tmp_path / "calib" / "calibration.json"),
        )
    )
    raw = {r["id"]: r["label"] for r in map(json.loads, ai.read_text().splitlines())}
    for r in map(json.loads, out.read_text().splitlines()):
        lab = r["label"]
        assert lab["judge"]["p_chosen"] == raw[r["id"]]["p_chosen"]  # the judge's own, kept
        want = calibration.apply(rec["map"], raw[r["id"]]["p_chosen"])
        assert lab["p_chosen"] == pytest.approx(float(want), abs=1e-6)
        assert lab["judge"]["calibration"]["method"] == "platt"
        assert r["meta"]["params"]["calibration"] == lab["judge"]["calibration"]["sha256"]
    # a calibrated file calibrates from the judge's own probabilities again, to the same map
    res = _calibrate(out, human, tmp_path / "calib2")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "calib2" / "calibration.json").read_text())["map"] == rec["map"]


def test_the_map_is_monotone_symmetric_and_never_certain():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=400)
    y = (rng.uniform(size=400) < 0.5 + 0.6 * (p - 0.5)).astype(float)
    y[:10] = 0.5  # ties count as they are
    grid = np.linspace(0, 1, 101)
    for method in ("isotonic", "platt"):
        m = calibration.fit(p, y, method)
        g = calibration.apply(m, grid)
        assert np.all(np.diff(g) >= -1e-12)
        assert np.allclose(g + calibration.apply(m, 1 - grid), 1.0, atol=1e-6)
        assert 0 < g.min() and g.max() < 1
    assert calibration.fit(p[:50], y[:50])["method"] == "platt"  # auto: small overlap
    assert calibration.fit(p, y)["method"] == "isotonic"


def test_calibrated_log_loss_beats_raw_on_held_out_folds_of_the_shared_dev_pairs(hh_dev):
    """The goal: a judge with signal (synthetic: it leans the people's way, overconfidently and
    with noise) on the shared dev pairs; held-out calibrated log loss <= raw, for both maps."""
    rows = read_pairs(hh_dev, skip_bad=True)
    rng = np.random.default_rng(0)
    z = 0.5 + rng.normal(size=len(rows))  # > 0: toward the person's pick (chosen, in HH files)
    p = 1 / (1 + np.exp(-3 * z))
    y = np.array([r["label"]["p_chosen"] for r in rows])
    assert len(rows) >= 490 and set(y) == {1.0}
    for method in ("isotonic", "platt"):
        cv = calibration.cross_validate(p, y, method, folds=5, seed=0)
        assert cv["calibrated"]["log_loss"] <= cv["raw"]["log_loss"], method
        assert cv["calibrated"]["ece"] < cv["raw"]["ece"]
        assert all(f["calibrated_log_loss"] <= f["raw_log_loss"] for f in cv["per_fold"])


# ----------------------------------------------------------------------------- which judge


def test_label_refuses_a_calibration_for_another_judge_or_constitution(tmp_path, labelled, monkeypatch):
    import cai.backends

    pairs, ai, human, fake = labelled
    assert _calibrate(ai, human, tmp_path / "calib").exit_code == 0
    path = tmp_path / "calib" / "calibration.json"
    rec = json.loads(path.read_text())

    def label(calib, constitution=HARMLESS, *extra):
        return CliRunner().invoke(
            cli,
            [
                "label",
                "--pairs",
                str(pairs),
                "--constitution",
                str(constitution),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--calibration",
                str(calib),
                *extra,
            ],
        )

    other_model = tmp_path / "other-model.json"
    other_model.write_text(json.dumps({**rec, "judge": {**rec["judge"], "model": "another-judge"}}))
    res = label(other_model)
    assert res.exit_code == 2 and "fitted for the judge model 'another-judge'" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1

    res = label(path, HARMLESS, "--principles", "2")
    assert res.exit_code == 2 and "principles = 1" in res.output

    other_const = tmp_path / "other-const.json"
    other_const.write_text(json.dumps({**rec, "constitution": {"name": "helpful", "sha256": "ab" * 32}}))
    loads = []
    monkeypatch.setattr(cai.backends, "load_backend", lambda *a, **kw: loads.append(1) or fake)
    res = label(other_const)
    assert res.exit_code == 2 and "fitted for constitution 'helpful'" in res.output
    assert not loads  # refused before a model loads

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**rec, "map": {"method": "isotonic", "x": [0.2, 0.1], "y": [0.3, 0.4]}}))
    res = label(broken)
    assert res.exit_code == 2 and "no valid map" in res.output
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.summary.json").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, labelled):
    pairs, ai, human, _ = labelled
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
    res = _calibrate(ai, other, tmp_path / "c1")
    assert res.exit_code == 2 and "shares no pair with the AI file" in res.output
    assert not (tmp_path / "c1").exists()

    bad = tmp_path / "bad.jsonl"
    lines = human.read_text().splitlines()
    row = json.loads(lines[1])
    row["label"]["p_chosen"] = 1.5
    bad.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    res = _calibrate(ai, bad, tmp_path / "c2")
    assert res.exit_code == 2 and f"{bad}:2:" in res.output and "must be in [0, 1], not 1.5" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "c2").exists()
    assert _calibrate(ai, bad, tmp_path / "c3", "--skip-bad").exit_code == 0  # skipped and counted

    nometa = tmp_path / "nometa.jsonl"
    nometa.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(x).items() if k != "meta"}) + "\n"
            for x in ai.read_text().splitlines()
        )
    )
    res = _calibrate(nometa, human, tmp_path / "c4")
    assert res.exit_code == 2 and "carries no meta" in res.output and not (tmp_path / "c4").exists()


# ----------------------------------------------------------------------------- prediction-powered rates


def _synthetic(rng, n, big_n, signal: bool, a=1.2, b=0.8, bias=0.15, noise=0.1):
    """A population whose true rate is known: each pair's P(people prefer it) is q ~ Beta(1.2, 0.8)
    (mean 0.6), a person's label is Bernoulli(q); the judge says q squeezed toward ½ (as a small
    judge's probabilities are), shifted by a bias, plus noise (without signal: bias and noise only)."""
    q = rng.beta(a, b, size=n + big_n)
    y = (rng.uniform(size=n) < q[:n]).astype(float)
    f = 0.5 + bias + noise * rng.normal(size=n + big_n) + (0.6 * (q - 0.5) if signal else 0.0)
    f = np.clip(f, 0, 1)
    return y, f[:n], f[n:], a / (a + b)


@pytest.mark.parametrize("signal", [True, False])
def test_ppi_covers_the_true_rate_and_is_narrower_when_the_judge_has_signal(signal):
    """The goal: 200 synthetic data sets (a judge with a known bias and noise; 80 pairs with human
    and AI labels, 2,000 with AI labels only): the 95% PPI interval covers the true rate in >= 93%
    of them, and is narrower than the human-only interval in every one where the judge carries
    signal (measured: 194/200 covered, 200/200 narrower, width 0.87x on average)."""
    rng = np.random.default_rng(24)
    covered = narrower = ai_covered = 0
    ratios = []
    for _ in range(200):
        y, f_lab, f_unl, theta = _synthetic(rng, 80, 2000, signal)
        e = ppi.estimates(y, f_lab, f_unl)
        lo, hi = e["ppi"]["ci"]
        covered += lo <= theta <= hi
        h = e["human"]["ci"]
        narrower += (hi - lo) < (h[1] - h[0])
        ratios.append((hi - lo) / (h[1] - h[0]))
        ai_covered += e["ai"]["ci"][0] <= theta <= e["ai"]["ci"][1]
        if e["ppi"]["lambda"] == 0:
            assert e["ppi"]["ci"] == e["human"]["ci"]  # nothing to gain: human labels alone
        else:
            assert e["ppi"]["n_effective"] >= 80  # never worth fewer than the slice itself
    assert covered >= 0.93 * 200
    assert ai_covered <= 0.05 * 200  # the judge's bias: AI labels alone miss the truth
    if signal:
        assert narrower == 200 and np.mean(ratios) < 0.9
    else:  # nothing to gain, and nothing lost
        assert 0.97 < np.mean(ratios) <= 1.0


def test_ppi_known_values():
    y = np.array([1, 0, 1, 1, 0, 1.0])
    f = np.array([0.9, 0.2, 0.7, 0.8, 0.4, 0.6])
    fu = np.array([0.5, 0.7, 0.3, 0.9, 0.8, 0.6, 0.4, 0.7])
    lam = np.cov(y, f)[0, 1] / (np.var(f, ddof=1) + len(y) / len(fu) * np.var(fu, ddof=1))
    est = lam * fu.mean() + (y - lam * f).mean()
    var = lam**2 * np.var(fu, ddof=1) / len(fu) + np.var(y - lam * f, ddof=1) / len(y)
    r = ppi.ppi_mean(y, f, fu)
    assert r["lambda"] == pytest.approx(lam, abs=1e-4) and r["estimate"] == pytest.approx(est, abs=1e-4)
    assert r["se"] == pytest.approx(math.sqrt(var), abs=1e-6)
    assert r["n_effective"] == pytest.approx(np.var(y, ddof=1) / var, abs=0.1)
    # a judge that runs against people is not used
    assert ppi.ppi_mean(y, 1 - f, 1 - fu)["lambda"] == 0.0
    assert ppi.ppi_mean([], [], fu)["estimate"] is None


def test_preference_rates_orient_to_the_revision_and_group_by_principle():
    """Rows from `cai generate` put the judge's pick in `chosen`; the rate is about the revision."""
    ai, human = {}, []
    for i in range(40):
        rev_first = i % 3 != 0
        revision, initial = f"revised {i}", f"initial {i}"
        ch, rj = (revision, initial) if rev_first else (initial, revision)
        principle = "harm" if i % 2 else "privacy"
        ai[f"g{i}"] = {
            "id": f"g{i}",
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": ch}],
            "rejected": [{"role": "assistant", "content": rj}],
            "label": {"p_chosen": 0.7, "source": "ai", "judge": {"principles": ["x"]}},
            "trace": {
                "initial": initial,
                "rounds": [{"principle": principle, "critique": "c", "revision": revision}],
            },
        }
        if i < 20:  # people prefer the revision on even pairs
            p_rev = 1.0 if i % 2 == 0 else 0.0
            human.append({"pair_id": f"g{i}", "p": p_rev if rev_first else 1 - p_rev, "annotator": "a"})
    r = preference_rates(ai, human)
    assert r["target"] == "the revision"
    assert set(r["per_principle"]) == {"harm", "privacy"}
    o = r["overall"]
    assert o["pairs"] == 40 and o["human_labelled"] == 20 and o["human"]["estimate"] == 0.5
    f_rev = [0.7 if i % 3 != 0 else 0.3 for i in range(40)]
    assert o["ai"]["estimate"] == pytest.approx(np.mean(f_rev), abs=1e-4)
    want = ppi.ppi_mean([1.0 if i % 2 == 0 else 0.0 for i in range(20)], f_rev[:20], f_rev[20:])
    assert o["ppi"] == want
    assert r["per_principle"]["privacy"]["human"]["estimate"] == 1.0  # even pairs: privacy, revision wins
    assert r["per_principle"]["harm"]["human"]["estimate"] == 0.0
