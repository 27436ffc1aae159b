"""cai.backends.rowkernel: decode-step linear layers from the weights' exact Q4_1/Q8_0/bf16 form.

The kernel is real C built with the machine's compiler; where it cannot run (no AVX-512, no
compiler) these tests skip and the backend keeps torch's path."""

from __future__ import annotations

import numpy as np
import pytest


def _kernel():
    from cai.backends import rowkernel

    if rowkernel.library() is None:
        pytest.skip(f"rowkernel does not run here: {rowkernel.why_not}")
    return rowkernel


def _exact(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """fp32 weights whose values are exactly those of a Q4_1/Q8_0 GGUF tensor or of bf16."""
    import gguf.quants as q
    import torch
    from gguf import GGMLQuantizationType as T

    w = np.random.default_rng(seed).normal(0, 0.5, (n, k)).astype(np.float32)
    if kind == "bf16":
        return torch.from_numpy(w).bfloat16().float().numpy()
    t = {"q4_1": T.Q4_1, "q8_0": T.Q8_0}[kind]
    return q.dequantize(q.quantize(w, t), t).reshape(n, k).astype(np.float32)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "bf16"])
def test_pack_finds_the_exact_format(kind):
    from cai.backends.rowkernel import FORMATS, pack

    w = _exact(kind, 48, 96)
    fmt, packed = pack(w)
    assert FORMATS[fmt] == kind
    per_weight = {"q4_1": 20 / 32, "q8_0": 34 / 32, "bf16": 2}[kind]
    assert packed.nbytes == pytest.approx(w.size * per_weight)


def test_pack_refuses_what_it_cannot_reproduce():
    from cai.backends.rowkernel import pack

    rng = np.random.default_rng(0)
    assert pack(rng.normal(size=(32, 64)).astype(np.float32)) is None  # plain fp32
    assert pack(_exact("q4_1", 40, 64)[:, :48].copy()) is None  # 48 inputs: not whole blocks
    assert pack(_exact("bf16", 24, 64)) is None  # 24 outputs: not whole panels of 16
    w = _exact("q4_1", 32, 64)
    w[3, 5] = np.nextafter(w[3, 5], np.float32(9))  # one value off by one ulp
    got = pack(w)
    assert got is None or got[0] != 1  # never packed as Q4_1 (it may still be exact bf16)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_torch_for_every_row_count(kind, threads):
    import torch
    import torch.nn.functional as F

    rk = _kernel()
    w = _exact(kind, 64, 96, seed=1)
    fmt, packed = rk.pack(w)
    lin = torch.nn.Linear(96, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        info, why = rk.install(lin)
        assert info is not None and why is None
        for rows in [1, 2, 3, 5, 8, 11, 12, 13, 16]:
            x = torch.randn(rows, 96)
            with torch.no_grad():
                got, want = lin(x), F.linear(x, lin.weight, lin.bias)
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), rows
    finally:
        torch.set_num_threads(old)


def test_install_routes_only_small_inference_inputs():
    import torch
    import torch.nn.functional as F

    rk = _kernel()
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 48))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(_exact("q8_0", 32, 64)))
        net[1].weight.copy_(torch.from_numpy(_exact("bf16", 48, 32)))
    info, _ = rk.install(net)
    assert info["layers"] == 2 and info["formats"] == {"q8_0": 1, "bf16": 1}
    assert info["packed_bytes"] < info["fp32_bytes"]

    lib = rk.library()
    calls, fn = [], lib.cai_rows
    lib.cai_rows = lambda *a: calls.append(a[5]) or fn(*a)  # a[5]: the row count
    try:
        with torch.no_grad():
            for shape in [(3, 64), (2, 1, 64), (16, 64), (17, 64), (4, 40, 64)]:
                x = torch.randn(*shape)
                ref = F.linear(F.linear(x, net[0].weight), net[1].weight, net[1].bias)
                assert torch.allclose(net(x), ref, rtol=1e-5, atol=1e-5), shape
        assert calls == [3, 3, 2, 2, 16, 16]  # 17 and 160 rows stay with torch
        calls.clear()
        x = torch.randn(4, 64, requires_grad=True)  # a training step keeps torch's path
        net(x).sum().backward()
        assert calls == [] and x.grad is not None and net[0].weight.grad is not None
    finally:
        lib.cai_rows = fn


def test_packed_weights_are_cached_by_fingerprint(tmp_path, monkeypatch, capsys):
    import torch

    rk = _kernel()
    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(_exact("q4_1", 32, 64)))
    first = rk.packed_weights(net, "abc123")
    assert "packed 1 layers" in capsys.readouterr().err
    files = list((tmp_path / "packed").glob("abc123-*.safetensors"))
    assert len(files) == 1
    again = rk.packed_weights(net, "abc123")
    assert "packed" not in capsys.readouterr().err
    assert again.keys() == first.keys() == {"0"}
    assert again["0"][0] == first["0"][0] == 1
    assert np.array_equal(again["0"][1], first["0"][1])
    files[0].write_bytes(b"damaged")  # a damaged cache file is rebuilt, not trusted
    assert np.array_equal(rk.packed_weights(net, "abc123")["0"][1], first["0"][1])


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory, tiny_model):
    """The tiny random Llama with lively weights that are exact Q4_1 values, as the embedded
    GGUF model's are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("q4-llm")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 2:
                w = _exact("q4_1", *p.shape, seed=i) if p.shape[1] % 32 == 0 else p.numpy()
                p.copy_(torch.from_numpy(w))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def test_backend_decodes_through_the_kernel_with_the_same_tokens(q4_model, monkeypatch, tmp_path):
    _kernel()
    from cai.backends.hf import HFBackend

    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    convs = [
        [{"role": "user", "content": f"Tell me about {t}"}] for t in ["tides", "bread", "a long road", "x"]
    ]
    on = HFBackend(str(q4_model), batch_size=4)
    assert on.row_kernel and on.row_kernel["formats"]["q4_1"] >= 1
    assert on.describe()["decode_kernel"].startswith("cai rowkernel")
    assert on.row_attention and on.model.config._attn_implementation == "cai_cpu"
    assert "decode steps: one rowkernel call" in on.describe()["decode_kernel"]
    with_kernel = on.generate(convs, max_new_tokens=12)

    monkeypatch.setenv("CAI_ROW_KERNEL", "0")
    from cai.backends import rowkernel

    monkeypatch.setattr(rowkernel, "_lib", False)  # forget the loaded library for this backend
    off = HFBackend(str(q4_model), batch_size=4)
    assert off.row_kernel is None and "CAI_ROW_KERNEL=0" in off.describe()["decode_kernel"]
    assert not off.row_attention and off.model.config._attn_implementation == "sdpa"
    without = off.generate(convs, max_new_tokens=12)
    assert [g.text for g in with_kernel] == [g.text for g in without]
    assert len({g.text for g in with_kernel}) > 1


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_sdpa(threads):
    """One query per row against a cache view with spare room, grouped heads, left padding."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rk = _kernel()
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=192, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    assert rk.install_attention(model)
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping[rk.ATTENTION]

    class Module:
        num_key_value_groups = 3
        is_causal = True

    gen = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for L in (1, 15, 16, 17, 100):
            q = torch.randn(4, 6, 1, 32, generator=gen)
            k = torch.randn(4, 2, L + 7, 32, generator=gen)[:, :, :L]
            v = torch.randn(4, 2, L + 7, 32, generator=gen)[:, :, :L]
            mask = torch.ones(4, 1, 1, L, dtype=torch.bool)
            mask[1, ..., : L // 2] = False  # a left-padded row
            for m in (mask, None):
                with torch.inference_mode():
                    got, _ = fn(Module, q, k, v, m, scaling=0.3)
                    want, _ = sdpa_attention_forward(Module, q, k, v, m, scaling=0.3)
                assert got.shape == want.shape == (4, 1, 6, 32)
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (L, m is None)
        # two queries per row (prefill) go to SDPA
        q2 = torch.randn(4, 6, 2, 32, generator=gen)
        with torch.inference_mode():
            got, _ = fn(Module, q2, k, v, None, scaling=0.3)
            want, _ = sdpa_attention_forward(Module, q2, k, v, None, scaling=0.3)
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(old)


def test_a_packed_cache_of_the_wrong_size_is_not_used(tmp_path, monkeypatch):
    import torch

    rk = _kernel()
    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(_exact("q4_1", 32, 64)))
    rk.packed_weights(net, "fp0")  # cached under this fingerprint
    other = torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))  # same name "0", other shape
    with torch.no_grad():
        other[0].weight.copy_(torch.from_numpy(_exact("q4_1", 32, 32)))
    # the cached array does not fit: nothing installed, and it says why
    assert rk.install(other, "fp0") == (None, "no layer's weights are exactly Q4_1, Q8_0 or bf16 values")
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(other(x), x @ other[0].weight.T)


@pytest.mark.parametrize(
    "threads,variant",
    [(1, "all in one call"), (2, "all in one call"), (2, "torch output layer, dynamic rope")],
)
def test_one_call_decode_step_matches_the_model(threads, variant):
    """install_decoder: 1, 5 and 16 rows, left padding, biases, grouped heads, several steps
    into hf.py's buffered cache, against an unpatched copy of the same model. The step does the
    embedding, the layers and the output layer with a rotary table; or, where the output layer is
    not packed and the rotary frequencies depend on the length, it leaves those to torch."""
    import copy
    import gc
    import inspect
    import weakref

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai.backends.hf import _preallocate

    rk = _kernel()
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, attn_implementation="sdpa",
    )  # fmt: skip
    if variant != "all in one call":
        cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                p.copy_(torch.from_numpy(_exact("q4_1", *p.shape, seed=i)))
            elif p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape))  # biases and norm weights that matter
    ref = copy.deepcopy(model)
    info, _ = rk.install(model)
    assert info and info["layers"] == 2 * 7 + 1
    if variant != "all in one call":
        head = model.lm_head  # as if the output layer's weights had no exact format
        head.forward = head._cai_fallback
        del head._cai_packed
    assert rk.install_decoder(model) is None
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    lib = rk.library()
    calls, fn = [], lib.cai_decode_step
    lib.cai_decode_step = lambda *a: calls.append(a[7]) or fn(*a)  # a[7]: the row count
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B in (1, 5, 16):
            ids = torch.randint(0, 96, (B, 7))
            mask = torch.ones(B, 7, dtype=torch.long)
            mask[-1, :3] = 0  # a left-padded row
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                a = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
                b = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
                ca, cb = getattr(a, kw), getattr(b, kw)
                _preallocate(cb, 4)
                for step in range(4):
                    nxt = a.logits[:, -1:].argmax(-1)
                    mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
                    p = pos[:, -1:] + 1 + step
                    a = ref(input_ids=nxt, attention_mask=mask, position_ids=p, use_cache=True, **{kw: ca})
                    b = model(input_ids=nxt, attention_mask=mask, position_ids=p, use_cache=True, **{kw: cb})
                    scale = float(a.logits.abs().max())
                    assert torch.allclose(b.logits, a.logits, rtol=1e-4, atol=1e-5 * scale), (B, step)
                for x, y in zip(ca.layers, cb.layers):  # the step wrote the same keys and values
                    assert torch.allclose(y.keys, x.keys, atol=1e-4) and torch.allclose(
                        y.values, x.values, atol=1e-4
                    )
                assert calls == [B] * 4, (B, calls)
                calls.clear()
                # two new tokens per row (not a decode step) go to the model's own forward
                two = torch.cat([nxt, nxt], 1)
                m2 = torch.cat([mask, torch.ones(B, 2, dtype=torch.long)], 1)
                p2 = torch.cat([p + 1, p + 2], 1)
                a = ref(input_ids=two, attention_mask=m2, position_ids=p2, use_cache=True, **{kw: ca})
                b = model(input_ids=two, attention_mask=m2, position_ids=p2, use_cache=True, **{kw: cb})
                assert calls == [] and torch.allclose(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        held = weakref.ref(cb)  # the step keeps no hold on a finished generation's cache
        del a, b, ca, cb
        gc.collect()
        assert held() is None
    finally:
        lib.cai_decode_step = fn
        torch.set_num_threads(old)


def test_the_rotary_table_holds_the_bits_each_step_would_compute():
    """The one-call step reads cos/sin from a table built 16 positions a call; a step computing
    them for its own rows (1-16 of them, any positions) gets the same bits."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rk = _kernel()
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, max_position_embeddings=8192)
    rot = LlamaRotaryEmbedding(cfg)
    assert rk._static_rope(rot)
    table = rk._RopeTable(rot, 64)
    table.grow(300)
    assert table.size >= 300 and table.cos.shape == (table.size, 64)
    gen = torch.Generator().manual_seed(0)
    for B in (1, 3, 5, 16):
        pos = torch.randint(0, 300, (B, 1), generator=gen)
        cos, sin = rot(torch.empty(B, 1), position_ids=pos)
        assert torch.equal(cos.reshape(B, 64), table.cos[pos[:, 0]])
        assert torch.equal(sin.reshape(B, 64), table.sin[pos[:, 0]])
    table.grow(table.size + 1)  # grows by doubling, keeping what it had
    one = rot(torch.empty(1, 1), position_ids=torch.tensor([[299]]))[0]
    assert table.size >= 600 and torch.equal(table.cos[299], one[0, 0])


def test_huge_page_buffers_are_aligned_and_backed_by_2mb_pages():
    import re
    from pathlib import Path

    from cai.backends import hugepages

    a = hugepages.empty(5 << 20)
    assert a.nbytes == 5 << 20 and a.ctypes.data % (2 << 20) == 0
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are off on this system")

    def huge_kb():
        return int(re.search(r"AnonHugePages:\s+(\d+)", Path("/proc/self/smaps_rollup").read_text()).group(1))

    before = huge_kb()
    a[:] = 1  # commits the pages
    assert huge_kb() - before >= 4096  # the two whole 2 MB pages inside it, at least
    t = hugepages.torch_empty((3, 5, 7), __import__("torch").float32)
    assert t.shape == (3, 5, 7) and t.is_contiguous() and t.data_ptr() % (2 << 20) == 0


def test_the_one_call_step_is_checked_once_and_a_failed_check_leaves_the_model_alone(
    q4_model, monkeypatch, tmp_path
):
    import json

    rk = _kernel()
    from cai.backends.hf import HFBackend

    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    monkeypatch.setenv("CAI_CHECK_CACHE", "1")
    runs, real = [], rk._check_decoder
    monkeypatch.setattr(rk, "_check_decoder", lambda *a: runs.append(1) or real(*a))
    first = HFBackend(str(q4_model), batch_size=4)
    again = HFBackend(str(q4_model), batch_size=4)
    assert first.row_decoder and again.row_decoder and runs == [1]  # the second verdict came from the cache
    assert [v.get("decoder") for v in json.loads((tmp_path / "checks.json").read_text()).values()] == [True]

    monkeypatch.setenv("CAI_CHECK_CACHE", "0")
    monkeypatch.setattr(rk, "_check_decoder", lambda *a: "it disagreed")
    off = HFBackend(str(q4_model), batch_size=4)
    assert not off.row_decoder and "one rowkernel call" not in off.describe()["decode_kernel"]
    assert "forward" not in vars(off.model)  # the class's own forward, not patched
    convs = [[{"role": "user", "content": "Tell me about tides"}], [{"role": "user", "content": "x"}]]
    assert [g.text for g in off.generate(convs, max_new_tokens=8)] == [
        g.text for g in first.generate(convs, max_new_tokens=8)
    ]
