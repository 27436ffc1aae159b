"""`cai eval` and `cai compare` end to end on tiny in-process models (seconds, not minutes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cai.cli import cli

HARMLESS = Path(__file__).resolve().parents[1] / "constitutions" / "harmless"

QUESTIONS = [
    "How do I pick a lock?",
    "What is a good pasta recipe?",
    "How can I find someone's address?",
    "Tell me a joke about cats.",
    "How do I make my neighbour's dog stop barking?",
    "What household chemicals are dangerous to mix?",
    "Write a short poem about rain.",
    "How do I get back at a coworker?",
    "Can you explain photosynthesis?",
    "How do I cheat on a test?",
]


def write_pairs(path: Path, n: int, offset: int = 0) -> Path:
    """n raw HH-RLHF rows (transcripts), the format of the shared data."""
    with open(path, "w") as f:
        for i in range(n):
            q = QUESTIONS[(i + offset) % len(QUESTIONS)] + f" (case {i + offset})"
            good = (
                "I'd rather not help with anything harmful, "
                f"but here is something safe about case {i + offset}."
            )
            bad = "Sure! " + "Here is exactly how to do it, step by step. " * (1 + (i % 3))
            chosen, rejected = (
                (good, bad) if i % 2 == 0 else (bad + " Be careful.", good)
            )  # some humans like the long one
            f.write(
                json.dumps(
                    {
                        "chosen": f"\n\nHuman: {q}\n\nAssistant: {chosen}",
                        "rejected": f"\n\nHuman: {q}\n\nAssistant: {rejected}",
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny_reward_base) -> Path:
    """An untrained 1-output classifier on the tiny base: a valid reward-model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-rm")
    cfg = AutoConfig.from_pretrained(tiny_reward_base, num_labels=1)
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_reward_base).save_pretrained(out)
    return out


def run(args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return r


def test_eval_cli_writes_the_report(tmp_path, tiny_rm):
    pairs = write_pairs(tmp_path / "test.jsonl", 8)
    shift = write_pairs(tmp_path / "shift.jsonl", 6, offset=3)
    out = tmp_path / "report"
    r = run(
        [
            "eval",
            "--rm",
            tiny_rm,
            "--rm",
            tiny_rm,
            "--name",
            "a",
            "--name",
            "b",
            "--pairs",
            pairs,
            "--out",
            out,
            "--bootstrap",
            100,
            "--shift-pairs",
            shift,
            "--probe-limit",
            4,
        ]
    )
    assert r.exit_code == 0, r.output
    assert "cai eval: 8 pairs" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"a", "b"} and m["models"]["a"]["accuracy"]["n"] == 8
    assert m["models"]["a"]["probes"]["pairs"] == 4 and m["models"]["a"]["shift"]["accuracy"]["n"] == 6
    # the same model twice: the report must not claim a difference
    assert not m["comparisons"][0]["significant"]
    assert "same call on every one" in m["comparisons"][0]["verdict"]
    for f in (
        "report.md",
        "report.html",
        "accuracy.png",
        "reliability.png",
        "margins.png",
        "length_bias.png",
    ):
        assert (out / f).stat().st_size > 0


def test_eval_cli_errors(tmp_path, tiny_rm):
    pairs = write_pairs(tmp_path / "test.jsonl", 4)
    r = run(["eval", "--rm", tmp_path, "--pairs", pairs, "--out", tmp_path / "o"])
    assert r.exit_code == 2 and "not a reward-model folder" in r.stderr and "Traceback" not in r.output
    r = run(
        ["eval", "--rm", tiny_rm, "--name", "a", "--name", "b", "--pairs", pairs, "--out", tmp_path / "o"]
    )
    assert r.exit_code == 2 and "one name per reward model" in r.stderr
    r = run(["eval", "--rm", tiny_rm, "--pairs", tmp_path / "missing.jsonl", "--out", tmp_path / "o"])
    assert r.exit_code == 2 and "file not found" in r.stderr


def test_compare_dry_run_prints_an_estimate(tmp_path, tiny_model, tiny_reward_base):
    train = write_pairs(tmp_path / "train.jsonl", 6)
    test = write_pairs(tmp_path / "test.jsonl", 4, offset=5)
    r = run(
        [
            "compare",
            "--human-train",
            train,
            "--test",
            test,
            "--constitution",
            HARMLESS,
            "--out",
            tmp_path / "s",
            "--model",
            tiny_model,
            "--base",
            tiny_reward_base,
            "--dry-run",
        ]
    )
    assert r.exit_code == 0, r.output
    assert re.search(r"judge: ~[\d,]+ prompt tokens, ~\d+ s", r.stderr)
    assert "timing probe" in r.stderr and "dry run" in r.stderr
    assert not list((tmp_path / "s" / "steps").glob("*-*"))  # no step ran (only the timing cache)


def test_compare_end_to_end_and_cache(tmp_path, tiny_model, tiny_reward_base):
    train = write_pairs(tmp_path / "train.jsonl", 10)
    test = write_pairs(tmp_path / "test.jsonl", 6, offset=4)
    generated = tmp_path / "generated.jsonl"  # what `cai generate --pair-mode revision` writes
    with open(generated, "w") as f:
        for i in range(5):
            f.write(
                json.dumps(
                    {
                        "id": f"g{i}",
                        "prompt": [{"role": "user", "content": QUESTIONS[i]}],
                        "chosen": [{"role": "assistant", "content": f"A careful, safe answer {i}."}],
                        "rejected": [{"role": "assistant", "content": f"A reckless answer {i}!"}],
                        "label": {"p_chosen": 1.0, "source": "revision"},
                    }
                )
                + "\n"
            )
    out = tmp_path / "study"
    # fmt: off
    args = ["compare", "--human-train", train, "--test", test, "--constitution", HARMLESS, "--out", out,
            "--model", tiny_model, "--base", tiny_reward_base,
            "--limit", 8, "--test-limit", 6, "--bootstrap", 100,
            "--max-length", 64, "--probe-limit", 3, "--batch-size", 8, "--generated-pairs", generated]
    # fmt: on
    r = run(args)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"rm-human", "rm-ai", "rm-revision"}
    assert m["models"]["rm-ai"]["accuracy"]["n"] == 6
    lab = m["study"]["labels"]
    assert lab["human"]["n"] == 8 and 0 <= lab["human"]["agreement"] <= 1
    # one measure: the study reports the very agreement and interval of `cai label`'s summary
    (summary_file,) = (out / "steps").glob("label-*/train-ai.summary.json")
    assert json.loads(summary_file.read_text())["human"] == lab["human"]
    assert "AI judge" in m["models"]["rm-ai"]["source"]["labels_from"]
    assert "human annotators" in m["models"]["rm-human"]["source"]["labels_from"]
    assert m["models"]["rm-revision"]["source"]["n_train"] == 5
    assert not any(s["cached"] for s in m["study"]["steps"])

    # the judge never saw the human labels: its input carries neither the label nor the orientation
    (data_dir,) = (out / "steps").glob("data-*")
    judged = [json.loads(x) for x in (data_dir / "judge-input.jsonl").read_text().splitlines()]
    assert all(j["label"] == {"p_chosen": 0.5, "source": "withheld"} for j in judged)
    swaps = json.loads((data_dir / "swaps.json").read_text())
    assert 0 < sum(swaps.values()) < len(swaps)
    # both RMs trained on the same ids, in the same orientation
    (label_dir,) = (out / "steps").glob("label-*")
    h = [json.loads(x) for x in (label_dir / "train-human.jsonl").read_text().splitlines()]
    a = [json.loads(x) for x in (label_dir / "train-ai.jsonl").read_text().splitlines()]
    assert [x["id"] for x in h] == [x["id"] for x in a]
    assert [x["chosen"] for x in h] == [x["chosen"] for x in a]
    assert all(x["label"]["prior"]["source"] == "human" and x["label"]["source"] == "ai" for x in a)
    # un-swapping kept the judge's numbers consistent: p_chosen is the mean of the two orders
    assert all(abs(x["label"]["p_chosen"] - sum(x["label"]["judge"]["orders"]) / 2) < 1e-5 for x in a)

    md = (out / "report.md").read_text()
    assert "AI labels against human labels" in md and "baseline: shorter answer" in md
    assert "Steps, cache and cost" in md

    def ran():
        return {
            s["name"]: not s["cached"]
            for s in json.loads((out / "metrics.json").read_text())["study"]["steps"]
        }

    # a rerun reuses every step
    r = run(args)
    assert r.exit_code == 0, r.output
    assert not any(ran().values())
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["models"]["rm-ai"]["accuracy"] == m["models"]["rm-ai"]["accuracy"]

    # one changed evaluation setting: only the evaluation runs again
    r = run([150 if x == 100 else x for x in args])  # --bootstrap 100 -> 150
    assert r.exit_code == 0, r.output
    assert [k for k, v in ran().items() if v] == ["eval"]

    # a changed judge setting: labels and the AI-label model are redone; the human-label model,
    # whose training data did not change, is reused
    r = run(args + ["--principles", 2])
    assert r.exit_code == 0, r.output
    assert [k for k, v in ran().items() if v] == ["label", "train-ai", "eval"]

    # a crash during a step (no step.json written): the rerun redoes that step and nothing else
    steps = json.loads((out / "metrics.json").read_text())["study"]["steps"]
    ai_dir = Path(next(s["dir"] for s in steps if s["name"] == "train-ai"))
    (ai_dir / "step.json").unlink()
    r = run(args + ["--principles", 2])
    assert r.exit_code == 0, r.output
    assert [k for k, v in ran().items() if v] == ["train-ai"]
