"""Decode steps on the CPU from the weights' own low-bit form (rowkernel.c).

A decode step of a batch multiplies a few rows (one per sequence still going) by every weight
matrix of the model, so its time is the time to read the weights, not arithmetic. The embedded
default model ships as a GGUF file of 4-bit (Q4_1) and 8-bit (Q8_0) blocks; transformers
expands it to fp32, four to six times the bytes, and torch then streams 538 MB per step.

Here each nn.Linear's fp32 weight is checked for the exact structure it came from: every block
of 32 values equal to fp32 ``d * q + m`` (Q4_1, 4-bit q, fp16 d and m), ``d * q`` (Q8_0) or a
bf16 value. Where every block matches, the layer keeps a packed copy (96 MB for the default
model instead of 538) and 1-16-row inputs go through rowkernel.c, which expands the packed
values to exactly the same fp32 weights in registers and multiplies in fp32. Larger inputs
(prefill, the judge, training) and layers that match no format keep torch's fp32 path. Nothing
is approximated: the weights are the same numbers, only the order of the fp32 sums differs,
as between any two matmul kernels.

Decode attention (one query per row) goes through the same library (install_attention): each
row's fp32 keys and values are read once for all the query heads that share them. For
Llama-style models a whole decode step, embedding to logits, is one call (install_decoder). The
packed weights live on 2 MB pages (hugepages.py): a step streams all of them.

The kernel is C with AVX-512 intrinsics, compiled once per machine with the system's ``cc``
into ``$CAI_CACHE/kernels`` (about a second); packed weights are cached under
``$CAI_CACHE/packed`` by the model's fingerprint. Without a compiler, AVX-512 or Linux, or with
``CAI_ROW_KERNEL=0``, everything runs as before. Each install checks the kernel against torch
on one layer of every format it uses before any layer switches.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

FORMATS = {1: "q4_1", 2: "q8_0", 3: "bf16"}
LAYOUT_VERSION = 2  # of the packed layout; part of the cache key
MAX_ROWS = 16
CACHE_MAX_BYTES = 2**30  # larger packed models are packed again at each load, not kept on disk
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
_CPU_FLAGS = {"avx512f", "avx512bw", "fma", "f16c"}
SOURCE = Path(__file__).with_name("rowkernel.c")

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
why_not: str | None = None  # why library() is None on this machine


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot run here (see why_not)."""
    global _lib, why_not
    if _lib is not False:
        return _lib
    _lib, why_not = None, _unsupported()
    if why_not is None:
        try:
            _lib = _load(_build())
        except (OSError, subprocess.SubprocessError) as e:
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            why_not = f"could not build {SOURCE.name}: {last[:200]}"
    return _lib


def _unsupported() -> str | None:
    if os.environ.get("CAI_ROW_KERNEL", "1") == "0":
        return "off (CAI_ROW_KERNEL=0)"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {sys.platform} {platform.machine()})"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return "cannot read /proc/cpuinfo"
    missing = _CPU_FLAGS - flags
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


def _build() -> Path:
    from cai.models import cache_dir

    cc = os.environ.get("CC", "cc")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"rowkernel-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    for flags in (FLAGS, [f for f in FLAGS if f != "-fopenmp"]):  # without OpenMP: one thread
        r = subprocess.run(
            [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode == 0:
            break
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(r.stderr or f"{cc} exited with {r.returncode}")
    os.replace(tmp, out)  # atomic: a concurrent build never leaves half a library
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.cai_rows.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    lib.cai_rows.restype = ctypes.c_int
    lib.cai_panel_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.cai_panel_bytes.restype = ctypes.c_long
    lib.cai_decode_attention.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_long] * 4 + [ctypes.c_float, ctypes.c_int]
    )
    lib.cai_decode_attention.restype = ctypes.c_int
    lib.cai_decode_step.argtypes = (
        [ctypes.c_void_p] * 5
        + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        + [ctypes.c_void_p, ctypes.c_int]
    )
    lib.cai_decode_step.restype = ctypes.c_int
    return lib


class _Layer(ctypes.Structure):
    """rowkernel.c's cai_layer: one decoder layer's packed weights, norms and KV cache buffers."""

    _fields_ = [
        ("w", ctypes.c_void_p * 7),
        ("fmt", ctypes.c_int * 7),
        ("bias", ctypes.c_void_p * 7),
        ("norm_in", ctypes.c_void_p),
        ("norm_post", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
    ]


class _Decoder(ctypes.Structure):
    """rowkernel.c's cai_decoder: the model's layers, shapes, embedding, final norm, output layer."""

    _fields_ = [
        ("layers", ctypes.c_void_p),
        *((f, ctypes.c_int) for f in ("nl", "hidden", "H", "KVH", "D", "I", "vocab")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("norm_final", ctypes.c_void_p),
        ("out_w", ctypes.c_void_p),
        ("out_fmt", ctypes.c_int),
        ("out_bias", ctypes.c_void_p),
    ]


# -- finding the exact format of a weight and packing it ------------------------------------


def _fp16_near(d, steps=(0, -1, 1, -2, 2)):
    """fp16 values at and next to d (d >= 0), as fp32: the candidates for a block's scale."""
    import numpy as np

    u = d.astype(np.float16).view(np.uint16).astype(np.int32)
    for s in steps:
        yield np.clip(u + s, 0, 0x7BFF).astype(np.uint16).view(np.float16).astype(np.float32)


def _blocks(B, q_range, shift):
    """Per block of 32 values (rows of B), an fp16 scale d and integers q in q_range with
    fp32 ``d * q + shift`` equal to the values bit for bit (two roundings, as gguf-py
    dequantises); None unless every block has one."""
    import numpy as np

    lo, hi = q_range
    span = (B.max(-1) - shift) if lo == 0 else np.abs(B).max(-1)
    d0 = span / np.float32(hi)
    D = np.zeros_like(d0)
    Q = np.zeros(B.shape, np.int8 if lo < 0 else np.uint8)
    ok = np.zeros(d0.shape, bool)
    s = shift[..., None] if lo == 0 else np.float32(0)
    for d in _fp16_near(d0):
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((B - s) / d[..., None])
        q = np.clip(np.nan_to_num(np.where(d[..., None] > 0, q, 0)), lo, hi).astype(Q.dtype)
        rec = d[..., None] * q.astype(np.float32)
        if lo == 0:
            rec = rec + s
        good = (rec == B).all(-1) & ~ok
        D[good], Q[good] = d[good], q[good]
        ok |= good
        if ok.all():
            return D, Q
    return None


def _panels(a, P):
    """[rows, ...] per-row fp16 values -> [P, blocks, 16 * size] with each panel's 16 rows together."""
    return a.reshape(P, 16, a.shape[1]).transpose(0, 2, 1).copy()


def pack(W, chunk: int = 4096):
    """(format, packed uint8 array) for an fp32 weight [N, K] whose every block is exact in one
    of FORMATS (tried in that order), else None."""
    import numpy as np

    N, K = W.shape
    if N % 16 or K % 32 or W.dtype != np.float32:
        return None
    nb = K // 32
    for fmt in FORMATS:
        parts = []
        for s in range(0, N, chunk):
            Wc = W[s : s + chunk]
            R = Wc.shape[0]
            P = R // 16
            B = Wc.reshape(R, nb, 32)
            if fmt == 1:  # Q4_1: d[16] fp16, m[16] fp16, per pair of k 16 bytes of two nibbles
                m = B.min(-1)
                if not np.array_equal(m.astype(np.float16).astype(np.float32), m):
                    break
                r = _blocks(B, (0, 15), m)
                if r is None:
                    break
                d, q = r
                q = q.reshape(P, 16, nb, 32).transpose(0, 2, 3, 1)  # panel, block, k, row
                nib = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(P, nb, 256)  # row j: k | k+1
                dd = _panels(d.astype(np.float16), P).view(np.uint8)
                mm = _panels(m.astype(np.float16), P).view(np.uint8)
                parts.append(np.concatenate([dd, mm, nib], -1).reshape(P, -1))
            elif fmt == 2:  # Q8_0: d[16] fp16, per k 16 int8
                r = _blocks(B, (-127, 127), None)
                if r is None:
                    break
                d, q = r
                q = q.reshape(P, 16, nb, 32).transpose(0, 2, 3, 1).reshape(P, nb, 512).view(np.uint8)
                dd = _panels(d.astype(np.float16), P).view(np.uint8)
                parts.append(np.concatenate([dd, q], -1).reshape(P, -1))
            else:  # BF16: per k 16 bf16
                u = Wc.view(np.uint32)
                if (u & 0xFFFF).any():
                    break
                h = (u >> 16).astype(np.uint16).reshape(P, 16, K).transpose(0, 2, 1)
                parts.append(np.ascontiguousarray(h).view(np.uint8).reshape(P, -1))
        else:
            return fmt, np.ascontiguousarray(np.concatenate(parts))
    return None


# -- the model's layers ---------------------------------------------------------------------


def _linears(model):
    import torch

    return [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]


def packed_weights(model, fingerprint: str | None = None) -> dict:
    """{layer name: (format, packed array)} for the model's packable nn.Linear layers, from
    ``$CAI_CACHE/packed`` when this fingerprint was packed before."""
    import numpy as np

    from cai.models import cache_dir

    path = cache_dir() / "packed" / f"{fingerprint}-v{LAYOUT_VERSION}.safetensors" if fingerprint else None
    if path is not None and path.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                return {k: (int(meta[k]), f.get_tensor(k)) for k in f.keys()}
        except Exception:  # a damaged cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    out, seen = {}, {}
    for name, m in _linears(model):
        w = m.weight.detach()
        key = (w.data_ptr(), tuple(w.shape))
        if key not in seen:  # tied weights (lm_head = embeddings) are packed once
            seen[key] = pack(np.ascontiguousarray(w.float().numpy())) if w.device.type == "cpu" else None
        if seen[key] is not None:
            out[name] = seen[key]
    if out:
        mb = sum({id(v[1]): v[1].nbytes for v in out.values()}.values()) / 1e6
        print(f"cai: packed {len(out)} layers ({mb:.0f} MB) for the CPU decode kernel", file=sys.stderr)
    if path is not None and out and sum(v[1].nbytes for v in out.values()) <= CACHE_MAX_BYTES:
        from safetensors.numpy import save

        from cai.records import write_atomic

        data = save({k: v[1] for k, v in out.items()}, metadata={k: str(v[0]) for k, v in out.items()})
        try:  # atomic: a concurrent or killed run never leaves half a file
            write_atomic(path, lambda f: f.write(data))
        except OSError:  # a read-only or full cache only costs the packing again next time
            pass
    return out


def install(model, fingerprint: str | None = None) -> tuple[dict | None, str | None]:
    """Route the model's packable nn.Linear layers' 1-16-row inputs through the kernel. Returns
    (what it did: {"layers", "formats", "packed_bytes", "fp32_bytes"}, None), or (None, why not)."""
    import torch
    import torch.nn.functional as F

    lib = library()
    if lib is None:
        return None, why_not
    packs = packed_weights(model, fingerprint)
    # a packed array must have exactly the bytes its layer's shape needs (a cache written under
    # other layer names or shapes is never read past its end)
    layers = {
        n: m
        for n, m in _linears(model)
        if n in packs
        and m.out_features % 16 == 0
        and packs[n][1].nbytes == lib.cai_panel_bytes(packs[n][0], m.in_features) * (m.out_features // 16)
    }
    if not layers:
        return None, "no layer's weights are exactly Q4_1, Q8_0 or bf16 values"

    def rows(fmt, packed, x2, bias, out_features, threads):
        n, k = x2.shape
        y = torch.empty(n, out_features)
        b = bias.data_ptr() if bias is not None else None
        xt = torch.empty(MAX_ROWS * k)  # x transposed; per call, as callers may be threads
        rc = lib.cai_rows(
            fmt,
            x2.data_ptr(),
            packed.ctypes.data,
            b,
            y.data_ptr(),
            n,
            out_features,
            k,
            threads,
            xt.data_ptr(),
        )
        if rc:
            raise RuntimeError(f"rowkernel refused a {n}x{k} input for a {out_features}-row weight")
        return y

    # The kernel against torch, on one layer of each format and an odd row count, before any
    # layer switches: a miscompiled kernel or a wrong packing must never reach a generation.
    gen = torch.Generator().manual_seed(0)
    for fmt in sorted({packs[n][0] for n in layers}):
        name = next(n for n in layers if packs[n][0] == fmt)
        m = layers[name]
        x = torch.randn(5, m.in_features, generator=gen)
        with torch.no_grad():
            want = F.linear(x, m.weight.float(), m.bias)
            got = rows(fmt, packs[name][1], x, m.bias, m.out_features, torch.get_num_threads())
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            return None, f"the kernel disagreed with torch on {name} ({FORMATS[fmt]}); not used"

    def forward(self, x):
        n = x.numel() // x.shape[-1] if x.dim() >= 2 else 0
        if (
            not 1 <= n <= MAX_ROWS
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return self._cai_fallback(x)
        y = rows(
            *self._cai_packed,
            x.reshape(n, -1).contiguous(),
            self.bias,
            self.out_features,
            torch.get_num_threads(),
        )
        return y.view(*x.shape[:-1], self.out_features)

    homed = _on_huge_pages([packs[n][1] for n in layers])
    for name, m in layers.items():
        m._cai_fallback = m.forward  # route_small_linears' or nn.Linear's own
        m._cai_packed = (packs[name][0], homed[id(packs[name][1])])
        m.forward = forward.__get__(m)
    used = [m._cai_packed for m in layers.values()]
    info = {
        "layers": len(layers),
        "formats": dict(collections.Counter(FORMATS[fmt] for fmt, _ in used)),
        "packed_bytes": sum({id(a): a.nbytes for _, a in used}.values()),  # tied weights once
        "fp32_bytes": sum({m.weight.data_ptr(): m.weight.numel() * 4 for m in layers.values()}.values()),
    }
    return info, None


def _on_huge_pages(arrays) -> dict:
    """{id(array): the same values in one arena on 2 MB pages} (hugepages.py: a step streams
    them all); tied weights, one array under several names, are copied once."""
    from cai.backends import hugepages

    distinct = list({id(a): a for a in arrays}.values())
    offsets, total = [], 0
    for a in distinct:
        offsets.append(total)
        total += -(-a.nbytes // 64) * 64
    arena = hugepages.empty(total)
    out = {}
    for a, off in zip(distinct, offsets):
        dst = arena[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
        dst[...] = a
        out[id(a)] = dst
    return out


# -- decode attention -----------------------------------------------------------------------

ATTENTION = "cai_cpu"  # the name registered with transformers' attention and mask interfaces


def install_attention(model) -> bool:
    """Route the model's one-query-per-row attention (decode steps) through rowkernel.c's
    cai_decode_attention: each row's fp32 keys and values are read once for all the query heads
    that share them, where torch's CPU SDPA reached ~45% of this core's streaming rate. Prefill,
    the judge's longer forwards, training and anything unusual (dropout, soft-capping, sinks, a
    per-head or float mask) keep transformers' SDPA. Only for models that use "sdpa"; checked
    against SDPA at install (a disagreement, or heads it does not take, leave SDPA in place).
    Returns whether it is installed."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    lib = library()
    if lib is None or getattr(model.config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return False

    def ours(module, query, key, value, mask, scaling):
        B, H, T, D = query.shape
        KVH, L = key.shape[1], key.shape[2]
        if (
            T != 1
            or query.dtype != torch.float32
            or key.dtype != torch.float32
            or value.dtype != torch.float32
            or query.device.type != "cpu"
            or torch.is_grad_enabled()
            or key.stride(-1) != 1
            or value.stride(-1) != 1
            or key.stride(-2) != D
            or value.stride(-2) != D
            or value.shape[2] != L
            or value.shape[-1] != D
        ):
            return None
        keep = None
        if mask is not None:
            if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != L:
                return None
            keep = mask[:, 0, -1, :].expand(B, L).to(torch.uint8).contiguous()
        q = query.reshape(B, H, D).contiguous()
        out = torch.empty(B, H, D)
        rc = lib.cai_decode_attention(
            q.data_ptr(),
            key.data_ptr(),
            value.data_ptr(),
            keep.data_ptr() if keep is not None else None,
            out.data_ptr(),
            B,
            H,
            KVH,
            L,
            D,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            scaling if scaling is not None else D**-0.5,
            torch.get_num_threads(),
        )
        return None if rc else out.view(B, 1, H, D)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        if not dropout and all(kw.get(k) is None for k in ("softcap", "s_aux", "position_bias")):
            out = ours(module, query, key, value, attention_mask, scaling)
            if out is not None:
                return out, None
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kw,
        )

    # against SDPA first, with grouped heads, padding and a cache view that is not contiguous
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    H = getattr(cfg, "num_attention_heads", None)
    if not isinstance(H, int) or H < 1:
        return False  # not a config this check can read (composite models): SDPA stays
    KVH = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // H
    if not D:
        return False
    B, L = 3, 37
    q = torch.randn(B, H, 1, D, generator=gen)
    k = torch.randn(B, KVH, L + 5, D, generator=gen)[:, :, :L]
    v = torch.randn(B, KVH, L + 5, D, generator=gen)[:, :, :L]
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., :9] = False

    class Module:
        num_key_value_groups = H // KVH
        is_causal = True

    with torch.no_grad():
        got = ours(Module, q, k, v, mask, None)
        want = sdpa_attention_forward(Module, q, k, v, mask)[0]
    if got is None or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return False
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same boolean masks as "sdpa"
    model.config._attn_implementation = ATTENTION
    return True


# -- a whole decode step in one call --------------------------------------------------------

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_STEP_ARGS = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache"}
_STEP_ARGS |= {"logits_to_keep", "return_dict"}


def _static_rope(rotary) -> bool:
    """Whether the rotary module's frequencies are fixed (not recomputed from the length)."""
    kind = getattr(rotary, "rope_type", None)
    return isinstance(kind, str) and "dynamic" not in kind and kind != "longrope"


class _RopeTable:
    """cos/sin [positions, head dim] from the model's own rotary module, computed 16 positions a
    call: the shape of a 16-row step's request, so each row holds the bits that call returns."""

    def __init__(self, rotary, D):
        import torch

        self.rotary, self.D, self.torch = rotary, D, torch
        self.cos = self.sin = torch.empty(0, D)
        self.size = 0

    def grow(self, positions: int):
        torch = self.torch
        target = max(-(-positions // 16) * 16, 2 * self.size)
        x = torch.empty(16, 1)  # only its dtype and device are read
        cos, sin = [self.cos], [self.sin]
        with torch.no_grad():
            for p in range(self.size, target, 16):
                c, s = self.rotary(x, position_ids=torch.arange(p, p + 16).reshape(16, 1))
                cos.append(c.reshape(16, self.D).float())
                sin.append(s.reshape(16, self.D).float())
        self.cos, self.sin = torch.cat(cos).contiguous(), torch.cat(sin).contiguous()
        self.size = target


def install_decoder(model, checked=None) -> str | None:
    """Run a Llama-style model's decode steps (one new token per row, 1-16 rows) as one call to
    rowkernel.c's cai_decode_step: the embedding lookup, then the norms, projections, rotary, the
    cache write, attention and MLP of every layer, the final norm and the output layer. It removes
    the ~50 small torch operations per layer (and their Python) that cost a third of a batch-16
    step once the weights are read fast (install), and the dozen left around the layers, each of
    which pays for caches the step's weights have just flushed (~0.1-0.3 ms apiece).

    Needs install's packed weights on all seven projections of every layer, and a KV cache whose
    layers keep fp32 buffers with room for the new token (hf.py's BufferedLayer: ``_keys`` and
    ``_values`` [rows, kv heads, capacity, head dim] of which ``_n`` positions are filled; the
    step writes position ``_n`` and counts it); any other call goes to the model's own forward.
    An output layer without packed weights stays in torch. The rotary cos/sin come from a table
    the model's own rotary module computes (16 positions a call, as a 16-row step asks for them),
    or every step from that module where its frequencies depend on the length (dynamic RoPE).
    Checked against the model's forward on one step before it is used (``checked(run)``: the
    caller's way to remember the verdict of ``run()``). Returns None when installed, else why not."""
    import dataclasses
    import functools
    import weakref

    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lib = library()
    if lib is None:
        return why_not
    cfg, base = model.config, getattr(model, "model", None)
    if getattr(cfg, "model_type", None) != "llama" or base is None or not hasattr(model, "lm_head"):
        return f"not a Llama-style model ({getattr(cfg, 'model_type', None)})"
    if getattr(cfg, "hidden_act", None) != "silu" or (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        return "activation or tensor-parallel split it does not take"
    H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    if H % KVH or H // KVH > 8 or D % 16 or D > 256:
        return f"attention heads it does not take ({H} query, {KVH} key/value, dimension {D})"
    layers = list(base.layers)
    norms = [base.norm] + [m for lay in layers for m in (lay.input_layernorm, lay.post_attention_layernorm)]
    if len({getattr(m, "variance_epsilon", None) for m in norms}) != 1:
        return "norms with different epsilons"
    if type(base.embed_tokens) is not torch.nn.Embedding or base.embed_tokens.max_norm is not None:
        return f"an embedding it does not take ({type(base.embed_tokens).__name__})"
    weights = [m.weight for m in norms] + [base.embed_tokens.weight]
    if any(w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() for w in weights):
        return "not an fp32 model on the CPU"
    structs = (_Layer * len(layers))()
    for lay, st in zip(layers, structs):
        mods = [lay.get_submodule(n) for n in _PROJ + _MLP]
        if not all(hasattr(m, "_cai_packed") for m in mods):
            return "a projection without packed weights"
        for i, m in enumerate(mods):
            st.w[i] = m._cai_packed[1].ctypes.data
            st.fmt[i] = m._cai_packed[0]
            st.bias[i] = m.bias.data_ptr() if m.bias is not None else None
        st.norm_in = lay.input_layernorm.weight.data_ptr()
        st.norm_post = lay.post_attention_layernorm.weight.data_ptr()
    hidden, vocab = cfg.hidden_size, base.embed_tokens.weight.shape[0]
    head = getattr(model.lm_head, "_cai_packed", None)
    if head is not None and (model.lm_head.in_features, model.lm_head.out_features) != (hidden, vocab):
        head = None
    dec = _Decoder(
        ctypes.addressof(structs), len(layers), hidden, H, KVH, D, cfg.intermediate_size, vocab,
        float(base.norm.variance_epsilon), float(layers[0].self_attn.scaling),
        base.embed_tokens.weight.data_ptr(), base.norm.weight.data_ptr(),
        head[1].ctypes.data if head else None, head[0] if head else 0,
        model.lm_head.bias.data_ptr() if head and model.lm_head.bias is not None else None,
    )  # fmt: skip
    rope = _RopeTable(base.rotary_emb, D) if _static_rope(base.rotary_emb) else None
    cache_kw = (
        "cache"
        if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        else "past_key_values"
    )
    own = model.forward
    rows = torch.arange(MAX_ROWS)
    # what the previous step left: its cache, each layer's class and buffers, and n (held weakly:
    # a finished generation's cache must not outlive it here)
    last = {}

    def buffers(cache, B):
        """The cache's layers as (layers, n) if every one has buffers this step can write."""
        cl = getattr(cache, "layers", None)
        if "n" in last and last["cache"]() is cache and last["B"] == B and last["n"] + 1 < last["cap"]:
            # the step before left these buffers at n + 1 and nothing has touched them since
            n = last["n"] + 1
            held = zip(cl, last["layout"])
            if all(type(c) is t and c._keys is k() and c._values is v() for c, (t, k, v) in held) and all(
                c._n == n for c in cl
            ):
                return cl, n
        last.clear()
        if not cl or len(cl) != len(layers):
            return None
        n = getattr(cl[0], "_n", None)
        shape = getattr(getattr(cl[0], "_keys", None), "shape", None)  # one stride for all layers
        for c in cl:
            kb, vb = getattr(c, "_keys", None), getattr(c, "_values", None)
            if (
                not isinstance(n, int)
                or getattr(c, "_n", None) != n
                or kb is None
                or vb is None
                or kb.dtype != torch.float32
                or vb.dtype != torch.float32
                or kb.device.type != "cpu"
                or kb.shape != shape
                or shape != (B, KVH, shape[2], D)
                or vb.shape != shape
                or not kb.is_contiguous()
                or not vb.is_contiguous()
                or kb.shape[2] <= n
            ):
                return None
        for st, c in zip(structs, cl):
            st.k, st.v = c._keys.data_ptr(), c._values.data_ptr()
        last.update(cache=weakref.ref(cache), B=B, cap=shape[2], stride=cl[0]._keys.stride()[:2])
        # what the fast path above compares by identity (a replaced buffer means new pointers)
        last["layout"] = [(type(c), weakref.ref(c._keys), weakref.ref(c._values)) for c in cl]
        return cl, n

    def step(ids, mask, pos, cache):
        B = ids.shape[0]
        found = buffers(cache, B)
        if found is None:
            return None
        cl, n = found
        if mask is not None and tuple(mask.shape) != (B, n + 1):
            return None
        ids = ids.reshape(B).long().contiguous()
        pos = pos.reshape(B).long().contiguous() if pos is not None else torch.full((B,), n)
        if rope is not None:
            if rope.size < last["cap"]:
                rope.grow(last["cap"])
            cos, sin, at = rope.cos, rope.sin, pos
        else:
            cos, sin = base.rotary_emb(base.embed_tokens.weight[:1], position_ids=pos.reshape(B, 1))
            # held in names until the call returns: a temporary's memory would be freed before it
            cos, sin = cos.reshape(B, D).float().contiguous(), sin.reshape(B, D).float().contiguous()
            at = rows
        keep = mask.to(torch.uint8).contiguous() if mask is not None else None
        out = torch.empty(B, vocab if head else hidden)
        args = [ctypes.byref(dec), ids.data_ptr(), at.data_ptr(), None, None, 0]
        args += [keep.data_ptr() if keep is not None else None, B, n, *last["stride"], out.data_ptr()]
        args.append(torch.get_num_threads())
        for _ in range(2):
            args[3:6] = cos.data_ptr(), sin.data_ptr(), cos.shape[0]
            rc = lib.cai_decode_step(*args)
            if rc != 3 or rope is None or int(pos.max()) < rope.size:
                break
            rope.grow(int(pos.max()) + 1)  # a position past the table: extend it, once
            cos, sin = rope.cos, rope.sin
        if rc == 3:
            last.clear()
            return None  # a token id outside the vocabulary: the model's forward says so
        if rc:
            raise RuntimeError(f"rowkernel's decode step refused {B} rows at position {n} (code {rc})")
        for c in cl:
            c._n = n + 1
        last["n"] = n
        logits = out if head else model.lm_head(out)
        return CausalLMOutputWithPast(logits=logits.view(B, 1, -1), **{cache_kw: cache})

    @functools.wraps(own)
    def forward(*args, **kw):
        ids = kw.get("input_ids", args[0] if args else None)
        cache = kw.get("cache", kw.get("past_key_values"))
        if (
            len(args) <= 1
            and cache is not None
            and isinstance(ids, torch.Tensor)
            and ids.dim() == 2
            and ids.shape[1] == 1
            and 1 <= ids.shape[0] <= MAX_ROWS
            and ids.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not model.training
            and set(kw) <= _STEP_ARGS
            and kw.get("use_cache", True)
            and kw.get("logits_to_keep", 0) in (0, 1)
            and kw.get("return_dict", True)
        ):  # fmt: skip
            out = step(ids, kw.get("attention_mask"), kw.get("position_ids"), cache)
            if out is not None:
                return out
        return own(*args, **kw)

    found = []

    def run() -> bool:
        found.append(_check_decoder(model, own, step))
        return found[-1] is None

    if not (checked or (lambda f: f()))(run):
        return (
            found[-1] if found else "the one-call decode step disagreed with the model's forward (remembered)"
        )
    model.forward = forward
    return None


def _check_decoder(model, own, step) -> str | None:
    """One fused step against the model's own forward, with left padding and a buffered cache."""
    import inspect

    import torch

    from cai.backends.hf import _preallocate

    kw = "cache" if "cache" in inspect.signature(own).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(0)
    B, T = 3, 6
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T + 1, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask[:, :T].cumsum(-1) - 1).clamp(min=0)
    nxt = torch.randint(0, model.config.vocab_size, (B, 1), generator=gen)
    with torch.inference_mode():
        ref = own(input_ids=ids, attention_mask=mask[:, :T], position_ids=pos, use_cache=True)
        cache = getattr(ref, "cache", None) or ref.past_key_values
        mine = copy.deepcopy(cache)
        _preallocate(mine, 3)  # the buffered cache hf's decode loop hands to the step
        want = own(
            input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + 1, use_cache=True, **{kw: cache}
        )
        got = step(nxt, mask, pos[:, -1:] + 1, mine)
    if got is None:
        return "the check's cache was not taken"
    a, b = want.logits.float(), got.logits.float()
    ka, kb = [c.keys for c in cache.layers], [c.keys for c in mine.layers]
    tol = 1e-3 * float(a.abs().max())
    if not torch.allclose(a, b, rtol=1e-4, atol=tol) or not all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(x.abs().max())) for x, y in zip(ka, kb)
    ):
        diff = float((a - b).abs().max())
        return f"the one-call decode step disagreed with the model's forward (max |dlogit| {diff:.3g})"
    return None
