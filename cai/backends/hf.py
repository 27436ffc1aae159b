"""Local transformers backend: real tensor batching, GPU when present, CPU fp32 otherwise.

Batching is where the speed is on both CPU and GPU: prompts are sorted by token length so a
batch wastes little on padding, left-padded (decoder-only models continue from the right), and
decoded together with the KV cache.
"""

from __future__ import annotations

import sys

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
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cai.models import pick_device, pick_dtype, resolve_model

        path, self.model_id = resolve_model(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device)
        self.batch_size = max(1, int(batch_size))
        self.max_input_tokens = max_input_tokens
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "truncated_prompts": 0}
        try:
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
        self.tok.padding_side = "left"
        self.tok.truncation_side = "left"  # keep the end of long conversations
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self._torch = torch

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
        }

    def _batches(self, texts: list[str]):
        """Yield (indices, encoding) for length-sorted batches of at most batch_size."""
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            rows = []
            for i in idx:
                r = ids[i]
                if len(r) > self.max_input_tokens:
                    r = r[-self.max_input_tokens :]
                    self.stats["truncated_prompts"] += 1
                rows.append(r)
            enc = self.tok.pad({"input_ids": rows}, return_tensors="pt", padding=True)
            self.stats["prompt_tokens"] += sum(len(r) for r in rows)
            yield idx, {k: v.to(self.device) for k, v in enc.items()}

    # -- the two operations --------------------------------------------------------------

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        torch = self._torch
        texts = [self.render(c) for c in conversations]
        out: list[Generation | None] = [None] * len(texts)
        for b, (idx, enc) in enumerate(self._batches(texts)):
            kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id)
            if temperature and temperature > 0:
                # Seeded per (seed, batch): identical reruns with the same batch size reproduce.
                torch.manual_seed((seed or 0) * 1_000_003 + b)
                kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                seqs = self.model.generate(**enc, **kw)
            new = seqs[:, enc["input_ids"].shape[1] :]
            for j, i in enumerate(idx):
                toks = new[j]
                # count up to and including the first eos/pad: those are real decode steps
                stop = (toks == self.tok.eos_token_id) | (toks == self.tok.pad_token_id)
                n = int(stop.nonzero()[0, 0]) + 1 if stop.any() else len(toks)
                self.stats["generated_tokens"] += n
                out[i] = Generation(self.tok.decode(toks[:n], skip_special_tokens=True).strip(), n)
        return out

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
        torch = self._torch
        opt = torch.tensor(self.option_token_ids(options), device=self.device)
        texts = [self.render(p) for p in prompts]
        out: list[list[float] | None] = [None] * len(texts)
        for idx, enc in self._batches(texts):
            with torch.inference_mode():
                # logits_to_keep=1: only the last position's logits (saves a vocab-sized matmul per token)
                logits = self.model(**enc, logits_to_keep=1).logits[:, -1, :].float()
            lp = torch.log_softmax(logits, dim=-1)[:, opt]
            for j, i in enumerate(idx):
                out[i] = lp[j].tolist()
        return out


def _warn(msg: str):
    print(f"cai: {msg}", file=sys.stderr)
