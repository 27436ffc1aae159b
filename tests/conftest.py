"""Shared fixtures: tiny random models built in-process (fast), the real default model (e2e)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
HARMLESS = ROOT / "constitutions" / "harmless"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# OpenMP threads (torch's and llama.cpp's share one libgomp, configured when torch loads) sleep
# instead of spinning while they wait: on a shared 2-core machine a spinning thread starves its
# partner (llama.cpp decoding measured 2.5 vs 29 tokens/s). See cai/backends/llamacpp.py.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# The hf backend's one-time path checks run in every test (their cached verdicts would skip them;
# tests/test_hf_decode.py covers the cache itself).
os.environ["CAI_CHECK_CACHE"] = "0"


# A test run started in the background of a non-interactive shell (`make test &`, some CI
# runners) ignores SIGINT, and its children would inherit that, so the tests that stop a
# `cai review` or `cai serve` with Ctrl-C would wait forever. A handler here (not SIG_IGN) makes
# every child start with the default again, as it would from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real embedded SmolLM2-135M-Instruct (converted once and cached)."""
    from cai.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer and chat template, saved as a
    model folder, so `--model DIR` works. Its outputs are gibberish but deterministic."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llm")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_reward_base(tmp_path_factory) -> Path:
    """A 2-layer random BERT with the real all-MiniLM-L6-v2 tokenizer, as a model folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cai.models import default_reward_base

    out = tmp_path_factory.mktemp("tiny-rm-base")
    tok = AutoTokenizer.from_pretrained(default_reward_base())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def hh_dev() -> Path:
    p = SHARED_DATA / "dev.jsonl.gz"
    if not p.exists():
        pytest.skip(f"shared HH-RLHF data not found at {SHARED_DATA} (see docs/pairs-contract.md)")
    return p


@pytest.fixture
def hh_train() -> Path:
    p = SHARED_DATA / "train.jsonl.gz"
    if not p.exists():
        pytest.skip(f"shared HH-RLHF data not found at {SHARED_DATA} (see docs/pairs-contract.md)")
    return p


@pytest.fixture(scope="session")
def lively_model(tmp_path_factory, tiny_model):
    """The tiny random Llama with larger weights, so that its greedy tokens vary from step to step
    and row to row (the conftest one settles on one token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lively-llm")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out
