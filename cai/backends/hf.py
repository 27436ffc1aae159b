"""Local transformers backend: real tensor batching, the GPU path, and the exact reference.

On a GPU this is the default engine (``--backend auto``); on a CPU it runs models that are not
GGUF files, and the tests use it as the reference the llama.cpp engine is measured against.

Generation: prompts are sorted by token length so a batch wastes little on padding,
left-padded (decoder-only models continue from the right), and decoded together by
transformers' own ``generate()`` with the KV cache.

Option log-probs (the judge) run as a prefix tree of the prompts' token ids, so each shared
span goes through the model once: see hf_tree.py.
"""

from __future__ import annotations

import inspect
import time

from cai.backends import hf_tree
from cai.backends.base import Generation, Option
from cai.errors import InputError
from cai.records import to_transcript


class HFBackend:
    name = "hf"
    supports_logprobs = True
    shared = ("batch_size", "device", "trust_remote_code", "threads")
    options = (
        Option(
            "max_input_tokens", int, "Longest prompt in tokens; longer ones are cut from the left.", min=1
        ),
        Option(
            "share_prefix", bool, "Score the judge's prompts as a prefix tree (shared spans computed once)."
        ),
    )

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
        # hf_tree.check_prefix_path); an architecture where it disagrees falls back to plain batches.
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
                self._prefix_ok = hf_tree.check_prefix_path(self, ids, opt)
            if self._prefix_ok:
                self.stats["prompt_tokens"] += sum(len(r) for r in ids)
                return hf_tree.tree_logprobs(self, ids, opt)
        return hf_tree.flat_logprobs(self, ids, opt)

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
