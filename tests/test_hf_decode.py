"""The hf backend's own decoding: small-batch linear layers, the decode loop against transformers'
generate(), and KV reuse from one generate() call to the next."""

from __future__ import annotations

import pytest


def test_routed_linears_give_the_plain_products():
    import torch

    from cai.backends.hf import route_small_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8, bias=False))
    xs = [torch.randn(n, 24) for n in range(1, 21)] + [torch.randn(2, 8, 24), torch.randn(16, 1, 24)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the routed kernel runs only with one thread
    try:
        with torch.inference_mode():
            plain = [net(x) for x in xs]
            route_small_linears(net)
            routed = [net(x) for x in xs]
            # the routed path runs for 7-16 rows only (it is the one calling torch.mm here)
            calls, mm = [], torch.mm
            torch.mm = lambda *a: calls.append(a[1].shape[1]) or mm(*a)
            try:
                for x in xs:
                    net(x)
            finally:
                torch.mm = mm
            assert sorted(set(calls)) == list(range(7, 17))
    finally:
        torch.set_num_threads(threads)
    for x, a, b in zip(xs, plain, routed):
        assert b.shape == a.shape == (*x.shape[:-1], 8)
        assert torch.allclose(a, b, atol=1e-5), x.shape


@pytest.fixture(scope="module")
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


def _prompts(n):
    topics = ["bread", "a long road that goes on", "tides", "why the sky is blue at noon", "cats", "x"]
    return [
        [{"role": "user", "content": f"Tell me about {topics[i % len(topics)]} " * (1 + i % 3)}]
        for i in range(n)
    ]


def test_decode_loop_matches_generate_as_rows_finish(lively_model):
    """Rows that stop early leave the batch; the tokens stay those of transformers' generate()."""
    from cai.backends.hf import HFBackend

    b = HFBackend(str(lively_model), batch_size=8)
    ids = b._encode([b.render(c) for c in _prompts(8)])
    enc = b._pad(ids)
    free = b._hf_generate(enc, 12, 0.0)

    # make a token that the rows first produce at different steps (or never) a stop token
    def first_steps(t):
        return {row.index(t) if t in row else len(row) for row in free}

    stop = max({t for row in free for t in row}, key=lambda t: len(first_steps(t)))
    assert len(first_steps(stop)) > 1, free
    b.model.generation_config.eos_token_id = [b.tok.eos_token_id, stop]
    ref = b._hf_generate(enc, 12, 0.0)
    ours = b._decode(enc, 12, 0.0)
    assert ours == ref
    assert len({len(r) for r in ours}) > 1  # rows did finish at different steps


def test_a_prompt_that_continues_the_last_call_reuses_its_kv(lively_model):
    from cai.backends.hf import HFBackend

    convs = _prompts(6)
    b = HFBackend(str(lively_model), batch_size=4)
    first = b.generate(convs, max_new_tokens=10)
    follow = [
        c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "Critique that reply."}]
        for c, g in zip(convs, first)
    ]
    follow.append([{"role": "user", "content": "an unrelated prompt"}])
    reused = b.generate(follow, max_new_tokens=10)
    assert b._reuse_ok is True
    assert b.stats["prefix_tokens_reused"] >= 6 * 32
    fresh = HFBackend(str(lively_model), batch_size=4).generate(follow, max_new_tokens=10)
    assert [g.text for g in reused] == [g.text for g in fresh]
    assert [g.n_tokens for g in reused] == [g.n_tokens for g in fresh]


def test_kept_sequences_match_by_longest_prefix():
    import torch

    from cai.backends.hf import MIN_SHARED_TOKENS, _Kept

    class Layer:  # the two attributes _Kept reads from a cache layer
        def __init__(self, n):
            self.keys = torch.arange(n, dtype=torch.float32).reshape(1, 1, n, 1).repeat(1, 2, 1, 3)
            self.values = -self.keys

    class Cache:
        layers = [Layer(40), Layer(40)]

    k = _Kept(budget=2**20)
    base = list(range(100, 100 + MIN_SHARED_TOKENS))
    a, b = base + [1, 2, 3, 4], base + [1, 2, 9]
    mask = torch.ones(40, dtype=torch.long)
    mask[: 40 - len(a)] = 0
    k.add(a, Cache(), 0, mask)
    mask = torch.ones(40, dtype=torch.long)
    mask[: 40 - len(b)] = 0
    k.add(b, Cache(), 0, mask)
    assert k.match([base + [1, 2, 9, 7], base + [1, 2, 3, 4], base[:10] + [5] * 30, a[:-1]]) == [
        (len(b), 1),
        (len(a) - 1, 0),  # the last token is always left to compute
        (0, -1),
        (len(a) - 2, 0),
    ]
    cache, m, lens = k.state([(len(b), 1), (len(a) - 1, 0)], None, "cpu") or (None, None, None)
    assert m.tolist()[0] == [1] * len(b) and lens.tolist() == [len(b), len(a) - 1]
    # row 0 continues b: its kept keys are that row's valid positions, in order
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == pytest.approx(
        [float(x) for x in range(40 - len(b), 40)]
    )


def test_path_check_verdicts_are_remembered_per_model_and_code(lively_model, monkeypatch, tmp_path):
    import json

    from cai.backends.hf import HFBackend

    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    monkeypatch.setenv("CAI_CHECK_CACHE", "1")
    b = HFBackend(str(lively_model), batch_size=4)
    runs = []
    real = b._check_decode_path
    b._check_decode_path = lambda enc: runs.append(1) or real(enc)
    b.generate(_prompts(3), max_new_tokens=4)
    assert runs == [1] and b._decode_ok is True
    saved = json.loads((tmp_path / "checks.json").read_text())
    assert list(saved.values()) == [{"decode": True}]

    again = HFBackend(str(lively_model), batch_size=4)  # a new process would start like this
    again._check_decode_path = lambda enc: runs.append(2) or real(enc)
    again.generate(_prompts(3), max_new_tokens=4)
    assert runs == [1] and again._decode_ok is True  # the verdict came from the cache

    other = HFBackend(str(lively_model), batch_size=4, share_prefix=False)  # other settings: checked
    other._check_decode_path = lambda enc: runs.append(3) or real(enc)
    other.generate(_prompts(3), max_new_tokens=4)
    assert runs == [1, 3] and len(json.loads((tmp_path / "checks.json").read_text())) == 2


def test_buffered_cache_layers_write_in_place_and_turn_plain_when_set_otherwise():
    """hf.py's BufferedLayer: keys/values are views of the first _n positions of buffers with
    room; update writes in place; setting them to another tensor (crop) makes a plain layer."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from cai.backends.hf import _preallocate

    cache = DynamicCache()
    k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    cache.update(k, v, 0)
    _preallocate(cache, 4)
    layer = cache.layers[0]
    assert type(layer).__name__ == "BufferedLayer" and layer._keys.shape == (2, 3, 9, 8)
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    k2, v2 = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    keys, values = cache.update(k2, v2, 0)
    assert layer._n == 6 and keys.data_ptr() == layer._keys.data_ptr()  # in place
    assert torch.equal(keys, torch.cat([k, k2], 2)) and torch.equal(values, torch.cat([v, v2], 2))
    layer.keys = layer.keys  # the view it already is: nothing changes
    assert type(layer).__name__ == "BufferedLayer"
    layer.batch_select_indices(torch.tensor([1]))  # in place, to the front of the same buffers
    assert torch.equal(layer.keys, torch.cat([k, k2], 2)[1:]) and layer.keys.shape[0] == 1
    cache.crop(-2)  # drop the last two positions
    assert type(layer) is DynamicLayer and torch.equal(layer.keys, k[1:, :, :4])
    assert torch.equal(layer.values, v[1:, :, :4])


def test_a_cache_with_room_takes_the_prompt_into_its_buffers():
    """_cache_with_room: the prefill's keys and values are written straight into buffers with
    room for the generation (one arena for all layers), not copied there after it."""
    import torch
    from transformers import LlamaConfig

    from cai.backends.hf import _cache_with_room

    cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    cache = _cache_with_room(cfg, 9)
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    for i in range(3):
        keys, values = cache.update(k + i, v - i, i)
        assert torch.equal(keys, k + i) and torch.equal(values, v - i)
    first = cache.layers[0]._keys
    for i, layer in enumerate(cache.layers):
        assert type(layer).__name__ == "BufferedLayer" and layer._n == 5
        assert layer._keys.shape == (2, 2, 9, 16)
        # the six buffers lie one after another in one arena
        assert layer._keys.data_ptr() == first.data_ptr() + 2 * i * first.numel() * 4
    assert cache.get_seq_length() == 5
    keys, _ = cache.update(torch.ones(2, 2, 1, 16), torch.ones(2, 2, 1, 16), 0)
    assert keys.shape[-2] == 6 and keys.data_ptr() == first.data_ptr()
