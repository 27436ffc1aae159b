"""bench/_shapes.py: a random-weight model written as GGUF runs the same weights on llama.cpp
and, converted, on hf (what bench_size.py's timings rest on)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytest.importorskip("xllamacpp")
from _shapes import parameters, write_gguf  # noqa: E402

from cai.models import gguf_to_safetensors

TOY = {
    "block_count": 2,
    "embedding_length": 64,
    "feed_forward_length": 128,
    "head_count": 4,
    "head_count_kv": 2,
}
# Measured on this toy model (std 0.3): llama.cpp's next-token log-probs (its Q8_0 products quantise
# activations to 8 bits) and hf's fp32 ones on the same weights differ by at most 0.11 over
# llama.cpp's top 10; against a model of another seed they differ by 12.7 (std 0.1-0.5: 0.02-0.22
# against 4-23). A wrong layout (the Q/K row order transformers undoes, an untied output layer)
# is another model.
TOL = 0.5


def test_a_random_model_gives_both_engines_the_same_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from cai.backends.llamacpp import LlamaCppBackend

    g = write_gguf(TOY, tmp_path / "toy.gguf", name="toy", std=0.3)
    folder = gguf_to_safetensors(g, tmp_path / "toy-hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-hf", "toy.gguf"]  # no temporary left
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (64, 2, 2)
    assert parameters(TOY) == 49152 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64

    conv = [{"role": "user", "content": "Is the sky blue? Answer in one word, then explain why."}]
    cpp = LlamaCppBackend(str(g), batch_size=1)
    try:
        ids = cpp.tokenize(cpp.render(conv))
        res = cpp._complete({"prompt": [ids], "n_predict": 1, "temperature": 0.0, "n_probs": 10})[0]
    finally:
        cpp.close()
    top = {int(t["id"]): float(t["logprob"]) for t in res["completion_probabilities"][0]["top_logprobs"]}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert int(ref.argmax()) in top
    gap = max(abs(lp - float(ref[i])) for i, lp in top.items())
    print(f"max |Δ log-prob| over llama.cpp's top 10: {gap:.4f}")
    assert gap < TOL
    assert max(top.values()) > -5  # far from uniform (-10.8): the comparison means something
