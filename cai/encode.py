"""How a pair becomes tokens for a reward model, for training and scoring alike.

`render_pair_texts` lays a conversation out (the tokenizer's chat template, or the plain
"Human:/Assistant:" transcript); `PairEncoder` tokenises both sides and truncates them the same
way in training and in `cai score` (the end of the conversation and the start of the response
are kept); `pad_batch` right-pads a batch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from cai.errors import InputError
from cai.records import response_text, to_transcript


def render_pair_texts(tokenizer, row: dict) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text); a sequence is prompt_text + response_text.

    With a chat template the conversation is rendered by it; otherwise as the plain
    "\\n\\nHuman: …\\n\\nAssistant: …" transcript. Training and scoring both come through here,
    so a reward model always sees text laid out the way it was trained on.
    """
    prompt = row["prompt"]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = [
            tokenizer.apply_chat_template(prompt + row[k], tokenize=False) for k in ("chosen", "rejected")
        ]
        # Usually `head` is a prefix of both; templates that rewrite earlier turns (e.g. strip
        # reasoning) are split at the common prefix instead, so prompt + response == full text.
        k = min(len(os.path.commonprefix([head, f])) for f in full)
        return full[0][:k], full[0][k:], full[1][k:]
    head = to_transcript(prompt) + "\n\nAssistant:"
    return head, " " + row["chosen"][-1]["content"], " " + row["rejected"][-1]["content"]


class PairEncoder:
    """Renders a pair and turns it into two token-id lists of at most `max_length`.

    Truncation keeps the end of the conversation and the whole response where it fits: the
    conversation is cut from the left; the response keeps its beginning and is cut only when it
    would leave the conversation less than a quarter of the window (so the model still sees the
    question). `truncated` counts rows where either side was cut.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length
        self.truncated = 0
        if getattr(tokenizer, "chat_template", None):
            self.prefix, self.suffix = [], []  # the template already writes BOS/EOS and turn markers
        else:
            # The tokenizer's own special tokens ([CLS] … [SEP], <s> …), found around a probe,
            # because transformers 5 tokenizers no longer expose build_inputs_with_special_tokens.
            probe = tokenizer("a", add_special_tokens=False)["input_ids"]
            full = tokenizer("a", add_special_tokens=True)["input_ids"]
            i = next((i for i in range(len(full)) if full[i : i + len(probe)] == probe), None)
            self.prefix, self.suffix = ([], []) if i is None else (full[:i], full[i + len(probe) :])
        self.budget = max_length - len(self.prefix) - len(self.suffix)
        if self.budget < 8:
            raise InputError(f"--max-length {max_length} leaves no room for text; use at least 16")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _fit(self, p: list[int], r: list[int]) -> tuple[list[int], bool]:
        if len(p) + len(r) <= self.budget:
            return self.prefix + p + r + self.suffix, False
        keep_r = min(len(r), self.budget - min(len(p), self.budget // 4))
        keep_p = self.budget - keep_r
        return self.prefix + (p[-keep_p:] if keep_p else []) + r[:keep_r] + self.suffix, True

    def __call__(self, row: dict) -> tuple[list[int], list[int]]:
        head, ch, rj = render_pair_texts(self.tok, row)
        p = self._ids(head)
        c, cut_c = self._fit(p, self._ids(ch))
        r, cut_r = self._fit(p, self._ids(rj))
        self.truncated += cut_c or cut_r
        return c, r


def pad_batch(seqs: list[list[int]], pad_id: int, multiple_of: int | None = None):
    """Right-pad to the longest sequence in the batch (dynamic padding): (input_ids, attention_mask)."""
    n = max(len(s) for s in seqs)
    if multiple_of:
        n = math.ceil(n / multiple_of) * multiple_of
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def tokenize_pairs(rows: list[dict], enc: PairEncoder) -> list[dict]:
    items = []
    for r in rows:
        c, j = enc(r)
        items.append(
            {
                "chosen_ids": c,
                "rejected_ids": j,
                "p_chosen": float(r["label"]["p_chosen"]),
                "len_chosen": len(response_text(r["chosen"])),
                "len_rejected": len(response_text(r["rejected"])),
            }
        )
    return items


def default_max_length(base_path: str, model_config, tok) -> int:
    limits = [512, getattr(model_config, "max_position_embeddings", None), tok.model_max_length]
    sbert = Path(base_path) / "sentence_bert_config.json"
    if sbert.exists():
        limits.append(json.loads(sbert.read_text()).get("max_seq_length"))
    return min(int(x) for x in limits if x and x < 1_000_000)
