"""The backend interface: two methods and a few attributes.

A *conversation* is a list of chat messages ``{"role", "content"}``. When its last message is
from the assistant, that message is a prefix the model continues (e.g. ``The answer is: (``)
instead of starting a new turn.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Generation:
    text: str
    n_tokens: int  # generated tokens (for tokens/s)


class Backend(Protocol):
    name: str  # "hf", "langchain"
    model_id: str  # what gets recorded in meta.model
    supports_logprobs: bool  # False -> the judge falls back to generated verdicts

    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """One completion per conversation, in input order. temperature 0 = greedy."""
        ...

    def option_logprobs(self, prompts: list[list[dict]], options: list[str]) -> list[list[float]]:
        """Log-probability of each option's first token as the next token after each prompt.

        Not normalised over the options (the judge does that). Options should be single tokens
        such as "A"/"B".
        """
        ...

    def describe(self) -> dict:
        """Provenance for meta: backend, model, device, dtype, ..."""
        ...


def warn_truncation(backend, before: int) -> int:
    """Warn once (to stderr) when the backend first cuts an over-long prompt; returns the count."""
    n = getattr(backend, "stats", {}).get("truncated_prompts", 0)
    if n and not before:
        print(
            "cai: warning: a prompt is longer than the model's input window; it is cut to its last tokens "
            "(counted in the summary)",
            file=sys.stderr,
            flush=True,
        )
    return n


def note_retries(backend) -> None:
    """One line (stderr) when requests had to be retried: a replica died, stalled or answered 5xx
    (the rows are still written once per id; the count says how rough the run was)."""
    n = getattr(backend, "stats", {}).get("retries", 0)
    if n:
        where = getattr(backend, "base_url", None) or getattr(backend, "provider", "the server")
        print(
            f"cai: {n} request(s) to {where} were retried after a connection error, timeout or 5xx",
            file=sys.stderr,
            flush=True,
        )
