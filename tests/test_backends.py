"""Backends are plugins: found through the ``cai.backends`` entry-point group, options checked by
the backend (``-o key=value``), options that do not apply refused in one line.

The third-party backend here is a real package, built from source in the test with pip (no
network: ``--no-build-isolation`` uses the setuptools already installed) and installed into a
folder of its own that the ``cai`` subprocesses get on ``PYTHONPATH``; cai's environment is not
touched. Its backend extends the hf backend with an option of its own, so it runs a real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cai.backends import CHOICES, applicable, backend_class, listing, names
from cai.backends.base import Option
from cai.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
from cai.backends.base import Generation, Option
from cai.backends.hf import HFBackend


class ShoutBackend(HFBackend):
    """hf, with every generation in one letter case (an option of this backend's own)."""

    name = "shout"
    options = HFBackend.options + (Option("case", str, "upper or lower", ("upper", "lower")),)

    def __init__(self, model=None, *, case="upper", **kw):
        super().__init__(model, **kw)
        self.case = case

    def generate(self, conversations, **kw):
        out = super().generate(conversations, **kw)
        return [Generation(getattr(g.text, self.case)(), g.n_tokens) for g in out]

    def describe(self):
        return {**super().describe(), "backend": self.name, "case": self.case}
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """cai-shout 0.3.0, built and installed (pip install --target) into a folder of its own."""
    src = tmp_path_factory.mktemp("cai-shout-src")
    (src / "cai_shout.py").write_text(PLUGIN)
    (src / "broken_backend.py").write_text("raise ImportError('needs a library that is not installed')\n")
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "cai-shout"
            version = "0.3.0"

            [tool.setuptools]
            py-modules = ["cai_shout", "broken_backend"]

            [project.entry-points."cai.backends"]
            shout = "cai_shout:ShoutBackend"
            broken = "broken_backend:Backend"
            """
        )
    )
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return target


def _cai(args, plugin_path, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "cai", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_shipped_backends_register_through_the_entry_point_group():
    assert {"hf", "langchain", "llamacpp"} <= set(names())
    assert CHOICES[0] == "auto"
    from cai.backends.llamacpp import LlamaCppBackend

    assert backend_class("llamacpp") is LlamaCppBackend
    text = "\n".join(listing())
    assert (
        "llamacpp  (cai " in text and "-o n_batch=<int>" in text and "-o prefix=<auto|continue|fold>" in text
    )


def test_options_are_checked_by_the_backend():
    assert applicable("llamacpp", {"n_batch": "1024", "flash_attn": "false", "batch_size": 4}) == {
        "n_batch": 1024,
        "flash_attn": False,
        "batch_size": 4,
    }
    assert applicable("hf", {"share_prefix": "off", "max_input_tokens": 2048}) == {
        "share_prefix": False,
        "max_input_tokens": 2048,
    }
    cases = {
        ("llamacpp", "n_batch", "lots"): "n_batch takes an integer",
        ("llamacpp", "weights", "q2"): "weights is one of auto, as-is",
        ("llamacpp", "ctx_per_seq", "8"): "ctx_per_seq must be >= 64",
        ("llamacpp", "share_prefix", "true"): "has no option 'share_prefix'",
        ("langchain", "logprobs", "maybe"): "logprobs takes true or false",
        ("hf", "n_batch", "512"): "has no option 'n_batch'",
    }
    for (backend, key, value), message in cases.items():
        with pytest.raises(InputError, match=message):
            applicable(backend, {key: value})
    with pytest.raises(InputError, match="--device does not apply to the llamacpp backend"):
        applicable("llamacpp", {"device": "cuda"})
    with pytest.raises(InputError, match="--base-url does not apply to the hf backend"):
        applicable("hf", {"base_url": "http://127.0.0.1:1/v1"})
    # unset shared options are not passed; a Python caller's typed value is checked the same way
    assert applicable("llamacpp", {"device": "auto", "threads": None}) == {}
    with pytest.raises(InputError, match="flash_attn takes true or false"):
        applicable("llamacpp", {"flash_attn": 1})
    assert Option("k", float, min=0).parse("0.5", "x") == 0.5


def test_cli_option_errors_are_one_line(tmp_path, tiny_model):
    from click.testing import CliRunner

    from cai.cli import cli

    out = tmp_path / "pairs.jsonl"
    base = ["generate", "--constitution", str(ROOT / "constitutions/harmless"), "--prompts"]
    base += [str(ROOT / "constitutions/harmless/prompts.jsonl"), "--out", str(out), "--backend", "hf"]
    base += ["-m", str(tiny_model), "--limit", "1"]
    for extra, message in [
        (["-o", "n_batch=64"], "-o n_batch: the hf backend has no option 'n_batch'"),
        (["-o", "share_prefix"], "-o share_prefix: pass a backend option as key=value"),
        (["-o", "batch_size=2"], "batch_size is a shared option; pass it as --batch-size"),
        (["-o", "max_input_tokens=0"], "max_input_tokens must be >= 1"),
    ]:
        r = CliRunner().invoke(cli, base + extra)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output
    assert not out.exists()  # refused before anything loaded or was written


def test_a_third_party_backend_from_an_installed_package(tmp_path, plugin_path, lively_model):
    listed = _cai(["backends"], plugin_path)
    assert listed.returncode == 0, listed.stderr  # a broken plugin is named; the others still list
    assert "shout  (cai-shout 0.3.0)\n  shared options: --batch-size, --device" in listed.stdout
    assert "-o case=<upper|lower>" in listed.stdout and "llamacpp  (cai " in listed.stdout
    assert (
        "unusable: backend 'broken' (cai-shout 0.3.0, broken_backend:Backend) does not load" in listed.stdout
    )
    out = tmp_path / "pairs.jsonl"
    args = ["generate", "--constitution", str(ROOT / "constitutions/harmless"), "--prompts"]
    args += [str(ROOT / "constitutions/harmless/prompts.jsonl"), "--out", str(out), "--limit", "2"]
    args += [
        "--rounds",
        "1",
        "--max-new-tokens",
        "8",
        "--seed",
        "0",
        "-m",
        str(lively_model),
        "--backend",
        "shout",
    ]

    bad = _cai(args + ["-o", "case=title"], plugin_path)
    assert bad.returncode == 2 and "Error: -o case=title: case is one of upper, lower" in bad.stderr, (
        bad.stderr
    )
    assert not out.exists()
    bad = _cai(args + ["--base-url", "http://127.0.0.1:9/v1"], plugin_path)
    assert bad.returncode == 2 and "--base-url does not apply to the shout backend" in bad.stderr, bad.stderr

    r = _cai(args + ["-o", "case=upper", "--threads", "1"], plugin_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["meta"]["backend"] == "shout"
        runtime = row["meta"]["runtime"]
        assert (
            runtime["package"] == "cai-shout 0.3.0" and runtime["case"] == "upper" and runtime["threads"] == 1
        )
        texts = [row["chosen"][-1]["content"], row["rejected"][-1]["content"]]
        assert all(t == t.upper() for t in texts) and any(t.strip() for t in texts)
    # cai without the plugin on its path does not know the name
    plain = subprocess.run(
        [sys.executable, "-m", "cai", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert plain.returncode == 2
    assert "Invalid value for '--backend'" in plain.stderr and "'shout' is not one of" in plain.stderr
