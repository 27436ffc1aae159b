"""The backend interface: two methods and a few attributes, plus the options a backend takes.

A *conversation* is a list of chat messages ``{"role", "content"}``. When its last message is
from the assistant, that message is a prefix the model continues (e.g. ``The answer is: (``)
instead of starting a new turn.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, Protocol

from cai.errors import InputError


@dataclass
class Generation:
    text: str
    n_tokens: int  # generated tokens (for tokens/s)


@dataclass(frozen=True)
class Option:
    """One option of a backend's own (``-o name=value`` on the command line, a keyword argument
    from Python), declared by the backend and checked by ``parse`` before the backend loads."""

    name: str
    type: type = str  # str, int, float or bool
    help: str = ""
    choices: tuple = ()
    min: float | None = None

    def parse(self, value, backend: str):
        """The value as this option's type (text from ``-o`` is converted); InputError otherwise."""
        flag = f"-o {self.name}={value}" if isinstance(value, str) else f"{self.name}={value!r}"
        want = {bool: "true or false", int: "an integer", float: "a number", str: "text"}[self.type]
        try:
            v = _convert(value, self.type)
        except ValueError:
            raise InputError(f"{flag}: the {backend} backend's {self.name} takes {want}") from None
        if self.choices and v not in self.choices:
            raise InputError(f"{flag}: {self.name} is one of {', '.join(map(str, self.choices))}")
        if self.min is not None and v < self.min:
            raise InputError(f"{flag}: {self.name} must be >= {self.min}")
        return v


def _convert(value, tp):
    if isinstance(value, str) and tp is not str:
        text = value.strip().lower()
        if tp is bool:
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        return tp(text)
    if tp is bool and not isinstance(value, bool):
        raise ValueError(value)
    if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(value)
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if tp is str and not isinstance(value, str):
        raise ValueError(value)
    return tp(value)


class Backend(Protocol):
    """What a backend class provides. A package adds one by naming the class under the
    ``cai.backends`` entry-point group (see cai/backends/__init__.py)."""

    name: str  # "hf", "langchain"
    model_id: str  # what gets recorded in meta.model
    supports_logprobs: bool  # False -> the judge falls back to generated verdicts
    # Class attributes: which of the shared model options (batch_size, threads, device,
    # trust_remote_code, base_url) apply, and the backend's own options (-o key=value).
    shared: ClassVar[tuple[str, ...]]
    options: ClassVar[tuple[Option, ...]]

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
