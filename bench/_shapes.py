"""Models of a larger size for timing the engines: the embedded model's tokenizer and chat template
with random weights in the shape of a larger published model.

No larger instruct model can be had offline here, yet what a user's own judge costs depends on
its size: the ratios between engines and between a re-check and a label move with it (attention
and per-request work weigh less, the weights' matrix products more). Cost depends on shapes and
token counts, not on weight values, so a random model of SmolLM2-360M's or SmolLM2-1.7B's shape,
given the same prompts (the same tokenizer), costs what the real one would. What it writes is
noise: use these for timings only, never for agreement or accuracy.

``gguf_for(shape)`` writes the GGUF once (Q8_0 matrices, seeded) under ``$CAI_CACHE/shapes``;
``hf_folder_for(shape)`` converts it to a safetensors folder for the hf backend the way cai
converts the embedded model (``cai.models.gguf_to_safetensors``), so both engines run the same
weights; ``model_for(shape, backend)`` is what a backend loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

# Published configurations (config.json of HuggingFaceTB/SmolLM2-*-Instruct); all tie the output
# layer to the token embedding and share the embedded model's 49,152-token vocabulary.
SHAPES = {
    "smollm2-360m": {
        "block_count": 32,
        "embedding_length": 960,
        "feed_forward_length": 2560,
        "head_count": 15,
        "head_count_kv": 5,
    },
    "smollm2-1.7b": {
        "block_count": 24,
        "embedding_length": 2048,
        "feed_forward_length": 8192,
        "head_count": 32,
        "head_count_kv": 32,
    },
}
# The embedded model's own shape, for comparison (134,515,008 weights).
EMBEDDED = {
    "block_count": 30,
    "embedding_length": 576,
    "feed_forward_length": 1536,
    "head_count": 9,
    "head_count_kv": 3,
}
SEED = 0
_STD = 0.02  # the published models' initializer_range


def _cache() -> Path:
    return Path(os.environ.get("CAI_CACHE", Path.home() / ".cache" / "cai")) / "shapes"


def parameters(s: dict) -> int:
    """Weights of a model of shape ``s`` (tied output layer)."""
    d, f, L, kv = (s[k] for k in ("embedding_length", "feed_forward_length", "block_count", "head_count_kv"))
    hd = d // s["head_count"]
    return 49152 * d + L * (2 * d * d + 2 * d * kv * hd + 3 * d * f + 2 * d) + d


def gguf_for(shape: str) -> Path:
    """The random-weight GGUF of ``shape`` (written once, then reused)."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    out = _cache() / f"{shape}-random-seed{SEED}.Q8_0.gguf"
    if not out.exists():
        print(f"bench: writing a random-weight {shape} GGUF (once) -> {out}", file=sys.stderr, flush=True)
        write_gguf(SHAPES[shape], out, name=f"random {shape} (timing only)")
    return out


def write_gguf(s: dict, out: Path, *, name: str, seed: int = SEED, std: float = _STD) -> Path:
    """Write a llama-architecture GGUF of shape ``s`` with the embedded model's tokenizer, chat
    template and other settings, and random weights (normal(0, ``std``) matrices in Q8_0, unit
    norms); atomically (a temporary file, then a rename)."""
    import gguf

    from cai.models import default_gguf

    src = gguf.GGUFReader(str(default_gguf()))
    d, f, kv = s["embedding_length"], s["feed_forward_length"], s["head_count_kv"]
    hd = d // s["head_count"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    ours = {
        f"llama.{k}" for k in (*s, "attention.head_count", "attention.head_count_kv", "rope.dimension_count")
    }
    for key, field in src.fields.items():
        if key.startswith(("GGUF.", "general.")) or key in ours:
            continue
        t = field.types[0]
        sub = field.types[-1] if t == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), t, sub_type=sub)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(s["block_count"])
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(s["head_count"])
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hd)

    rng = np.random.default_rng(seed)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def matrix(name, rows, cols):  # numpy (rows, cols) is ggml's [cols, rows]
        a = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
        w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)

    def ones(name):
        w.add_tensor(name, np.ones(d, dtype=np.float32))

    matrix("token_embd.weight", 49152, d)  # tied: also the output layer
    ones("output_norm.weight")
    for i in range(s["block_count"]):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight")
        ones(p + "ffn_norm.weight")
        matrix(p + "attn_q.weight", d, d)
        matrix(p + "attn_k.weight", kv * hd, d)
        matrix(p + "attn_v.weight", kv * hd, d)
        matrix(p + "attn_output.weight", d, d)
        matrix(p + "ffn_gate.weight", f, d)
        matrix(p + "ffn_up.weight", f, d)
        matrix(p + "ffn_down.weight", d, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def hf_folder_for(shape: str) -> Path:
    """A safetensors folder (fp32) holding the same weights as ``gguf_for(shape)``, converted the
    way cai converts the embedded model (``cai.models.gguf_to_safetensors``)."""
    from cai.models import gguf_to_safetensors

    out = _cache() / f"{shape}-random-seed{SEED}-hf"
    if not (out / "config.json").exists():
        g = gguf_for(shape)
        print(f"bench: converting {g.name} to safetensors (once) -> {out}", file=sys.stderr, flush=True)
        gguf_to_safetensors(g, out)
    return out


def model_for(shape: str | None, backend: str) -> str | None:
    """What ``backend`` loads for ``shape``: None (the embedded default) without one, else the
    random model in that backend's format (hf: the safetensors folder; others: the GGUF)."""
    if not shape:
        return None
    return str(hf_folder_for(shape) if backend == "hf" else gguf_for(shape))


if __name__ == "__main__":
    for sh in sys.argv[1:] or SHAPES:
        print(sh, f"{parameters(SHAPES[sh]) / 1e6:.0f}M parameters", gguf_for(sh), hf_folder_for(sh))
