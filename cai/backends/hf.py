"""Local transformers backend: real tensor batching, the GPU path, and the exact reference.

On a GPU this is the default engine (``--backend auto``); on a CPU it runs models that are not
GGUF files, and the tests use it as the reference the llama.cpp engine is measured against.

Generation: prompts are sorted by token length so a batch wastes little on padding,
left-padded (decoder-only models continue from the right), and decoded together by
transformers' own ``generate()`` with the KV cache.

Option log-probs (the judge) share work *within* a call: the judge sends each pair in both
orders and under several principles, and those prompts repeat the same long conversation. The
prompts are merged into a prefix tree of their token ids and run level by level, so every
shared span (the system prompt and instructions for all pairs, the conversation for one pair)
goes through the model once and its KV cache is copied to the branches that continue it.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time

from cai.backends.base import Generation
from cai.errors import InputError
from cai.records import to_transcript


class HFBackend:
    name = "hf"
    supports_logprobs = True

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 16,
        device: str | None = None,
        trust_remote_code: bool = False,
        max_input_tokens: int = 4096,
        share_prefix: bool = True,
        threads: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cai.models import check_weights, pick_device, pick_dtype, quiet_transformers, resolve_model

        path, self.model_id = resolve_model(model)
        check_weights(path)
        self.model_path = path  # for cai.models.fingerprint (resume identity)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device)
        self.batch_size = max(1, int(batch_size))
        self.max_input_tokens = max_input_tokens
        self.stats = {
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "truncated_prompts": 0,
            "prefix_tokens_reused": 0,
            "computed_tokens": 0,
            "generate_s": 0.0,
        }
        # Prefix sharing is checked once against the plain path on the first call (see
        # _check_prefix_path); an architecture where it disagrees falls back to plain batches.
        self.share_prefix = share_prefix
        self._prefix_ok: bool | None = None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every start is noise
        try:
            with quiet_transformers():  # load reports would bury the one `Error:` line
                self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                # safetensors only: pickle-based .bin weights can run code on load.
                self.model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=self.dtype, use_safetensors=True, trust_remote_code=trust_remote_code
                )
        except OSError as e:
            raise InputError(
                f"cannot load model {model!r}: {str(e).splitlines()[0]} — pass a local folder with "
                "safetensors weights, or a Hugging Face id available offline"
            ) from None
        except ValueError as e:
            if "trust_remote_code" in str(e):
                raise InputError(
                    f"model {model!r} needs its own code to run; pass --trust-remote-code if you trust it"
                ) from None
            raise InputError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self.threads = None
        if self.device == "cpu":
            self.threads = max(1, int(threads)) if threads else torch.get_num_threads()
            if self.threads != torch.get_num_threads():
                torch.set_num_threads(self.threads)
        self.tok.padding_side = "left"
        self.tok.truncation_side = "left"  # keep the end of long conversations
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self._torch = torch
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed past_key_values -> cache
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- rendering ---------------------------------------------------------------------

    def render(self, conversation: list[dict]) -> str:
        """The exact text the model sees; a trailing assistant message is continued."""
        prefix = conversation[-1]["role"] == "assistant"
        if self.tok.chat_template:
            return self.tok.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=not prefix,
                continue_final_message=prefix,
            )
        body = to_transcript(conversation).lstrip()
        return body if prefix else body + "\n\nAssistant:"

    def describe(self) -> dict:
        import transformers

        out = {
            "backend": self.name,
            "model": self.model_id,
            "engine": f"transformers {transformers.__version__}, torch {self._torch.__version__}",
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
        }
        if self.threads:
            out["threads"] = self.threads
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids, cut from the left to max_input_tokens (the end of a prompt matters most)."""
        out = []
        for r in self.tok(texts, add_special_tokens=False)["input_ids"]:
            if len(r) > self.max_input_tokens:
                r = r[-self.max_input_tokens :]
                self.stats["truncated_prompts"] += 1
            out.append(r)
        return out

    def _pad(self, rows: list[list[int]]) -> dict:
        enc = self.tok.pad({"input_ids": rows}, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _batches(self, ids: list[list[int]]):
        """Yield (indices, encoding) for length-sorted batches of at most batch_size."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = self._pad([ids[i] for i in idx])
            self.stats["prompt_tokens"] += sum(len(ids[i]) for i in idx)
            self.stats["computed_tokens"] += enc["input_ids"].numel()
            yield idx, enc

    # -- the two operations --------------------------------------------------------------

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        torch = self._torch
        ids = self._encode([self.render(c) for c in conversations])
        out: list[Generation | None] = [None] * len(ids)
        sample = bool(temperature and temperature > 0)
        for b, (idx, enc) in enumerate(self._batches(ids)):
            if sample:
                # Seeded per (seed, batch): identical reruns with the same batch size reproduce.
                torch.manual_seed((seed or 0) * 1_000_003 + b)
            t0 = time.perf_counter()
            with torch.inference_mode():
                rows = self._hf_generate(enc, max_new_tokens, temperature if sample else 0.0)
            self.stats["generate_s"] += time.perf_counter() - t0
            for j, i in enumerate(idx):
                toks = rows[j]
                self.stats["generated_tokens"] += len(toks)
                out[i] = Generation(self.tok.decode(toks, skip_special_tokens=True).strip(), len(toks))
        return out

    def _stop_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return {i for i in ids | {self.tok.eos_token_id} if i is not None}

    def _hf_generate(self, enc, max_new_tokens, temperature):
        """transformers' own generate(): greedy, or plain temperature sampling over the whole
        vocabulary (no top-k/top-p), as the llamacpp backend samples."""
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seqs = self.model.generate(**enc, **kw)
        new = seqs[:, enc["input_ids"].shape[1] :].tolist()
        stop, rows = self._stop_ids() | {self.tok.pad_token_id}, []
        for toks in new:
            # up to and including the first eos/pad: those are real decode steps
            n = next((k + 1 for k, t in enumerate(toks) if t in stop), len(toks))
            rows.append(toks[:n])
        return rows

    def option_token_ids(self, options: list[str]) -> list[int]:
        ids = []
        for o in options:
            t = self.tok(o, add_special_tokens=False)["input_ids"]
            if not t:
                raise InputError(f"option {o!r} encodes to no token")
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            raise InputError(f"options {options} share a first token; use distinct single-token letters")
        return ids

    def option_logprobs(self, prompts, options):
        opt = self.option_token_ids(options)
        ids = self._encode([self.render(p) for p in prompts])
        if self.share_prefix and len(ids) > 1:
            if self._prefix_ok is None:
                self._prefix_ok = self._check_prefix_path(ids, opt)
            if self._prefix_ok:
                self.stats["prompt_tokens"] += sum(len(r) for r in ids)
                return self._tree_logprobs(ids, opt)
        return self._flat_logprobs(ids, opt)

    def _flat_logprobs(self, ids, opt):
        """Each prompt in full, in length-sorted left-padded batches."""
        torch = self._torch
        opt = torch.tensor(opt, device=self.device)
        out: list[list[float] | None] = [None] * len(ids)
        for idx, enc in self._batches(ids=ids):
            with torch.inference_mode():
                # logits_to_keep=1: only the last position's logits (saves a vocab-sized matmul per token)
                logits = self.model(**enc, logits_to_keep=1).logits[:, -1, :].float()
            lp = torch.log_softmax(logits, dim=-1)[:, opt]
            for j, i in enumerate(idx):
                out[i] = lp[j].tolist()
        return out

    def _tree_logprobs(self, ids, opt):
        """The same numbers as _flat_logprobs, computing each shared prefix once.

        The prompts form a radix tree of token ids. The trunk every prompt shares is run once
        (batch 1); the subtrees under it (for the judge: one pair's conversation, then its
        orders and principles) are packed into batches of at most batch_size prompts and run
        one tree level per forward pass, each node continuing its parent's KV cache. A node's
        tokens are left-padded within its level, so padding sits *between* levels; the
        attention mask hides it and explicit position ids keep each row's positions contiguous.
        """
        root = _radix_tree(ids)
        out: list[list[float] | None] = [None] * len(ids)

        def record(nodes, lp):
            for j, node in enumerate(nodes):
                for i in node.ends:
                    out[i] = lp[j].tolist()

        if len(root.kids) == 1 and not root.ends:
            trunk = next(iter(root.kids.values()))
            _unshare_short(trunk)
            trunk_state, lp = self._extend(None, [trunk], None, opt)
            record([trunk], lp)
            units = list(trunk.kids.values())
        else:
            _unshare_short(root)
            trunk_state, units = None, list(root.kids.values())
        self.stats["prefix_tokens_reused"] += sum(len(r) for r in ids) - _tree_tokens(root)
        for batch in self._pack(units):
            nodes, parents, state = batch, [0] * len(batch) if trunk_state else None, None
            while nodes:
                base = copy.deepcopy(trunk_state) if state is None and trunk_state else state
                state, lp = self._extend(base, nodes, parents, opt)
                record(nodes, lp)
                parents = [j for j, n in enumerate(nodes) for _ in n.kids]
                nodes = [k for n in nodes for k in n.kids.values()]
        return out

    def _pack(self, units):
        """Batches of subtrees: at most batch_size prompts each, and a subtree joins a batch only
        while the padding it causes stays within a budget of the batch's real tokens (10% on a
        CPU, 100% on a GPU). On a CPU a bigger batch buys almost nothing — with ~100 tokens per
        row the matmuls are already large — so padding is pure loss; a GPU trades some padding
        for parallelism."""
        budget = 0.1 if self.device == "cpu" else 1.0
        units = sorted(units, key=_longest)
        batch, widths, real, leaves = [], [], 0, 0
        for u in units:
            prof, u_real, u_leaves = _profile(u), _tree_tokens(u), _leaves(u)
            merged = [(max(a[0], b[0]), a[1] + b[1]) for a, b in _zip_longest(widths, prof)]
            cost = sum(w * n for w, n in merged)
            if batch and (leaves + u_leaves > self.batch_size or cost > (1 + budget) * (real + u_real)):
                yield batch
                batch, widths, real, leaves = [], [], 0, 0
                merged = prof
            batch.append(u)
            widths, real, leaves = merged, real + u_real, leaves + u_leaves
        if batch:
            yield batch

    def _extend(self, state, nodes, parents, opt):
        """Run each node's tokens after its parent's row of ``state``; return the new state and
        the option log-probs after each node's last token."""
        torch = self._torch
        width = max(len(n.toks) for n in nodes)
        ids = torch.full((len(nodes), width), self.tok.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros((len(nodes), width), dtype=torch.long)
        for j, n in enumerate(nodes):
            ids[j, width - len(n.toks) :] = torch.tensor(n.toks)
            new_mask[j, width - len(n.toks) :] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        self.stats["computed_tokens"] += ids.numel()  # padding included: the work actually done
        if state is None:
            cache, mask, lens = None, new_mask, new_mask.sum(1)
            pos = (new_mask.cumsum(1) - 1).clamp(min=0)
        else:
            cache, past_mask, past_lens = state
            sel = torch.tensor(parents, device=self.device)
            cache.batch_select_indices(sel)
            past_mask, past_lens = past_mask[sel], past_lens[sel]
            mask = torch.cat([past_mask, new_mask], dim=1)
            pos = past_lens[:, None] + (new_mask.cumsum(1) - 1).clamp(min=0)
            lens = past_lens + new_mask.sum(1)
        with torch.inference_mode():
            res, new_cache = self._forward(ids, mask, pos, cache)
        lp = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1)[:, torch.tensor(opt, device=self.device)]
        return (new_cache, mask, lens), lp

    def _check_prefix_path(self, ids, opt) -> bool:
        """Once per backend: the prefix tree and plain batches must give the same numbers on two
        of this call's prompts (cheap insurance for architectures with unusual caches). Each is
        cut 16 tokens past where the two part, so the check runs a shared trunk and two branches
        as the real calls do, without paying for two whole judge prompts twice."""
        a, b = ids[0], ids[1]
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        sample = [a[: k + 16], b[: k + 16]]
        try:
            a = self._tree_logprobs(sample, opt)
            b = self._flat_logprobs(sample, opt)
        except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
            _warn(
                f"shared-prefix scoring unavailable for this model ({type(e).__name__}: {e}); using plain "
                "batches"
            )
            return False
        tol = 1e-3 if self.dtype == self._torch.float32 else 0.1
        diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        if diff > tol:
            _warn(
                f"shared-prefix scoring differs from plain batches by {diff:.3g} on this model; using plain "
                "batches"
            )
            return False
        return True

    def _forward(self, ids, mask, pos, cache=None):
        """One forward with the KV cache, last position's logits only: (output, its cache)."""
        res = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **({self._cache_kw: cache} if cache is not None else {}),
        )
        new = getattr(res, "cache", None)
        return res, (res.past_key_values if new is None else new)


class _Node:
    __slots__ = ("toks", "kids", "ends")

    def __init__(self, toks):
        self.toks = toks  # the tokens on the edge into this node (never empty below the root)
        self.kids: dict[int, _Node] = {}  # first token -> child
        self.ends: list[int] = []  # prompts that end exactly here


def _radix_tree(seqs: list[list[int]]) -> _Node:
    root = _Node([])
    for i, s in enumerate(seqs):
        node, pos = root, 0
        while True:
            if pos == len(s):
                node.ends.append(i)
                break
            child = node.kids.get(s[pos])
            if child is None:
                leaf = _Node(list(s[pos:]))
                leaf.ends.append(i)
                node.kids[s[pos]] = leaf
                break
            t, k, m = child.toks, 0, min(len(child.toks), len(s) - pos)
            while k < m and t[k] == s[pos + k]:
                k += 1
            if k < len(t):  # split the edge where this prompt leaves it
                mid = _Node(t[:k])
                child.toks = t[k:]
                mid.kids[child.toks[0]] = child
                node.kids[s[pos]] = mid
                child = mid
            node, pos = child, pos + k
    if root.ends:
        raise InputError("an empty prompt cannot be scored")
    return root


# A span shorter than this is not worth sharing: it would tie unrelated prompts (all those that
# start with "How do I") into one batch whose deeper levels pad each other's lengths.
MIN_SHARED_TOKENS = 32


def _unshare_short(node):
    """Push short shared spans below ``node`` down into their children, recursively."""
    kids, out = list(node.kids.values()), []
    while kids:
        k = kids.pop()
        if k.kids and not k.ends and len(k.toks) < MIN_SHARED_TOKENS:
            for g in k.kids.values():
                g.toks = k.toks + g.toks
                kids.append(g)
        else:
            out.append(k)
    # keys no longer matter once the tree is built (merged children may share a first token)
    node.kids = {i: k for i, k in enumerate(reversed(out))}
    for k in out:
        _unshare_short(k)


def _walk(node):
    yield node
    for k in node.kids.values():
        yield from _walk(k)


def _tree_tokens(root) -> int:
    return sum(len(n.toks) for n in _walk(root))


def _leaves(node) -> int:
    return sum(len(n.ends) for n in _walk(node))


def _profile(node) -> list[tuple[int, int]]:
    """(widest edge, node count) per tree level: the shape of the forward passes it needs."""
    out, frontier = [], [node]
    while frontier:
        out.append((max(len(n.toks) for n in frontier), len(frontier)))
        frontier = [k for n in frontier for k in n.kids.values()]
    return out


def _zip_longest(a, b):
    for i in range(max(len(a), len(b))):
        yield (a[i] if i < len(a) else (0, 0)), (b[i] if i < len(b) else (0, 0))


def _longest(node) -> int:
    return len(node.toks) + max((_longest(k) for k in node.kids.values()), default=0)


def _warn(msg: str):
    print(f"cai: {msg}", file=sys.stderr)
