"""Local transformers backend: real tensor batching, GPU when present, CPU fp32 otherwise.

Batching is where the speed is on both CPU and GPU: prompts are sorted by token length so a
batch wastes little on padding, left-padded (decoder-only models continue from the right), and
decoded together with the KV cache.

Option log-probs (the judge) also share work *within* a call: the judge sends each pair in both
orders and under several principles, and those prompts repeat the same long conversation. The
prompts are merged into a prefix tree of their token ids and run level by level, so every
shared span (the system prompt and instructions for all pairs, the conversation for one pair)
goes through the model once and its KV cache is copied to the branches that continue it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
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

        from cai.models import (
            check_weights,
            fingerprint,
            pick_device,
            pick_dtype,
            quiet_transformers,
            resolve_model,
        )

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
        # The last generate() call's sequences and their KV cache, for the next call's prompts
        # that start with them (a critique prompt repeats the conversation and the response).
        self._kept: _Kept | None = None
        self._reuse_ok: bool | None = None  # checked once against a plain prefill (_check_reuse)
        self._decode_ok: bool | None = None  # the decode loop, checked once against generate()
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
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._keep_budget = max(KEEP_MIN, int(KEEP_SHARE * weights))  # see KEEP_SHARE
        self.row_kernel: dict | None = None  # set below where rowkernel runs the decode steps
        self._row_kernel_note: str | None = None  # or why it does not
        model_fp = fingerprint(path)  # the packed-weights cache and the path checks' cache key
        self.row_attention = False  # decode attention through rowkernel (set below)
        self._decoder_note: str | None = "off"  # None: decode steps in one rowkernel call
        if self.device == "cpu":
            self.threads = pick_threads(threads)
            if self.threads != torch.get_num_threads():
                torch.set_num_threads(self.threads)
            if self.dtype == torch.float32:
                from cai.backends import rowkernel

                route_small_linears(self.model)
                # decode steps from the weights' own Q4_1/Q8_0/bf16 form (rowkernel.py)
                self.row_kernel, self._row_kernel_note = rowkernel.install(self.model, model_fp)
                self.row_attention = rowkernel.install_attention(self.model)
        self.tok.padding_side = "left"
        self.tok.truncation_side = "left"  # keep the end of long conversations
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self._torch = torch
        self._check_key = self._checks_key(model_fp)
        if self.row_kernel:  # whole decode steps in one call (Llama-style models)
            from cai.backends import rowkernel

            self._decoder_note = rowkernel.install_decoder(
                self.model, checked=lambda run: self._checked("decoder", run)
            )
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
        return {
            "backend": self.name,
            "model": self.model_id,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
            "decode_kernel": self._kernel_name(),
        }

    @property
    def row_decoder(self) -> bool:
        """Whether whole decode steps run as one rowkernel call (rowkernel.install_decoder)."""
        return self._decoder_note is None

    def _kernel_name(self) -> str:
        """Which kernel multiplies a decode step's rows by the weights (for provenance)."""
        if self.device != "cpu":
            return "torch"
        also = "; decode attention: cai rowkernel" if self.row_attention else ""
        also += "; decode steps: one rowkernel call" if self.row_decoder else ""
        if self.row_kernel:
            f = ", ".join(f"{k} x{v}" for k, v in sorted(self.row_kernel["formats"].items()))
            return f"cai rowkernel ({f} layers; fp32 arithmetic){also}"
        note = self._row_kernel_note
        return (f"torch (cai rowkernel: {note})" if note else "torch") + also

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

    def _batches(self, ids: list[list[int]], skip: list[int] | None = None):
        """Yield (indices, encoding) for length-sorted batches of at most batch_size. ``skip``:
        leading tokens of each prompt whose KV comes from elsewhere (kept from the last call); the
        encoding holds the rest, and batches are sorted by that rest's length."""
        skip = skip or [0] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]) - skip[i])
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = self._pad([ids[i][skip[i] :] for i in idx])
            self.stats["prompt_tokens"] += sum(len(ids[i]) for i in idx)
            self.stats["computed_tokens"] += enc["input_ids"].numel()
            yield idx, enc

    # -- the two operations --------------------------------------------------------------

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        torch = self._torch
        ids = self._encode([self.render(c) for c in conversations])
        out: list[Generation | None] = [None] * len(ids)
        sample = bool(temperature and temperature > 0)
        # This call's sequences serve the next call only; the previous call's are dropped after it.
        kept, self._kept = self._kept, (_Kept(self._keep_budget) if self.share_prefix else None)
        reuse = kept.match(ids) if kept and self._reuse_ok is not False else [(0, -1)] * len(ids)
        if kept:
            kept.release_unused({k for _, k in reuse})
        batches = list(self._batches(ids=ids, skip=[n for n, _ in reuse]))
        for b, (idx, enc) in enumerate(batches):
            if sample:
                # Seeded per (seed, batch): identical reruns with the same batch size reproduce.
                torch.manual_seed((seed or 0) * 1_000_003 + b)
            if self._decode_ok is None:
                self._decode_ok = self._checked("decode", lambda: self._check_decode_path(enc))
            past = None
            if any(reuse[i][0] for i in idx):
                if self._reuse_ok is None:
                    self._reuse_ok = self._checked("reuse", lambda: self._check_reuse(ids, reuse, kept, idx))
                if self._reuse_ok:
                    past = kept.state([reuse[i] for i in idx], self.model.config, self.device)
                if kept:  # what no later batch continues is not needed any more
                    kept.release_unused({reuse[i][1] for later, _ in batches[b + 1 :] for i in later})
                if past is None:  # no reuse after all: prefill these prompts in full
                    enc = self._pad([ids[i] for i in idx])
                    self.stats["computed_tokens"] += enc["input_ids"].numel()
                else:
                    self.stats["prefix_tokens_reused"] += sum(reuse[i][0] for i in idx)
            t0 = time.perf_counter()
            with torch.inference_mode():
                if self._decode_ok:
                    keep = (self._kept, [ids[i] for i in idx]) if self._kept is not None else None
                    rows = self._decode(enc, max_new_tokens, temperature if sample else 0.0, past, keep)
                else:
                    rows = self._hf_generate(enc, max_new_tokens, temperature if sample else 0.0)
            self.stats["generate_s"] += time.perf_counter() - t0
            for j, i in enumerate(idx):
                toks = rows[j]
                self.stats["generated_tokens"] += len(toks)
                out[i] = Generation(self.tok.decode(toks, skip_special_tokens=True).strip(), len(toks))
        return out

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

    def _checks_key(self, fp: str | None) -> str | None:
        """What the one-time path checks' verdicts depend on: the model's weights, cai's backend
        code, torch, transformers and the settings that pick kernels. None (check in every
        process) for models without a local folder, or with CAI_CHECK_CACHE=0."""
        import hashlib
        from pathlib import Path

        import transformers

        from cai import __version__
        from cai.backends import rowkernel

        if not fp or os.environ.get("CAI_CHECK_CACHE", "1") == "0":
            return None
        h = hashlib.sha256()
        for f in (__file__, rowkernel.__file__, rowkernel.SOURCE):
            h.update(Path(f).read_bytes())
        torch = self._torch
        h.update(
            json.dumps(
                [fp, __version__, torch.__version__, transformers.__version__, self.device, str(self.dtype)]
                + [torch.get_num_threads(), self._kernel_name(), self.share_prefix]
            ).encode()
        )
        return h.hexdigest()[:32]

    def _checked(self, name: str, run) -> bool:
        """A one-time path check's verdict: remembered in $CAI_CACHE/checks.json for this model,
        code and settings (see _checks_key), so each process does not pay for it again."""
        from cai.models import cache_dir
        from cai.records import write_json

        if not self._check_key:
            return bool(run())
        path = cache_dir() / "checks.json"
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = None
        known = known if isinstance(known, dict) else {}
        seen = known.get(self._check_key)
        seen = seen if isinstance(seen, dict) else {}
        if isinstance(seen.get(name), bool):
            return seen[name]
        ok = bool(run())
        known[self._check_key] = {**seen, name: ok}
        try:
            write_json(path, known)  # atomic: readers never see half a file
        except OSError:
            pass  # a read-only cache only costs the check again next time
        return ok

    def _routed(self) -> bool:
        """Whether decode steps run through a kernel whose cost falls with the rows it gets
        (rowkernel, or route_small_linears' with one CPU thread), so finished rows should leave."""
        if self.row_kernel:
            return True
        return self.device == "cpu" and self.dtype == self._torch.float32 and small_rows_routed()

    def _check_reuse(self, ids, reuse, kept, idx) -> bool:
        """Once per backend: continuing a kept KV cache must give the next-token log-probs of a
        plain prefill of the same tokens (the batch's prompt with the shortest reused part, cut 8
        tokens past it: the check costs one short prefill)."""
        torch = self._torch
        i = min((i for i in idx if reuse[i][0]), key=lambda i: reuse[i][0])
        n = reuse[i][0]
        seq = ids[i][: n + 8]
        try:
            with torch.inference_mode():
                full = self.model(**self._pad([seq]), logits_to_keep=1).logits[:, -1].float()
                cache, past_mask, past_lens = kept.state([reuse[i]], self.model.config, self.device)
                new = torch.ones((1, len(seq) - n), dtype=past_mask.dtype, device=self.device)
                res, _ = self._forward(
                    torch.tensor([seq[n:]], device=self.device),
                    torch.cat([past_mask, new], 1),
                    past_lens[:, None] + new.cumsum(1) - 1,
                    cache,
                )
        except Exception as e:  # noqa: BLE001 - any failure means: prefill in full
            _warn(f"reusing the KV cache across calls failed on this model ({type(e).__name__}: {e})")
            return False
        a, b = torch.log_softmax(full, -1), torch.log_softmax(res.logits[:, -1].float(), -1)
        diff = float((a - b).abs().max())
        tol = 1e-3 if self.dtype == torch.float32 else 0.1
        if diff > tol:
            _warn(
                f"reusing the KV cache across calls differs from a plain prefill by {diff:.3g}; not reusing"
            )
            return False
        return True

    def _stop_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return {i for i in ids | {self.tok.eos_token_id} if i is not None}

    def _hf_generate(self, enc, max_new_tokens, temperature):
        """transformers' generate(): the reference the decode loop is checked against, and the
        fallback for models whose generation config asks for more than greedy/plain sampling."""
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

    def _decode(self, enc, max_new_tokens, temperature, past=None, keep=None):
        """Greedy (or plain-temperature) decoding with the KV cache, the same tokens as
        transformers' generate() but cheaper per step on a CPU:

        - one host sync per step (the new tokens come back as one small list),
        - with greedy decoding, finished rows leave the batch (their KV rows are dropped), so
          later steps neither compute them nor read their cache: once a quarter of it has
          finished where rowkernel runs (its cost steps down with the rows: 16, 12, 8, 4, 2, 1)
          or route_small_linears' kernel (one CPU thread: its cost is flat from 7 to 16 rows).
          Not at every finished row: each drop copies the whole cache, and a copy per row
          fragments memory (peak RSS of 16 prompts: 1.44 GB against 1.22 GB, same time).
          Elsewhere only once at most a quarter is still going, or at once in a batch under 16
          rows: torch's plain fp32 CPU matmul costs ~1.7x more for 15 rows than for 16, so
          dropping one row of 16 would slow every later step. With sampling the batch keeps its
          shape so the random stream matches generate()'s,
        - the KV cache is written in place into buffers sized for the whole generation (one
          arena on 2 MB pages, hugepages.py), instead of being copied into a one-token-longer
          tensor at every step in every layer,
        - no logits processors, stopping criteria or per-step output objects to build.

        ``past``: (cache, mask, lengths) of tokens that come before ``enc``'s (a kept prefix);
        ``keep``: (a _Kept, each row's prompt ids): every row's finished sequence and its KV
        cache are handed to it for the next call.
        Returns each row's new token ids up to and including its stop token.
        """
        torch = self._torch
        ids, mask = enc["input_ids"], enc["attention_mask"]
        n_rows = ids.shape[0]
        pad = self.tok.pad_token_id
        stop = self._stop_ids() | {pad}  # a pad token ends a row's text, as it always has here
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        lens = mask.sum(1, keepdim=True)  # next position of each row
        cache = None
        if past is not None:
            cache, past_mask, past_lens = past
            pos, lens = pos + past_lens[:, None], lens + past_lens[:, None]
            mask = torch.cat([past_mask, mask], dim=1)
        # the prompt's keys and values go straight into buffers with room for the whole generation
        room = ids.shape[1] + max_new_tokens
        if cache is None:
            cache = _cache_with_room(self.model.config, room)
        else:
            _preallocate(cache, room)
        res, cache = self._forward(ids, mask, pos, cache)
        _preallocate(cache, max_new_tokens)  # where the forward made its own cache
        store, prompts = keep if keep is not None else (None, None)
        if store is not None and not store.can_keep(cache):
            store = None
        live = list(range(n_rows))  # batch row -> output row
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        done = [False] * n_rows
        one = torch.ones((n_rows, 1), dtype=mask.dtype, device=mask.device)
        for step in range(max_new_tokens):
            logits = res.logits[:, -1, :]
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            toks = nxt.tolist()  # the step's one host sync
            last = step == max_new_tokens - 1
            for j, t in enumerate(toks):
                r = live[j]
                if done[r]:
                    continue
                rows[r].append(t)
                if t in stop:
                    done[r] = True
                if store is not None and (done[r] or last):
                    # the cache holds the prompt and every new token but this step's
                    store.add(prompts[r] + rows[r][:-1], cache, j, mask[j])
            if all(done) or last:
                break
            going = [j for j, r in enumerate(live) if not done[r]]
            finished = len(live) - len(going)
            if (
                temperature <= 0
                and finished
                and (
                    4 * finished >= len(live)
                    if self._routed()
                    else (len(live) < 16 or 4 * len(going) <= len(live))
                )
            ):
                sel = torch.tensor(going, device=ids.device)
                cache.batch_select_indices(sel)
                mask, lens = mask[sel], lens[sel]
                live, toks = [live[j] for j in going], [toks[j] for j in going]
            # finished rows still in the batch read pad, as in generate()
            nxt = torch.tensor([pad if done[r] else t for r, t in zip(live, toks)], device=ids.device)
            mask = torch.cat([mask, one[: len(live)]], dim=1)
            res = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=lens,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            cache = getattr(res, "cache", None) or res.past_key_values
            lens = lens + 1
        return rows

    def _check_decode_path(self, enc) -> bool:
        """Once per backend: the decode loop must pick the same greedy tokens as generate() on a
        few steps of the first batch, and the model's generation config must ask for nothing the
        loop does not do (repetition penalties, banned words, minimum lengths, ...)."""
        g = self.model.generation_config
        plain = {
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0,
            "bad_words_ids": None,
            "min_length": 0,
            "min_new_tokens": None,
            "forced_bos_token_id": None,
            "forced_eos_token_id": None,
            "suppress_tokens": None,
            "begin_suppress_tokens": None,
            "sequence_bias": None,
            "exponential_decay_length_penalty": None,
            "renormalize_logits": False,
            "num_beams": 1,
            "penalty_alpha": None,
            "guidance_scale": None,
        }
        extra = [k for k, v in plain.items() if getattr(g, k, None) not in (None, v)]
        if extra:
            _warn(f"the model's generation config sets {', '.join(extra)}; using transformers' generate()")
            return False
        # the batch's shortest and longest prompt (so left padding is exercised), three tokens each
        pick = sorted({0, len(enc["input_ids"]) - 1})
        sub = {k: v[pick] for k, v in enc.items()}
        try:
            with self._torch.inference_mode():
                a = self._decode(sub, 3, 0.0)
                b = self._hf_generate(sub, 3, 0.0)
        except Exception as e:  # noqa: BLE001 - any failure means: use generate()
            _warn(
                f"fast decoding unavailable for this model ({type(e).__name__}: {e}); using transformers' "
                "generate()"
            )
            return False
        if a != b:
            _warn("fast decoding disagrees with transformers' generate() on this model; using generate()")
            return False
        return True

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
        self._kept = None  # sequences are kept for the next call only if it is a generate()
        opt = self.option_token_ids(options)
        ids = self._encode([self.render(p) for p in prompts])
        if self.share_prefix and len(ids) > 1:
            if self._prefix_ok is None:
                self._prefix_ok = self._checked("prefix", lambda: self._check_prefix_path(ids, opt))
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


def _preallocate(cache, extra: int):
    """Give each layer of a transformers DynamicCache room for ``extra`` more tokens, so a decode
    step writes its keys/values in place (DynamicLayer.update concatenates: a copy of the whole
    cache per layer per step). Caches of other kinds are left as they are."""
    from transformers.cache_utils import DynamicLayer

    layers = [
        x
        for x in getattr(cache, "layers", None) or []
        if type(x) is DynamicLayer and getattr(x, "is_initialized", False) and x.keys.dim() == 4
    ]
    arena = _Arena(2 * len(layers))
    for layer in layers:
        n = layer.keys.shape[-2]
        for name in ("keys", "values"):
            t = getattr(layer, name)
            buf = arena.take(t.shape[:-2] + (n + extra, t.shape[-1]), t)
            buf[..., :n, :] = t
            setattr(layer, "_" + name, buf)
            del layer.__dict__[name]  # from here on a view the class makes (BufferedLayer.keys)
        layer._n = n
        layer.__class__ = _buffered_layer_class()


def _cache_with_room(config, room: int):
    """An empty DynamicCache for this model whose layers put their first keys and values (the
    prompt's) into buffers with room for ``room`` positions, so nothing is copied after the
    prefill. None where the model's cache has layers of other kinds (sliding windows, ...)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    if not cache.layers or not all(type(x) is DynamicLayer for x in cache.layers):
        return None
    arena, cls = _Arena(2 * len(cache.layers)), _buffered_layer_class()
    cache.layers = [cls.empty(arena, room) for _ in cache.layers]
    return cache


class _Arena:
    """Buffers for one cache's layers from one mapping on 2 MB pages (hugepages.py: a decode step
    reads them all): the first request sizes it for ``count`` buffers like itself; a request
    that does not fit what is left, or is not on the CPU, gets memory of its own."""

    def __init__(self, count: int):
        self.count, self.left = count, None

    def take(self, shape, like):
        from cai.backends import hugepages

        n = math.prod(shape)
        if like.device.type != "cpu":
            return like.new_empty(shape)
        if self.left is None:
            self.left = hugepages.torch_empty((n * self.count,), like.dtype)
        if self.left.dtype != like.dtype or self.left.numel() < n:
            return hugepages.torch_empty(shape, like.dtype)
        buf, self.left = self.left[:n].view(shape), self.left[n:]
        return buf


def _buffered_layer():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are the first ``_n`` positions of buffers with spare
        room at the end (``_keys``/``_values`` [rows, heads, capacity, dim]): writing position n
        in place and setting ``_n`` is a whole cache update (rowkernel's one-call step does just
        that, without making 60 tensor views a step). Setting ``keys``/``values`` to anything but
        the views they already are (crop, reorder, offload, ...) makes it a plain DynamicLayer
        holding what was set."""

        @classmethod
        def empty(cls, arena: _Arena, room: int):
            """A layer whose first update puts its keys and values in buffers of ``room``
            positions from ``arena``."""
            layer = cls.__new__(cls)
            layer.__dict__.update(is_initialized=False, _arena=arena, _room=room)
            return layer

        @property
        def keys(self):
            return self._keys.narrow(-2, 0, self._n)

        @keys.setter
        def keys(self, t):
            self._set("keys", t)

        @property
        def values(self):
            return self._values.narrow(-2, 0, self._n)

        @values.setter
        def values(self, t):
            self._set("values", t)

        def _set(self, name, t):
            buf = self.__dict__.get("_" + name)
            if (
                buf is not None
                and isinstance(t, type(buf))
                and t.data_ptr() == buf.data_ptr()
                and t.shape == buf.shape[:-2] + (self._n, buf.shape[-1])
                and t.stride() == buf.stride()
            ):
                return  # the view it already is
            self._plain()
            setattr(self, name, t)

        def _plain(self):
            """Become a DynamicLayer holding the current views (None before the first update)."""
            d = self.__dict__
            d["keys"], d["values"] = (self.keys, self.values) if "_keys" in d else (None, None)
            d.pop("_arena", None)
            self.__class__ = DynamicLayer

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:  # the first: buffers with room for the whole generation
                for name, x in (("_keys", key_states), ("_values", value_states)):
                    shape = x.shape[:-2] + (max(self._room, x.shape[-2]), x.shape[-1])
                    setattr(self, name, self._arena.take(shape, x))
                self.__dict__.update(_n=0, is_initialized=True, device=key_states.device)
                del self._arena
            n, t = self._n, key_states.shape[-2]
            if n + t > self._keys.shape[-2]:  # out of room: back to plain concatenation
                self._plain()  # (zero-argument super() would fail after this)
                return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)
            self._keys[..., n : n + t, :] = key_states
            self._values[..., n : n + t, :] = value_states
            self._n = n + t
            return self.keys, self.values

        def batch_select_indices(self, indices):
            # in place: the kept rows move to the front of the same buffers (no new allocation,
            # the buffers stay on their pages); indexing copies them out first
            m = len(indices)
            for name in ("_keys", "_values"):
                buf = getattr(self, name)
                buf[:m] = buf[indices]
                setattr(self, name, buf[:m])

    return BufferedLayer


_BUFFERED_LAYER = None


def _buffered_layer_class():
    global _BUFFERED_LAYER
    if _BUFFERED_LAYER is None:
        _BUFFERED_LAYER = _buffered_layer()
    return _BUFFERED_LAYER


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


# The most KV cache a backend keeps from one generate() call for the next: a quarter of the
# model's own weights, at least 64 MiB (the embedded model: 134 MB, ~2,900 tokens at ~46 KB per
# token in fp32); rows past it are simply not kept. Measured on 16 prompts: peak RSS +0.13 GB.
KEEP_SHARE, KEEP_MIN = 0.25, 64 * 2**20


class _Kept:
    """Finished sequences of one generate() call with their KV cache, each row's valid positions
    only, so that the next call's prompts that start with one of them skip that part of the
    prefill. Matching is by token ids: a prompt reuses the longest kept prefix it starts with,
    when that is at least MIN_SHARED_TOKENS long."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.seqs: list[list[int]] = []
        self.kv: list = []  # per sequence: [layer, keys/values, heads, n, dim]
        self.by_head: dict[tuple, list[int]] = {}

    def __bool__(self):
        return bool(self.seqs)

    @staticmethod
    def can_keep(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        return bool(layers) and all(isinstance(x, DynamicLayer) and x.keys.dim() == 4 for x in layers)

    def add(self, seq: list[int], cache, row: int, mask):
        if len(seq) < MIN_SHARED_TOKENS:
            return
        size = sum(2 * x.keys[row].numel() * x.keys.element_size() for x in cache.layers)
        size = size * len(seq) // max(1, cache.layers[0].keys.shape[-2])
        if self.used + size > self.budget:
            return
        import torch

        where = mask.nonzero().squeeze(1)
        if len(where) != len(seq):  # not this row's tokens after all: keep nothing
            return
        # one tensor per sequence, [layer, keys/values, heads, tokens, dim]: a single allocation
        # that goes back to the system when freed (thousands of small ones fragment the heap)
        k0 = cache.layers[0].keys
        kv = k0.new_empty((len(cache.layers), 2, k0.shape[1], len(seq), k0.shape[-1]))
        for i, x in enumerate(cache.layers):
            torch.index_select(x.keys[row], 1, where, out=kv[i, 0])
            torch.index_select(x.values[row], 1, where, out=kv[i, 1])
        self.used += size
        self.by_head.setdefault(tuple(seq[:MIN_SHARED_TOKENS]), []).append(len(self.seqs))
        self.seqs.append(seq)
        self.kv.append(kv)

    def release_unused(self, used: set[int]):
        """Free the KV of every kept sequence not in ``used`` (it stays matchable no more)."""
        for k, kv in enumerate(self.kv):
            if kv is not None and k not in used:
                self.kv[k] = None
                self.seqs[k] = []

    def match(self, prompts: list[list[int]]) -> list[tuple[int, int]]:
        """(tokens reused, kept sequence) per prompt; (0, -1) where none is long enough. At least
        the prompt's last token is left to compute (its logits start the generation)."""
        out = []
        for p in prompts:
            best = (0, -1)
            for k in self.by_head.get(tuple(p[:MIN_SHARED_TOKENS]), []):
                s, n, m = self.seqs[k], MIN_SHARED_TOKENS, min(len(p) - 1, len(self.seqs[k]))
                while n < m and s[n] == p[n]:
                    n += 1
                if n > best[0] and n >= MIN_SHARED_TOKENS:
                    best = (n, k)
            out.append(best)
        return out

    def state(self, rows: list[tuple[int, int]], config, device):
        """(cache, mask, lengths) for a batch whose row b continues rows[b] = (n, k): the first n
        tokens of kept sequence k, right-aligned (left padding, hidden by the mask)."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        width = max(n for n, _ in rows)
        cache = DynamicCache(config=config)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for b, (n, _) in enumerate(rows):
            mask[b, width - n :] = 1
        some = next(k for n, k in rows if k >= 0)
        for i, (k0, _) in enumerate(self.kv[some]):
            keys = k0.new_zeros((len(rows), k0.shape[0], width, k0.shape[-1]))
            values = torch.zeros_like(keys)
            for b, (n, k) in enumerate(rows):
                if n:
                    keys[b, :, width - n :] = self.kv[k][i][0][:, :n]
                    values[b, :, width - n :] = self.kv[k][i][1][:, :n]
            cache.update(keys, values, i)
        if not all(type(x) is DynamicLayer for x in cache.layers):
            return None
        return cache, mask, mask.sum(1)


# Rows for which route_small_linears computes a linear layer as (W @ x.T).T: measured per
# decode step of the embedded model on this project's CPU build of torch (MKL, fp32, 1 thread;
# bench/RESULTS-roofline.md). x @ W.T costs 100-158 ms for 7-15 rows (the cost grows with every
# row under 16) and 101 ms for 16; W @ x.T costs ~90 ms flat across 7-16 rows, more above 16
# and below 7.
SMALL_ROWS = (7, 16)


def small_rows_routed() -> bool:
    """Whether route_small_linears' (W @ x.T).T runs now: with one torch thread, where it was
    calibrated (SMALL_ROWS); the decode loop's drop policy reads the same predicate."""
    import torch

    return torch.get_num_threads() == 1


def route_small_linears(model):
    """Make the model's nn.Linear layers compute 7-16-row inputs (a decode step of a batch) as
    (W @ x.T).T instead of x @ W.T when torch runs one thread: the same products and sums,
    through the matrix kernel that streams the weight matrix fastest for so few rows on one
    core. With two threads it measured slower than x @ W.T (bench/RESULTS-roofline.md, 16 rows:
    28 vs 34 GFLOP per CPU-s), so there, as for larger inputs (prefill, the judge) and other
    layer types, nothing changes. The decode loop is still checked against
    generate() once per backend (_check_decode_path)."""
    import torch
    import torch.nn.functional as F

    lo, hi = SMALL_ROWS

    def forward(self, x):
        n = x.numel() // x.shape[-1] if x.dim() else 0
        if not lo <= n <= hi or x.dim() < 2 or not small_rows_routed():
            return F.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(n, x.shape[-1]).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], self.weight.shape[0])

    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.forward = forward.__get__(m)


def pick_threads(threads: int | None = None) -> int:
    """torch threads for CPU inference: ``threads``, else $CAI_THREADS, else as many as the cores
    other processes leave free (at least 1, at most torch's default). Batch-16 decoding is a
    chain of small matmuls, each split across the threads and joined after; when another process
    holds one of the cores, every join waits for the descheduled thread, and two threads run
    several times slower than one (bench/RESULTS-roofline.md). On an idle machine this is torch's
    default. "Free" is measured now (``busy_cores``), not read from the load average: the
    1-minute average still counts work that has just finished (the install before `make demo`,
    this process's own start), which would halve the threads on an idle machine."""
    import torch

    if threads is None and os.environ.get("CAI_THREADS", "").strip():
        threads = int(os.environ["CAI_THREADS"])
    default = torch.get_num_threads()
    if threads:
        return max(1, int(threads))
    busy = busy_cores()
    if busy is None:
        return default
    free = (os.cpu_count() or 1) - busy
    return max(1, min(default, int(free + 0.5)))


def busy_cores(window: float = 0.3) -> float | None:
    """Cores kept busy by other processes over the next ``window`` seconds (this one sleeps
    meanwhile), from /proc/stat; None where that is not available."""
    import time

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / (t1 - t0))


def _warn(msg: str):
    print(f"cai: {msg}", file=sys.stderr)
