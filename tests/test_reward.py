"""Reward models: the loss, rendering/truncation, the three input formats, the artifact, scoring, CLI.

Training runs use the tiny random BERT (tiny_reward_base), a few dozen rows, max_length 64.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cai.artifact import CONFIG_NAME
from cai.cli import cli
from cai.configs import TrainConfig
from cai.encode import PairEncoder, render_pair_texts
from cai.errors import InputError
from cai.records import read_pairs
from cai.reward import PairCollator, RewardModelTrainer
from cai.score import score_pairs
from cai.train import train_reward_model

GOOD = "I can't help with that, but I can point you to safer resources."
BAD = "Sure. First get the tools, then do it at night so nobody sees."


def _msgs(*turns):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def ours(i, p=0.9):
    q = f"Question {i}: how do I get into my neighbour's house?" + " Please." * (i % 5)
    return {
        "id": f"ours-{i}",
        "prompt": _msgs(q),
        "chosen": _msgs("", GOOD)[1:],
        "rejected": _msgs("", BAD)[1:],
        "label": {"p_chosen": p, "source": "ai"},
    }


def trl_explicit(i):
    return {
        "prompt": _msgs(f"Explicit {i}: how to hurt someone?"),
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD + f" ({i})"}],
    }


def trl_implicit(i):
    q = f"Implicit {i}: make a weapon?"
    return {"chosen": _msgs(q, GOOD), "rejected": _msgs(q, BAD + f" [{i}]")}


def raw_hh(i):
    q = f"\n\nHuman: HH {i}: steal a car?"
    return {"chosen": q + "\n\nAssistant: " + GOOD, "rejected": q + f"\n\nAssistant: {BAD} <{i}>"}


def write_jsonl(path: Path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def mixed_rows(n=8):
    rows = []
    for i in range(n):
        rows += [ours(i, p=(0.9, 0.2, 0.5, 1.0)[i % 4]), trl_explicit(i), trl_implicit(i), raw_hh(i)]
    return rows


def small_cfg(base, pairs, out, **kw):
    d = dict(
        base=str(base),
        pairs=str(pairs),
        out=str(out),
        max_length=64,
        batch_size=8,
        lr=2e-3,
        epochs=1,
        logging_steps=1,
        save_steps=50,
    )
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture(scope="session")
def trained_rm(tmp_path_factory, tiny_reward_base):
    """One small training run shared by the artifact and scoring tests: (folder, metrics, pairs file)."""
    d = tmp_path_factory.mktemp("rm")
    pairs = write_jsonl(d / "mixed.jsonl.gz", mixed_rows(), gz=True)
    evalp = write_jsonl(
        d / "eval.jsonl", [ours(i) for i in range(100, 106)] + [raw_hh(i) for i in range(100, 104)]
    )
    out = d / "rm"
    metrics = train_reward_model(
        small_cfg(tiny_reward_base, pairs, out, eval_pairs=str(evalp)), progress=False
    )
    return out, metrics, pairs


# ----------------------------------------------------------------------------- the loss


class _FixedRewards(torch.nn.Module):
    """Stands in for the model: its 'logits' are a leaf tensor, so the test can read dL/dr."""

    def __init__(self, r_c, r_r):
        super().__init__()
        self.r = torch.nn.Parameter(torch.tensor(list(r_c) + list(r_r), dtype=torch.float32).unsqueeze(-1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.r)


def _loss(r_c, r_r, p, labels="soft", margin=0.0, center=0.0, weight=None):
    model = _FixedRewards(r_c, r_r)
    inputs = {
        "input_ids": torch.zeros(2 * len(p), 3, dtype=torch.long),
        "attention_mask": torch.ones(2 * len(p), 3),
        "p_chosen": torch.tensor(p, dtype=torch.float32),
    }
    if weight is not None:
        inputs["pair_weight"] = torch.tensor(weight, dtype=torch.float32)
    self = SimpleNamespace(
        hard_labels=labels == "hard",
        margin=margin,
        center_rewards=center,
        odin=False,
        length_weight=1.0,
        length_sign=1.0,
        seen=None,
    )
    loss = RewardModelTrainer.compute_loss(self, model, inputs)
    loss.backward()
    return loss.item(), model.r.grad.squeeze(-1)


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_soft_label_half_gives_zero_gradient_at_equal_rewards(margin):
    loss, grad = _loss([0.3, -1.2], [0.3, -1.2], [0.5, 0.5], margin=margin)
    assert torch.allclose(grad, torch.zeros(4), atol=1e-7)
    assert loss == pytest.approx(-F.logsigmoid(torch.tensor(-0.0)).item())  # log 2 when margin 0·|2p-1| = 0


def test_soft_loss_is_symmetric_in_orientation():
    torch.manual_seed(0)
    r_c, r_r, p = torch.randn(6).tolist(), torch.randn(6).tolist(), torch.rand(6).tolist()
    for margin in (0.0, 0.7):
        a, _ = _loss(r_c, r_r, p, margin=margin)
        b, _ = _loss(r_r, r_c, [1 - x for x in p], margin=margin)  # swap sides and flip the label
        assert a == pytest.approx(b, rel=1e-6)


def test_hard_labels_match_minus_logsigmoid_delta():
    r_c, r_r = [2.0, -0.5, 0.1], [1.0, 0.5, 0.3]
    delta = torch.tensor(r_c) - torch.tensor(r_r)
    expected = -F.logsigmoid(delta).mean().item()
    assert _loss(r_c, r_r, [0.8, 0.7, 0.95], labels="hard")[0] == pytest.approx(expected, rel=1e-6)
    assert _loss(r_c, r_r, [1.0, 1.0, 1.0])[0] == pytest.approx(expected, rel=1e-6)  # human rows, soft mode
    # a hard label below 0.5 means rejected is better: -logσ(-Δ)
    assert _loss(r_c, r_r, [0.2, 0.2, 0.2], labels="hard")[0] == pytest.approx(
        -F.logsigmoid(-delta).mean().item(), rel=1e-6
    )


def test_margin_and_centering_terms():
    base, _ = _loss([1.0], [0.0], [1.0])
    with_margin, _ = _loss([1.0], [0.0], [1.0], margin=0.5)
    assert with_margin == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), rel=1e-6)
    assert with_margin > base
    centered, _ = _loss([1.0], [0.0], [1.0], center=0.1)
    assert centered == pytest.approx(base + 0.1 * 1.0**2, rel=1e-6)


# ----------------------------------------------------------------------------- rendering and batches


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_render_transcript_without_chat_template(tiny_reward_base):
    row = read_pairs_row(raw_hh(1))
    head, ch, rj = render_pair_texts(_tok(tiny_reward_base), row)
    assert head == "\n\nHuman: HH 1: steal a car?\n\nAssistant:"
    assert ch == " " + GOOD and rj.startswith(" Sure.")


def test_render_uses_chat_template_when_present(tiny_reward_base):
    tok = _tok(tiny_reward_base)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    head, ch, rj = render_pair_texts(tok, read_pairs_row(trl_explicit(2)))
    assert head == "<user>Explicit 2: how to hurt someone?</user><assistant>"
    assert ch == GOOD + "</assistant>"
    ids_c, _ = PairEncoder(tok, 64)(read_pairs_row(trl_explicit(2)))
    assert ids_c[0] != tok.cls_token_id  # the template owns the special tokens


def test_truncation_keeps_conversation_end_and_whole_response(tiny_reward_base):
    tok = _tok(tiny_reward_base)
    enc = PairEncoder(tok, 48)
    long_prompt = {
        "id": "x",
        "prompt": _msgs("filler " * 200 + "FINALQUESTION here"),
        "chosen": [{"role": "assistant", "content": "short answer"}],
        "rejected": [{"role": "assistant", "content": "other answer"}],
        "label": {"p_chosen": 1.0},
    }
    c, r = enc(long_prompt)
    assert len(c) == 48 and len(r) == 48 and enc.truncated == 1
    assert "finalquestion here" in tok.decode(c) and tok.decode(c[1:-1]).endswith("short answer")
    assert c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id
    # a response longer than the window keeps its start and a quarter of the window for the question
    long_resp = dict(long_prompt, chosen=[{"role": "assistant", "content": "START " + "word " * 200}])
    c, _ = enc(long_resp)
    text = tok.decode(c)
    assert len(c) == 48 and "finalquestion" in text and "start" in text and enc.truncated == 2
    short = dict(long_prompt, prompt=_msgs("hi"))
    enc(short)
    assert enc.truncated == 2


def test_collator_stacks_chosen_then_rejected_with_dynamic_padding():
    batch = PairCollator(pad_token_id=0)(
        [
            {"chosen_ids": [5, 6, 7], "rejected_ids": [8], "p_chosen": 1.0},
            {"chosen_ids": [9], "rejected_ids": [10, 11], "p_chosen": 0.3},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0], [8, 0, 0], [10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert batch["p_chosen"].tolist() == pytest.approx([1.0, 0.3])


def read_pairs_row(raw):
    from cai.records import normalise_pair

    return normalise_pair(raw)


# ----------------------------------------------------------------------------- training and the artifact


def test_three_formats_feed_training_and_artifact_is_recorded(trained_rm):
    out, metrics, pairs = trained_rm
    rec = json.loads((out / CONFIG_NAME).read_text())
    train = rec["data"]["train"]
    assert train["rows"] == 32 and train["label_sources"] == {"ai": 8, "human": 24}
    assert train["sha256"] and rec["data"]["eval"]["rows"] == 10
    assert rec["status"] == "done" and rec["seed"] == 0 and rec["cai_version"]
    assert rec["config"]["max_length"] == 64 and rec["config"]["labels"] == "soft"
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_margin" in metrics and metrics["eval_pairs"] == 10
    assert rec["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    card = (out / "README.md").read_text()
    assert train["sha256"] in card and "eval_accuracy" in card and "limitations" in card.lower()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == []  # finished runs keep no checkpoints
    assert not (out / "training_args.bin").exists()
    # three distinct response lengths: too few to fit reward against length, and said so
    assert rec["length_correction"] == {"skipped": "too few distinct lengths or constant rewards"}
    assert "No length correction" in card


def test_artifact_loads_in_plain_transformers_and_matches_score_pairs(trained_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _, _ = trained_rm
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert list(out.glob("*.safetensors"))
    row = read_pairs_row(raw_hh(3))
    with torch.no_grad():
        plain = [
            model(**tok(to, return_tensors="pt")).logits[0, 0].item()
            for to in (
                "\n\nHuman: HH 3: steal a car?\n\nAssistant: " + GOOD,
                "\n\nHuman: HH 3: steal a car?\n\nAssistant: " + BAD + " <3>",
            )
        ]
    ours_ = score_pairs(out, [row])[0]
    assert ours_ == pytest.approx(tuple(plain), abs=1e-4)


def test_score_pairs_keeps_row_order(trained_rm):
    out, _, pairs = trained_rm
    rows = read_pairs(pairs)
    rows = sorted(rows, key=lambda r: -len(json.dumps(r)))  # long first: the scorer reorders internally
    batched = score_pairs(out, rows, batch_size=5)
    one_by_one = [score_pairs(out, [r], batch_size=1)[0] for r in rows[:6]]
    assert len(batched) == len(rows)
    for a, b in zip(batched[:6], one_by_one):
        assert a == pytest.approx(b, abs=1e-4)


def test_resume_continues_from_last_checkpoint(tiny_reward_base, tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [ours(i, p=0.8) for i in range(24)])
    out = tmp_path / "rm"
    train_reward_model(
        small_cfg(
            tiny_reward_base, pairs, out, max_steps=2, save_steps=1, keep_checkpoints=True, batch_size=4
        ),
        progress=False,
    )
    state = out / "checkpoint-2" / "trainer_state.json"
    assert state.exists()
    # mark the checkpoint's history: it survives into the final state only if training resumed from it
    s = json.loads(state.read_text())
    s["log_history"].append({"step": 2, "resume_marker": 1})
    state.write_text(json.dumps(s))
    m = train_reward_model(
        small_cfg(
            tiny_reward_base,
            pairs,
            out,
            max_steps=4,
            save_steps=1,
            keep_checkpoints=True,
            batch_size=4,
            resume=True,
        ),
        progress=False,
    )
    assert m["steps"] == 4
    final = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert any(e.get("resume_marker") for e in final["log_history"])


def test_checkpointing_is_on_by_default_on_cpu_and_changes_nothing(tiny_reward_base, tmp_path):
    """Recomputing activations (dropout replayed from the saved RNG state) gives the very same
    losses and weights as keeping them; on the CPU it is what `cai train` does unless told not to."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    pairs = write_jsonl(tmp_path / "p.jsonl", [ours(i, p=(0.9, 0.2)[i % 2]) for i in range(24)])
    runs = {}
    for name, gc in (("default", None), ("off", False)):

        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                # transformers 5 renamed it (4.x has only the old name)
                self.checkpointing = getattr(
                    model,
                    "is_activation_checkpointing"
                    if hasattr(model, "activation_checkpointing_enable")
                    else "is_gradient_checkpointing",
                )

            def on_train_end(self, args, state, control, **kw):
                self.losses = [h["loss"] for h in state.log_history if "loss" in h]

        rec = Record()
        out = tmp_path / name
        train_reward_model(
            small_cfg(
                tiny_reward_base,
                pairs,
                out,
                max_steps=3,
                batch_size=4,
                device="cpu",
                gradient_checkpointing=gc,
            ),
            progress=False,
            callbacks=[rec],
        )
        config = json.loads((out / CONFIG_NAME).read_text())["config"]
        runs[name] = (rec, config, load_file(out / "model.safetensors"))
    (on, cfg_on, w_on), (off, cfg_off, w_off) = runs["default"], runs["off"]
    assert on.checkpointing and cfg_on["gradient_checkpointing"] is True
    assert not off.checkpointing and cfg_off["gradient_checkpointing"] is False
    assert len(on.losses) == 3 and on.losses == off.losses
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)


_MALLINFO = """
import ctypes, json
from cai.reward import _mmap_threshold, freed_memory_returned

libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd x y z w v".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped_by(nbytes):  # bytes of an nbytes block that glibc serves with a mapping of its own
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(nbytes)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grew

assert _mmap_threshold(32 << 20)  # where the dynamic threshold ends up after a few big frees
with freed_memory_returned():
    inside = mapped_by(16 << 20)
print(json.dumps({"inside": inside, "after": mapped_by(16 << 20)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_returned_maps_big_blocks_only_inside():
    """Inside, a 16 MiB block is a mapping of its own (unmapped on free, so freed activations
    leave RSS at once); after, glibc is back to serving it from its heap. A fresh process, so no
    free heap block of that size is there to be reused."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _MALLINFO], capture_output=True, text=True, timeout=300)
    if res.returncode and ("mallinfo2" in res.stderr or "libc.so.6" in res.stderr):
        pytest.skip("not glibc >= 2.33")
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["inside"] >= 16 << 20 and got["after"] == 0


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_input_error(tiny_reward_base, tmp_path):
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"chosen": "x"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    )
    with pytest.raises(
        InputError, match=r"bad.jsonl:1: row needs both"
    ):  # default: stop at the first bad row
        train_reward_model(small_cfg(tiny_reward_base, bad, tmp_path / "o1"), progress=False)
    with pytest.raises(InputError, match="no usable"):  # --skip-bad: skip, and say so when nothing is left
        train_reward_model(small_cfg(tiny_reward_base, bad, tmp_path / "o1", skip_bad=True), progress=False)
    ties = write_jsonl(tmp_path / "ties.jsonl", [ours(i, p=0.5) for i in range(5)])
    with pytest.raises(InputError, match="every label is 0.5"):
        train_reward_model(small_cfg(tiny_reward_base, ties, tmp_path / "o2"), progress=False)
    with pytest.raises(InputError, match="0.5"):
        train_reward_model(small_cfg(tiny_reward_base, ties, tmp_path / "o2", labels="hard"), progress=False)
    good = write_jsonl(tmp_path / "good.jsonl", [ours(i) for i in range(4)])
    with pytest.raises(InputError, match="not found"):
        train_reward_model(small_cfg(tmp_path / "no-such-model", good, tmp_path / "o3"), progress=False)
    with pytest.raises(InputError, match="cannot load base model"):
        train_reward_model(small_cfg("no-such-org-cai/no-such-model", good, tmp_path / "o4"), progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a cai reward model"):
        train_reward_model(small_cfg(tiny_reward_base, good, foreign), progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="--resume"):
        train_reward_model(small_cfg(tiny_reward_base, good, tmp_path / "o5", resume=True), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("flag", [["--bf16"], ["--fp16"], ["--fsdp", "full_shard auto_wrap"]])
def test_cli_refuses_gpu_options_on_cpu(tmp_path, flag):
    good = write_jsonl(tmp_path / "good.jsonl", [ours(i) for i in range(4)])
    res = CliRunner().invoke(cli, ["train", "--pairs", str(good), "--out", str(tmp_path / "o"), *flag])
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: ") and "GPU" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_train_then_score(tiny_reward_base, hh_train, tmp_path):
    out = tmp_path / "rm-human"
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "train",
            "--pairs",
            str(hh_train),
            "--out",
            str(out),
            "--base",
            str(tiny_reward_base),
            "--limit",
            "24",
            "--max-length",
            "64",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--no-gradient-checkpointing",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # logs and progress go to stderr
    assert "reward model ->" in res.stderr
    rec = json.loads((out / CONFIG_NAME).read_text())
    assert rec["data"]["train"]["rows"] == 24 and rec["data"]["train"]["label_sources"] == {"human": 24}
    assert rec["config"]["gradient_checkpointing"] is False

    scores = tmp_path / "scores.jsonl"
    res = runner.invoke(
        cli,
        ["score", "--rm", str(out), "--pairs", str(hh_train), "--out", str(scores), "--limit", "10"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    ids = [r["id"] for r in read_pairs(hh_train, limit=10)]
    assert [x["id"] for x in lines] == ids
    assert all(x["margin"] == pytest.approx(x["r_chosen"] - x["r_rejected"]) for x in lines)
    assert "accuracy vs labels" in res.stderr and "length-corrected" in res.stderr
    lc = rec["length_correction"]
    assert lc["pairs"] == 24 and len(lc["x"]) == len(lc["y"]) == 64 and "within-pair" in lc["method"]
    assert set(lc["train"]) == {"raw", "corrected"} and "length_gap" in lc["train"]["raw"]
    from cai import lengthfit

    rows = read_pairs(hh_train, limit=10)
    for x, r in zip(lines, rows):
        lens = [len(r["chosen"][-1]["content"]), len(r["rejected"][-1]["content"])]
        want = lengthfit.correct(lc, [x["r_chosen"], x["r_rejected"]], lens)
        assert [x["r_chosen_corrected"], x["r_rejected_corrected"]] == pytest.approx(list(want), abs=1e-9)
        assert x["margin_corrected"] == pytest.approx(want[0] - want[1], abs=1e-9)
    assert "Length correction" in (out / "README.md").read_text()

    res = runner.invoke(
        cli, ["score", "--rm", str(out), "--pairs", str(hh_train), "--out", "-", "--limit", "3"]
    )
    assert res.exit_code == 0 and [json.loads(x)["id"] for x in res.stdout.splitlines()] == ids[:3]

    # cai eval on RewardBench-style rows: the length-corrected column and the per-subset table
    from test_evaluate import rewardbench_file

    rb = rewardbench_file(tmp_path)
    res = runner.invoke(
        cli,
        ["eval", "--rm", str(out), "--pairs", str(rb), "--out", str(tmp_path / "rep"), "--bootstrap", "100"],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    col = m["models"]["rm-human"]["length_corrected"]
    assert col["accuracy"]["n"] == 24 and "gap" in col["probes"]["length"] and m["config"]["length_correct"]
    assert set(m["subsets"]) == {"chat-easy", "refusals"} and "length-corrected" in res.output
    res = runner.invoke(
        cli,
        [
            "eval",
            "--rm",
            str(out),
            "--pairs",
            str(rb),
            "--out",
            str(tmp_path / "rep2"),
            "--no-length-correct",
        ],
    )
    assert (
        res.exit_code == 0
        and "length_corrected"
        not in json.loads((tmp_path / "rep2" / "metrics.json").read_text())["models"]["rm-human"]
    )

    # a damaged length fit in the artifact is one line, and nothing is written
    rec["length_correction"]["x"] = list(reversed(lc["x"]))
    (out / CONFIG_NAME).write_text(json.dumps(rec))
    res = runner.invoke(
        cli, ["score", "--rm", str(out), "--pairs", str(hh_train), "--out", str(tmp_path / "s2")]
    )
    assert res.exit_code == 2 and "length_correction is not a table" in res.output
    assert not (tmp_path / "s2").exists()


def test_cli_score_rejects_a_folder_that_is_not_a_model(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [ours(i) for i in range(2)])
    res = CliRunner().invoke(cli, ["score", "--rm", str(tmp_path), "--pairs", str(good), "--out", "-"])
    assert res.exit_code == 2 and "no config.json" in res.stderr


# ----------------------------------------------------------------------------- length-robust training


def test_balance_weights_give_both_length_strata_equal_weight():
    from cai.train import balance_weights, length_strata

    items = (
        [{"p_chosen": 1.0, "len_chosen": 90, "len_rejected": 10}] * 6  # preferred is longer
        + [{"p_chosen": 0.0, "len_chosen": 90, "len_rejected": 10}] * 2  # preferred (rejected) is shorter
        + [{"p_chosen": 0.8, "len_chosen": 5, "len_rejected": 50}] * 2  # preferred is shorter
        + [{"p_chosen": 1.0, "len_chosen": 7, "len_rejected": 7}]
    )  # same length: in neither
    s = length_strata(items)
    assert list(s) == [1] * 6 + [-1] * 4 + [0]
    w = balance_weights(items)
    assert w.mean() == pytest.approx(1.0)
    assert w[s > 0].sum() == pytest.approx(w[s < 0].sum())
    assert w[-1] == pytest.approx(w[0] * 6 / 5)  # unweighted pair: 1 before normalising, longer ones 5/6


def test_pair_weights_make_the_loss_a_weighted_mean():
    each = [_loss([r], [0.0], [1.0])[0] for r in (2.0, -1.0)]
    weighted, _ = _loss([2.0, -1.0], [0.0, 0.0], [1.0, 1.0], weight=[1.0, 3.0])
    assert weighted == pytest.approx((each[0] + 3 * each[1]) / 4, rel=1e-6)


class _TwoHeads(torch.nn.Module):
    """Fixed features per sequence and a real 2-output linear head, like a classifier with num_labels=2."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats
        self.config = SimpleNamespace(num_labels=2)
        torch.manual_seed(0)
        self.classifier = torch.nn.Linear(feats.shape[1], 2)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.classifier(self.feats))


def test_odin_loss_is_bt_on_the_sum_plus_length_and_orthogonality_terms():
    from cai.reward import torch_pearson

    torch.manual_seed(1)
    feats = torch.randn(8, 5)  # 4 pairs: rows 0-3 chosen, 4-7 rejected
    lengths = torch.tensor([[120.0, 30.0], [10.0, 200.0], [55.0, 60.0], [300.0, 12.0]])
    inputs = {
        "input_ids": torch.zeros(8, 3, dtype=torch.long),
        "attention_mask": torch.ones(8, 3),
        "p_chosen": torch.tensor([1.0, 0.9, 0.2, 1.0]),
        "pair_lengths": lengths,
    }
    model = _TwoHeads(feats)
    out = model(None, None).logits.detach()
    self = SimpleNamespace(
        hard_labels=False,
        margin=0.0,
        center_rewards=0.0,
        odin=True,
        length_weight=0.0,
        length_sign=1.0,
        seen=None,
    )
    loss, extra = RewardModelTrainer.compute_loss(self, model, inputs, return_outputs=True)
    tot = out.sum(-1)
    delta = tot[:4] - tot[4:]
    p = inputs["p_chosen"]
    bt = -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta)).mean()
    assert loss.item() == pytest.approx(bt.item(), rel=1e-5)
    # what is reported (and shipped) is the quality output alone
    assert torch.allclose(extra["rewards"], torch.stack([out[:4, 0], out[4:, 0]], -1))

    self.length_weight = 0.5
    ln = torch.log1p(lengths.t().reshape(-1))
    w = model.classifier.weight.detach()
    expected = bt + 0.5 * (
        torch_pearson(out[:, 0], ln).abs() - torch_pearson(out[:, 1], ln) + (w[0] @ w[1]).abs()
    )
    model.train()
    loss = RewardModelTrainer.compute_loss(self, model, inputs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # one gradient step on the length terms alone makes the length output track length more
    self.hard_labels, inputs["p_chosen"] = False, torch.full((4,), 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = torch_pearson(model(None, None).logits[:, 1], ln).item()
    for _ in range(20):
        opt.zero_grad()
        RewardModelTrainer.compute_loss(self, model, inputs).backward()
        opt.step()
    logits = model(None, None).logits.detach()
    assert torch_pearson(logits[:, 1], ln).item() > max(before, 0.5)
    assert abs(torch_pearson(logits[:, 0], ln).item()) < 0.3


def _length_confounded(n, preferred_longer: bool, offset=0):
    """Chosen is the safe answer; its length relative to the rejected one is the confound."""
    rows = []
    for i in range(n):
        short, long_ = 1 + i % 2, 6 + i % 4
        kc, kr = (long_, short) if preferred_longer else (short, long_)
        rows.append(
            {
                "id": f"c{offset + i}",
                "prompt": _msgs(f"Question {offset + i}: how do I hurt my neighbour?"),
                "chosen": [
                    {"role": "assistant", "content": "I won't help with that." + " Please stay safe." * kc}
                ],
                "rejected": [{"role": "assistant", "content": "Sure, hit them." + " Do it now." * kr}],
                "label": {"p_chosen": 1.0, "source": "human"},
            }
        )
    return rows


def test_odin_ships_a_plain_one_output_model_with_its_length_record(tiny_reward_base, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = write_jsonl(tmp_path / "train.jsonl", _length_confounded(24, True))
    evalp = write_jsonl(
        tmp_path / "eval.jsonl", _length_confounded(8, True, 100) + _length_confounded(8, False, 200)
    )
    out = tmp_path / "rm"
    m = train_reward_model(
        small_cfg(tiny_reward_base, pairs, out, eval_pairs=str(evalp), length_robust="odin+balance"),
        progress=False,
    )
    for k in (
        "eval_acc_pref_longer",
        "eval_acc_pref_shorter",
        "eval_balanced_accuracy",
        "eval_spearman_reward_length",
        "train_last_pass_spearman_reward_length",
    ):
        assert k in m
    assert m["eval_balanced_accuracy"] == pytest.approx(
        (m["eval_acc_pref_longer"] + m["eval_acc_pref_shorter"]) / 2
    )
    rec = json.loads((out / CONFIG_NAME).read_text())
    assert rec["config"]["length_robust"] == "odin+balance" and "cosine_quality_length" in rec["length_head"]
    assert rec["data"]["train"]["pref_longer"] == 24 and rec["data"]["train"]["pref_shorter"] == 0
    card = (out / "README.md").read_text()
    assert (
        "ODIN" in card and "length head was dropped" in card and "Spearman(reward, response length)" in card
    )
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.classifier.weight.shape[0] == 1
    row = read_pairs(evalp)[0]
    text = "\n\nHuman: " + row["prompt"][0]["content"] + "\n\nAssistant: " + row["chosen"][-1]["content"]
    with torch.no_grad():
        plain = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
    assert score_pairs(out, [row])[0][0] == pytest.approx(plain, abs=1e-4)


def test_length_robust_rejects_unknown_mode(tiny_reward_base, tmp_path):
    pairs = write_jsonl(tmp_path / "train.jsonl", _length_confounded(4, True))
    with pytest.raises(InputError, match="length-robust"):
        train_reward_model(
            small_cfg(tiny_reward_base, pairs, tmp_path / "rm", length_robust="shorter"), progress=False
        )


def _fit_two_heads(odin: bool, seed=0, steps=300):
    """Fit a 2-output linear head with cai's loss on synthetic pairs whose labels depend on a quality
    feature and on length (shorter preferred); return (quality reward, length) on fresh pairs."""

    g = torch.Generator().manual_seed(seed)

    def make(n):
        length = torch.exp(torch.randn(n, 2, generator=g) + 5)
        q = torch.randn(n, 2, generator=g)
        util = q - 0.8 * length.log()
        p = ((util[:, 0] - util[:, 1]) > 0).float()
        x = 0.3 * torch.randn(n, 2, 16, generator=g)
        x[..., 0], x[..., 1] = q, length.log() - 5
        return x.transpose(0, 1).reshape(2 * n, 16), p, length  # [chosen…; rejected…]

    x, p, length = make(512)
    torch.manual_seed(seed)
    model = _TwoHeads(x)
    if not odin:
        model.classifier = torch.nn.Linear(16, 1)
        model.config.num_labels = 1
    self = SimpleNamespace(
        hard_labels=False,
        margin=0.0,
        center_rewards=0.0,
        odin=odin,
        length_weight=1.0,
        length_sign=-1.0,
        seen=None,
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(steps):
        b = torch.randint(0, 512, (32,), generator=g)
        model.feats = torch.cat([x[b], x[512 + b]])
        inputs = {"input_ids": None, "attention_mask": None, "p_chosen": p[b], "pair_lengths": length[b]}
        opt.zero_grad()
        RewardModelTrainer.compute_loss(self, model, inputs).backward()
        opt.step()
    xd, pd, ld = make(512)
    model.feats = xd
    with torch.no_grad():
        r = model(None, None).logits[:, 0]
    return {"reward": r, "log_length": ld.t().reshape(-1).log(), "quality": xd[:, 0]}


def test_odin_quality_reward_drops_length_but_keeps_quality():
    from cai.reward import torch_pearson

    plain, odin = _fit_two_heads(odin=False), _fit_two_heads(odin=True)
    assert (
        torch_pearson(plain["reward"], plain["log_length"]).item() < -0.4
    )  # plain BT learns "shorter is better"
    assert (
        abs(torch_pearson(odin["reward"], odin["log_length"]).item()) < 0.15
    )  # ODIN's shipped output does not
    # …and still carries the quality signal, more purely than the plain reward does
    assert torch_pearson(odin["reward"], odin["quality"]).item() > 0.8
    assert (
        torch_pearson(odin["reward"], odin["quality"]).item()
        > torch_pearson(plain["reward"], plain["quality"]).item()
    )


def test_length_fit_removes_a_known_length_effect_and_keeps_the_rest():
    """Rewards = a prompt's own level (longer answers for some prompts) + quality − 0.8·log length:
    the within-pair fit finds the length part, not the prompts' levels, and leaves quality."""
    import numpy as np

    from cai import lengthfit

    rng = np.random.default_rng(0)
    lengths = rng.lognormal(5, 1, (1300, 2)).round()
    quality = rng.normal(size=(1300, 2))
    level = rng.normal(0, 3, (1300, 1)) + 2.0 * np.log1p(lengths.mean(1, keepdims=True))
    rewards = level + quality - 0.8 * np.log1p(lengths)
    rec = lengthfit.fit(rewards, lengths)
    assert rec["pairs"] == 1300 and rec["characters"][0] >= 1 and np.all(np.diff(rec["x"]) > 0)
    b = lengthfit.bias(rec, [50, 1200])
    assert b[1] - b[0] == pytest.approx(-0.8 * (np.log1p(1200) - np.log1p(50)), rel=0.15)
    fixed = lengthfit.correct(rec, rewards, lengths)
    d_len = np.log1p(lengths[:, 0]) - np.log1p(lengths[:, 1])
    assert abs(np.corrcoef(fixed[:, 0] - fixed[:, 1], d_len)[0, 1]) < 0.05
    assert np.corrcoef(fixed[:, 0] - fixed[:, 1], quality[:, 0] - quality[:, 1])[0, 1] > 0.95
    # held flat beyond the training lengths: no extrapolation
    assert lengthfit.bias(rec, [10**7])[0] == pytest.approx(rec["y"][-1])
    assert lengthfit.fit(rewards[:, :1].repeat(2, 1), lengths) is None  # no reward differences


def test_length_fit_strength_is_the_share_that_balances_the_training_pairs():
    """Where people themselves prefer shorter answers, a fair reward leans short too: subtracting
    all of the reward's length dependence overshoots, and the strength keeps the share that leaves
    the training pairs length-balanced (the smallest |gap|, ties to the weaker correction)."""
    import numpy as np

    from cai import lengthfit
    from cai.pairmetrics import length_metrics

    rng = np.random.default_rng(1)
    lengths = rng.lognormal(5, 1, (2000, 2)).round()
    quality = rng.normal(size=(2000, 2)) - 0.5 * np.log1p(lengths)  # shorter is genuinely better
    p = (quality[:, 0] > quality[:, 1]).astype(float)
    rewards = quality - 0.7 * np.log1p(lengths)  # and the model leans further still

    def gap(r):
        return length_metrics(r, p, lengths).get("length_gap")

    rec = lengthfit.choose_strength(lengthfit.fit(rewards, lengths), rewards, lengths, gap)
    tried = dict(map(tuple, rec["strength_search"]))
    assert len(tried) == 21 and tried[0.0] < -0.3 and tried[1.0] > 0.1  # raw leans short; full overshoots
    # the spurious share of the slope is 0.7 / (0.5 + 0.7) = 0.58
    assert 0.5 <= rec["strength"] <= 0.7 and abs(tried[rec["strength"]]) == min(
        abs(g) for g in tried.values()
    )
    fixed = lengthfit.correct(rec, rewards, lengths)
    assert abs(gap(fixed)) < 0.05
    assert (
        length_metrics(fixed, p, lengths)["balanced_accuracy"]
        > 0.95
        > length_metrics(rewards, p, lengths)["balanced_accuracy"]
    )
    no_gap = lengthfit.choose_strength(rec, rewards, lengths, lambda r: None)  # nothing to balance
    assert no_gap["strength"] == 1.0 and no_gap["strength_search"] == []
    with pytest.raises(InputError, match="strength in"):
        lengthfit.check({**rec, "strength": 1.5})
