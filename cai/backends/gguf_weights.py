"""GGUF files: which model names are GGUF, and the weight format llama.cpp runs fastest on a CPU
(a Q8_0 copy of a Q4_1 file).

ggml has no fast matrix-matrix path for Q4_1 (llamafile's tinyBLAS covers F32, F16, BF16, Q8_0,
Q4_0, Q5_0 and IQ4_NL), so a Q4_1 file's prompts run through the generic dot product, one row
at a time. The embedded default ships as Q4_1. Its Q8_0 copy runs a 16-slot generation 1.3x
faster here (bench/RESULTS-engines.md) and is made once, with llama.cpp's own Python package
(gguf-py: dequantise each Q4_1 block, quantise to Q8_0), then cached by the source file's
content hash under ``$CAI_CACHE/gguf``.

What it changes: Q8_0 stores each block of 32 weights as int8 times one scale, so the copy's
weights differ from the Q4_1 values by at most half a Q8_0 step (|w| max / 254 per block, about
a sixteenth of a Q4_1 step). Generated text and judge probabilities move by that much rounding,
like any change of kernel; the tests bound the difference against the fp32 reference.
Q4_0 (faster still) would requantise 4-bit onto another 4-bit grid and lose what Q4_1's offset
holds, so it is not offered.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cai.errors import CaiError, InputError

# Tensor types a copy is made for (measured slower than Q8_0 on a CPU), and the copy's type.
SLOW_TYPES = ("Q4_1",)
TARGET = "Q8_0"
_LLAMA_FTYPE_MOSTLY_Q8_0 = 7


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def slow_tensors(path) -> int:
    """How many tensors of ``path`` are stored in a type with no fast CPU path."""
    import gguf

    slow = {getattr(gguf.GGMLQuantizationType, t) for t in SLOW_TYPES}
    return sum(1 for t in gguf.GGUFReader(path).tensors if t.tensor_type in slow)


def _sha_known(path, cache: Path) -> str:
    """The file's sha256, hashed once per (path, size, mtime) and remembered in ``cache`` (a 4 GB
    GGUF takes ~10 s to hash, which every start would pay otherwise)."""
    import json

    st = os.stat(path)
    key = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = Path(cache) / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), str):
        known = known if isinstance(known, dict) else {}
        known[key] = file_sha256(path)
        try:
            from cai.records import write_json

            write_json(index, known)
        except OSError:
            pass  # a read-only cache only costs the hash again next time
    return known[key]


def fast_copy(path, cache: Path) -> tuple[Path, str]:
    """(the Q8_0 copy of ``path``, the source's sha256), made once and kept under ``cache``."""
    sha = _sha_known(path, cache)
    out = Path(cache) / f"{sha[:24]}-{TARGET.lower()}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            _requantise(path, tmp)
            os.replace(tmp, out)  # another process making the same copy writes the same bytes
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise CaiError(
                    f"could not write the {TARGET} copy of {path} under {cache} ({e.strerror}); "
                    "free some space, set CAI_CACHE to a writable folder, or pass -o weights=as-is"
                ) from None
            raise
    return out, sha


def _requantise(src, dst) -> None:
    import gguf
    from gguf import quants

    T = gguf.GGMLQuantizationType
    slow, target = {getattr(T, t) for t in SLOW_TYPES}, getattr(T, TARGET)
    reader = gguf.GGUFReader(src)
    arch = _field_value(reader.fields["general.architecture"])
    writer = gguf.GGUFWriter(dst, arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        vtype = f.types[0]
        value = _field_value(f)
        if key == "general.file_type":
            value = _LLAMA_FTYPE_MOSTLY_Q8_0
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.tensor_type in slow:
            q = quants.quantize(quants.dequantize(t.data, t.tensor_type), target)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=target)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field_value(f):
    import gguf

    S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    def one(i, vtype):
        part = f.parts[i]
        return bytes(part).decode("utf-8", "surrogateescape") if vtype == S else part.tolist()[0]

    if f.types[0] == A:
        return [one(i, f.types[-1]) for i in f.data]
    return one(f.data[0], f.types[0])


def resolve_gguf(model: str | None) -> tuple[str, str]:
    """(GGUF path to load, what to record). None/'default' is the embedded default's own GGUF."""
    from cai.models import DEFAULT_MODEL, default_gguf

    if not model or model in ("default", DEFAULT_MODEL):
        return str(default_gguf()), DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) != 1:
            raise InputError(
                f"the llamacpp backend needs one .gguf file; this folder has {len(ggufs)} — "
                "pass the file itself to --model",
                p,
            )
        p = ggufs[0]
    if not p.is_file():
        raise InputError(
            "GGUF file not found; pass a .gguf file to --model (the llamacpp backend reads GGUF "
            "only; use --backend hf for Hugging Face folders and ids)",
            p,
        )
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(
                "not a GGUF file; the llamacpp backend reads GGUF only "
                "(use --backend hf for safetensors folders)",
                p,
            )
    return str(p), str(p)


def is_gguf(model: str | None) -> bool:
    """Whether ``model`` names a GGUF model (the embedded default, a .gguf file, or a folder
    holding exactly one), without loading anything."""
    from cai.models import DEFAULT_MODEL

    if not model or model in ("default", DEFAULT_MODEL):
        return True
    p = Path(model).expanduser()
    if p.is_dir():
        return len(list(p.glob("*.gguf"))) == 1 and not any(p.glob("*.safetensors"))
    return p.suffix.lower() == ".gguf" or (p.is_file() and _magic(p) == b"GGUF")


def _magic(p: Path) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(4)
    except OSError:
        return b""
