"""LangChain backend: any LangChain chat model, or any OpenAI-compatible server (vLLM, TGI,
SGLang, llama.cpp, a fleet of them behind a load balancer) via ``base_url``, with
``concurrency`` requests in flight.

**A good client of a fleet.** At most ``concurrency`` requests are open at once, whatever
calls overlap (one semaphore for the backend). Left unset it is the server's slot count when
the server says how many it has (llama.cpp's ``GET /props`` ``total_slots``, times the
``X-Cai-Replicas`` header `cai serve`'s nginx adds), else ``batch_size``. Each request is
retried on connection errors, timeouts, 408/409/429 and 5xx (``max_retries`` times, backoff
0.5 s doubling up to 8 s, each wait shortened by up to a quarter at random so that requests a
dead replica dropped together do not come back together; a ``Retry-After`` is honoured).
Retrying is safe: a request is a pure function of its body, and rows are written by the stage
once per id. When the retries are spent the error names the URL (a 502/503/504 from a
proxy: no replica behind it answered) and the stage stops with the rows written so far kept.

Three things differ from the local ``hf`` backend, and each is a choice documented here:

* **Assistant prefixes.** A conversation whose last message is from the assistant is a prefix
  to continue. vLLM (and SGLang) continue it when asked with
  ``continue_final_message=True, add_generation_prompt=False``; servers that reject those fields
  get the prefix folded into the last user message ("Begin your reply with: …") instead, and the
  echoed prefix is cut from the reply. ``prefix="auto"`` settles this with one tiny request the
  first time a prefix is needed, plus one without the fields: a server that silently *ignores*
  them (llama-cpp-python's server does; it starts a fresh assistant turn) builds the same prompt
  both times, which the reported prompt token counts show, and gets ``fold`` too. A server
  that ignores them and reports no usage cannot be told apart; use ``prefix="fold"`` for it.
* **Option log-probs** come from the server's ``top_logprobs`` for the first generated token
  (``max_tokens=1, logprobs=True, top_logprobs=20``), not from the whole vocabulary. See
  ``option_logprobs`` for how an option missing from that list is scored.
* **No log-probs** (a provider or server that returns none): ``supports_logprobs`` becomes False
  after one probe request, and the judge uses generated verdicts instead.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from cai.backends.base import Generation, Option
from cai.errors import CaiError, InputError

PREFIX_MODES = ("auto", "continue", "fold")
_CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
MAX_RETRIES = 4  # 0.5 + 1 + 2 + 4 s of waiting (less the jitter) before a request is given up
BACKOFF, BACKOFF_MAX = 0.5, 8.0  # the first wait, and the cap of the doubling
REPLICAS_HEADER = "X-Cai-Replicas"  # set by `cai serve`'s nginx: replicas behind the URL


class LangChainBackend:
    name = "langchain"
    shared = ("batch_size", "base_url", "concurrency")
    options = (
        Option("api_key", str, "For --base-url; default $OPENAI_API_KEY (prefer it: -o is visible to ps)."),
        Option(
            "logprobs", bool, "Require option log-probs (true) or never ask (false); default: probe once."
        ),
        Option(
            "top_logprobs",
            int,
            "Alternatives the server lists per token (OpenAI's and vLLM's cap: 20).",
            min=1,
        ),
        Option("prefix", str, "How a trailing assistant message is sent.", PREFIX_MODES),
        Option("timeout", float, "Seconds before a request is given up (and retried).", min=0),
        Option(
            "cache_prompt",
            bool,
            "llama.cpp servers: false prefills every prompt afresh, so rows are the same on any fleet "
            "(slower; see docs/architecture.md, 'A fleet').",
        ),
        Option(
            "max_retries",
            int,
            f"Retries of a request on connection errors, timeouts, 408/409/429, 5xx (default {MAX_RETRIES}).",
            min=0,
        ),
    )

    def __init__(
        self,
        model: str | None,
        *,
        batch_size: int = 16,
        base_url: str | None = None,
        concurrency: int | None = None,
        max_retries: int | None = None,
        api_key: str | None = None,
        logprobs: bool | None = None,
        top_logprobs: int = 20,
        prefix: str = "auto",
        cache_prompt: bool | None = None,
        **kw,
    ):
        """
        model: ``provider:model`` for ``init_chat_model`` (e.g. ``openai:gpt-4o-mini``), or with
            ``base_url`` the name the server serves (None: the server's only model).
        batch_size: requests in flight when ``concurrency`` is unset and the server does not say
            how many slots it has (providers, vLLM, TGI).
        base_url: an OpenAI-compatible server, e.g. ``http://localhost:8000/v1``.
        concurrency: requests in flight at once (None: see the module docstring).
        max_retries: retries per request on connection errors, timeouts, 408/409/429 and 5xx
            (None: MAX_RETRIES; without ``base_url`` the provider's own client retries instead).
        api_key: for ``base_url``; default ``$OPENAI_API_KEY``, else ``"EMPTY"`` (what vLLM expects
            when started without ``--api-key``).
        logprobs: None = find out with one probe request when first needed; True = require them;
            False = never ask (the judge uses generated verdicts).
        top_logprobs: alternatives the server lists per token (OpenAI and vLLM's default cap: 20).
        prefix: how a trailing assistant message is sent: ``continue`` (vLLM's
            continue_final_message), ``fold`` (into the last user message) or ``auto``.
        cache_prompt: llama.cpp's per-request prompt cache (None: the server's default, on).
        kw: passed to the chat model (``timeout`` in seconds, provider options).
        """
        if prefix not in PREFIX_MODES:
            raise InputError(f"prefix mode {prefix!r} is not one of {', '.join(PREFIX_MODES)}")
        self.batch_size = max(1, int(batch_size))
        self.base_url = base_url.rstrip("/") if base_url else None
        self.max_retries = max(0, int(MAX_RETRIES if max_retries is None else max_retries))
        self.timeout = kw.get("timeout")
        self.top_logprobs = int(top_logprobs)
        self._logprobs = logprobs
        self.stats = {
            "requests": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "options_scored": 0,
            "options_floored": 0,
            "retries": 0,
        }
        self._lock = threading.Lock()  # stats are updated from every request's thread
        self.cache_prompt = cache_prompt
        if cache_prompt is not None:
            if not self.base_url:
                raise InputError("cache_prompt is a llama.cpp server's field: use it with --base-url")
            kw = dict(kw, extra_body={**(kw.get("extra_body") or {}), "cache_prompt": bool(cache_prompt)})
        if self.base_url:
            self._init_server(model, api_key, dict(kw, max_retries=0))  # retries are ours (_invoke)
        else:
            # a provider's own client retries (and knows its rate limits); ours would multiply them
            self._init_provider(
                model, api_key, kw if max_retries is None else dict(kw, max_retries=max_retries)
            )
            self.max_retries = 0
        self.slots = self._server_slots() if self.base_url and concurrency is None else None
        # as many requests as slots: every slot busy and none queued at the server, where a request
        # would lose llama.cpp's choice of the idle slot holding its prefix (its previous stage)
        self.concurrency = max(1, int(concurrency or self.slots or batch_size))
        self._in_flight = threading.BoundedSemaphore(self.concurrency)
        self._cancelled = threading.Event()  # cancel(): requests not yet sent fail at once
        self._settle = threading.Lock()  # one prefix probe and one log-prob probe, whoever asks first
        # Without base_url, only OpenAI's own API could honour vLLM's continue flags; fold elsewhere.
        if prefix == "auto" and not self._openai_compatible:
            prefix = "fold"
        self.prefix = prefix

    # -- construction ------------------------------------------------------------------------

    def _init_server(self, model, api_key, kw):
        import openai
        from langchain_openai import ChatOpenAI

        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        served = self._served_models(openai, api_key, kw)
        if model and model.startswith("openai:"):
            model = model[len("openai:") :]
        if not model:
            if len(served) != 1:
                raise InputError(
                    f"{self.base_url} serves {len(served)} models ({', '.join(served) or 'none listed'}); "
                    "pick one with --model"
                )
            model = served[0]
        elif served and model not in served:
            raise InputError(
                f"model {model!r} is not served by {self.base_url}; it serves: {', '.join(served)} — "
                "fix --model (vLLM: the name given to --served-model-name, else the model path)"
            )
        self.model_id = model  # the served name, not the URL: reruns on another replica still match
        self.provider = "openai-compatible"
        self.chat = ChatOpenAI(
            model=model,
            base_url=self.base_url,
            api_key=api_key,
            use_responses_api=False,  # chat completions is what every compatible server speaks
            **kw,
        )
        self._openai_compatible = True

    def _served_models(self, openai, api_key, kw) -> list[str]:
        """GET /models: fails fast when nothing listens, and names the models when --model is off.
        An empty list means the server does not list its models (then any name is sent as is)."""
        client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key,
            max_retries=min(self.max_retries, 2),
            timeout=kw.get("timeout") or 30,
        )
        try:
            return [m.id for m in client.models.list()]
        except openai.APIConnectionError:
            raise CaiError(self._unreachable()) from None
        except openai.AuthenticationError:
            raise CaiError(
                f"{self.base_url} rejected the API key: set OPENAI_API_KEY to the key the server was "
                "started with (vLLM: --api-key)"
            ) from None
        except openai.APIStatusError:
            return []  # no /models route (some proxies); the first request will tell
        finally:
            client.close()

    def _server_slots(self) -> int | None:
        """The slots the server decodes at once, when it says: llama.cpp's ``GET /props``
        (``total_slots``, of one replica), times the replicas named by ``X-Cai-Replicas`` (the
        header `cai serve`'s nginx adds). None for servers without it (vLLM, TGI)."""
        import urllib.error
        import urllib.request

        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        try:
            with urllib.request.urlopen(root + "/props", timeout=5) as r:
                props = json.loads(r.read())
                replicas = r.headers.get(REPLICAS_HEADER)
        except (OSError, ValueError, urllib.error.URLError):
            return None
        slots = props.get("total_slots") if isinstance(props, dict) else None
        if not isinstance(slots, int) or slots < 1:
            return None
        try:
            return slots * max(1, int(replicas or 1))
        except ValueError:
            return slots

    def _init_provider(self, model, api_key, kw):
        if not model:
            raise InputError(
                "the langchain backend needs --model provider:model (e.g. openai:gpt-4o-mini, "
                "anthropic:claude-sonnet-4-5), or --base-url for an OpenAI-compatible server"
            )
        from langchain.chat_models import init_chat_model

        if api_key:
            kw = dict(kw, api_key=api_key)
        try:
            self.chat = init_chat_model(model, **kw)
        except ImportError as e:
            raise InputError(
                f"model {model!r} needs a LangChain integration that is not installed: {e}"
            ) from None
        except ValueError as e:
            raise InputError(
                f"cannot make a chat model from {model!r}: {str(e).splitlines()[0]} — use provider:model, "
                "e.g. openai:gpt-4o-mini, or --base-url for an OpenAI-compatible server"
            ) from None
        except Exception as e:  # e.g. a missing API key, raised by the provider's constructor
            raise InputError(f"cannot set up {model!r}: {str(e).splitlines()[0]}") from None
        self.model_id = model
        self.provider = model.split(":", 1)[0] if ":" in model else type(self.chat).__name__
        fields = getattr(type(self.chat), "model_fields", {})
        self._openai_compatible = "extra_body" in fields and "logprobs" in fields

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": self.model_id,
            "provider": self.provider,
            "base_url": self.base_url,
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,  # requests in flight
            "server_slots": self.slots,  # what the server reported (None: not asked or not said)
            "max_retries": self.max_retries,
            "timeout": self.timeout,
            **({"cache_prompt": self.cache_prompt} if self.cache_prompt is not None else {}),
            "prefix": self.prefix,
            "logprobs": self._logprobs,  # None: not yet probed
            "top_logprobs": self.top_logprobs,
        }

    # -- requests ------------------------------------------------------------------------------

    def _call(self, messages: list[dict], **params):
        """One chat request (retried, see _invoke); provider errors become CaiError with the fix."""
        params = self._params(params)
        try:
            msg = self._invoke(messages, params)
        except Exception as e:
            if not _from_provider(e):
                raise  # a bug, not the server: keep the traceback
            raise CaiError(self._explain(e)) from e
        usage = getattr(msg, "usage_metadata", None) or {}
        self._count(requests=1, prompt_tokens=usage.get("input_tokens", 0))
        return msg

    def _invoke(self, messages: list[dict], params: dict):
        """``chat.invoke`` with at most ``concurrency`` requests open, retried with backoff and
        jitter on what a retry can fix (a dead or busy replica, a timeout); the last error is
        raised as it came."""
        for attempt in range(self.max_retries + 1):
            with self._in_flight:
                if self._cancelled.is_set():
                    raise CaiError(f"requests to {self.base_url or self.provider} were cancelled")
                try:
                    return self.chat.invoke(messages, **params)
                except Exception as e:
                    if attempt == self.max_retries or not _retryable(e):
                        e.cai_attempts = attempt + 1
                        raise
                    wait = _retry_after(e)
            if wait is None:
                wait = min(BACKOFF_MAX, BACKOFF * 2**attempt) * (1 - 0.25 * random.random())
            self._count(retries=1)
            self._cancelled.wait(wait)  # outside the semaphore: a waiting retry leaves its place to others
        raise AssertionError("unreachable")

    def cancel(self):
        """Stop sending: the stage failed or was interrupted, so what is still queued or waiting
        for a retry fails at once instead of keeping the process alive (requests already sent
        finish on their own)."""
        self._cancelled.set()

    def _params(self, params: dict) -> dict:
        if not self._openai_compatible:
            for k in ("seed", "logprobs", "top_logprobs", "extra_body"):
                params.pop(k, None)
            return params
        extra = {**(self.chat.extra_body or {}), **params.pop("extra_body", {})}
        if self.base_url and "max_tokens" in params:
            # langchain-openai sends max_completion_tokens; TGI ignores that field and reads only
            # the older max_tokens, so servers get both (vLLM and SGLang take either).
            extra["max_tokens"] = params["max_tokens"]
        if extra:
            params["extra_body"] = extra
        return params

    def _count(self, **deltas):
        with self._lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def _map(self, fn, items: list):
        """fn over items with ``concurrency`` in flight, results in input order. Threads, not
        asyncio: safe to call from notebooks (already inside an event loop) and from any thread,
        and from several threads at once (the semaphore in _invoke bounds them together)."""
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)), thread_name_prefix="cai-lc")
        try:
            out = list(pool.map(fn, items))
        except BaseException:
            # First error or Ctrl-C: drop what has not been sent yet, and do not wait for the rest.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return out

    def _unreachable(self, tries: int = 1) -> str:
        after = f" ({tries} tries)" if tries > 1 else ""
        return (
            f"cannot reach {self.base_url}{after}: start the server or fix --base-url; "
            "rows written so far are kept, rerun the same command to resume"
        )

    def _explain(self, e: Exception) -> str:
        """A message that says what went wrong and what to do."""
        from langchain_core import exceptions as lc

        where = self.base_url or self.provider
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        tries = getattr(e, "cai_attempts", 1)
        status = getattr(e, "status_code", None)
        if isinstance(e, lc.ModelTimeoutError) or "Timeout" in type(e).__name__:
            return (
                f"{where} timed out ({tries} tries): lower --concurrency, or give the server more "
                "capacity; rerun the same command to resume"
            )
        if isinstance(e, lc.ModelConnectionError | ConnectionError) or "ConnectionError" in type(e).__name__:
            if self.base_url:
                return self._unreachable(tries)
            return f"cannot reach {where}: check the network and the provider's status"
        if self.base_url and status in (502, 503, 504):
            return (
                f"{where} answered {status} to {tries} tries ({first}): the server, or every replica "
                "behind it, is down or overloaded; restart them (rows written so far are kept) and rerun "
                "the same command to resume"
            )
        if isinstance(e, lc.ModelAuthenticationError | lc.ModelPermissionDeniedError):
            return (
                f"{where} rejected the API key: set the provider's key "
                "(OPENAI_API_KEY for OpenAI and for --base-url servers)"
            )
        if isinstance(e, lc.ModelNotFoundError):
            return f"{where} has no model {self.model_id!r} ({first}): fix --model"
        if isinstance(e, lc.ContextOverflowError):
            return (
                f"a prompt is longer than {self.model_id}'s context ({first}): "
                "lower --max-new-tokens or shorten the prompts"
            )
        if isinstance(e, lc.ModelRateLimitError):
            return f"{where} is rate-limiting ({first}): lower --concurrency"
        if isinstance(e, lc.ModelAPIError):
            return f"{where} failed ({first}): check the server's log; rerun the same command to resume"
        if _is_rejection(e):
            return (
                f"{where} rejected the request ({first}): check --max-new-tokens against the server's "
                f"limits (vLLM: --max-model-len; --max-logprobs >= {self.top_logprobs} for the judge)"
            )
        return f"{where}: {type(e).__name__}: {first}"

    # -- assistant prefixes --------------------------------------------------------------------

    def _settle_prefix(self, conversations: list[list[dict]]):
        """auto: before the first batch with a prefix, one 1-token request decides between
        continue and fold (settled once, not raced by batch_size threads)."""
        if self.prefix != "auto":
            return
        conversation = next((c for c in conversations if c and c[-1]["role"] == "assistant"), None)
        if conversation is None:
            return
        with self._settle:  # several chunks may ask at once; the first settles it for all
            if self.prefix == "auto":
                self._settle_with(conversation)

    def _settle_with(self, conversation: list[dict]):
        probe = {"max_tokens": 1, "temperature": 0}
        try:
            cont = self._invoke(conversation, self._params(dict(probe, extra_body=_CONTINUE)))
            # Continuing drops the end of the assistant turn and the next generation prompt, so an
            # honoured request has fewer prompt tokens than the same request without the fields.
            plain = self._invoke(conversation, self._params(dict(probe)))
        except Exception as e:
            if not _from_provider(e):
                raise
            if not _is_rejection(e):
                raise CaiError(self._explain(e)) from e
            self.prefix = "fold"
            print(
                f"cai: {self.base_url or self.provider} does not take continue_final_message; "
                "assistant prefixes are folded into the user turn instead",
                file=sys.stderr,
            )
            return
        n_cont, n_plain = _prompt_tokens(cont), _prompt_tokens(plain)
        if n_cont and n_cont == n_plain:
            self.prefix = "fold"
            print(
                f"cai: {self.base_url or self.provider} ignores continue_final_message (same prompt "
                f"length, {n_cont} tokens, with and without it); assistant prefixes are folded into "
                "the user turn instead",
                file=sys.stderr,
            )
        else:
            self.prefix = "continue"

    def _request(self, conversation: list[dict], instruction: str | None = None):
        """(messages, extra params, prefix to cut from the reply)."""
        if conversation[-1]["role"] != "assistant":
            return conversation, {}, None
        if self.prefix == "continue":
            return conversation, ({"extra_body": _CONTINUE} if self._openai_compatible else {}), None
        prefix = conversation[-1]["content"]
        note = instruction or f"Begin your reply with: {prefix}"
        head = [dict(m) for m in conversation[:-1]]
        if head and head[-1]["role"] == "user":
            head[-1]["content"] = f"{head[-1]['content']}\n\n{note}"
        else:
            head.append({"role": "user", "content": note})
        return head, {}, prefix

    # -- the two operations --------------------------------------------------------------------

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        sampled = bool(temperature and temperature > 0)

        def one(item):
            i, conv = item
            messages, params, cut = self._request(conv)
            if sampled and seed is not None:
                # One seed per request: two copies of a conversation in one call (e.g. two samples
                # for a pair) must not come back identical. Same arguments, same seeds on rerun.
                params["seed"] = seed * 1_000_003 + i
            msg = self._call(messages, max_tokens=max_new_tokens, temperature=temperature, **params)
            text = _text(msg)
            if cut and text.lstrip().startswith(cut.strip()):
                text = text.lstrip()[len(cut.strip()) :]  # the folded prefix echoed back
            usage = getattr(msg, "usage_metadata", None) or {}
            n = usage.get("output_tokens") or len(text.split())
            self._count(generated_tokens=n)
            return Generation(text.strip(), n)

        self._settle_prefix(conversations)
        return self._map(one, list(enumerate(conversations)))

    @property
    def supports_logprobs(self) -> bool:
        if self._logprobs is None:
            with self._settle:
                if self._logprobs is None:
                    self._logprobs = self._probe_logprobs()
        return self._logprobs

    @supports_logprobs.setter
    def supports_logprobs(self, value: bool):
        self._logprobs = bool(value)

    def _probe_logprobs(self) -> bool:
        if not self._openai_compatible:
            return False
        try:
            msg = self._invoke(
                [{"role": "user", "content": "Say OK."}],
                self._params(
                    dict(max_tokens=1, temperature=0, logprobs=True, top_logprobs=self.top_logprobs)
                ),
            )
        except Exception as e:
            if not _from_provider(e):
                raise
            # llama-cpp-python's server started with --logits_all false answers 500 "logprobs is
            # not supported ...": a refusal of log-probs, not a failing server.
            if not _is_rejection(e) and "logprobs" not in str(e).lower():
                raise CaiError(self._explain(e)) from e
            print(
                f"cai: {self.base_url or self.provider} rejected logprobs with top_logprobs="
                f"{self.top_logprobs} ({str(e).splitlines()[0][:200]}); the judge will use generated "
                "verdicts (vLLM: raise --max-logprobs; llama_cpp.server: --logits_all true)",
                file=sys.stderr,
            )
            return False
        ok = _top_logprobs(msg) is not None
        if not ok:
            print(
                f"cai: {self.base_url or self.provider} returns no log-probs; "
                "the judge will use generated verdicts",
                file=sys.stderr,
            )
        return ok

    def option_logprobs(self, prompts, options):
        """Log-probability of each option as the first generated token, from the server's top list.

        A listed token counts for an option when it equals the option after stripping whitespace
        ("A" and " A" are the same answer; servers tokenise differently), summed over such tokens.
        An option *absent* from the top list has a true log-prob of at most
        ``bound = min(lowest listed log-prob, log(1 - listed probability mass))``; we score it
        ``bound - log(2)``: half the most it could be. That keeps it below every listed token, never
        claims more than the unlisted mass, and stays finite, so normalising over the options
        gives a confident but never exactly 0/1 judgement. Such floors are counted in
        ``stats["options_floored"]``; a judge that mostly sees floors is not following the format.
        """
        stripped = [o.strip() for o in options]
        if not options or not all(stripped) or len(set(stripped)) != len(options):
            raise InputError(f"options {options} must be distinct, non-blank single tokens such as 'A', 'B'")
        if not self.supports_logprobs:
            raise CaiError(
                f"{self.base_url or self.provider} returns no log-probs, so options cannot be scored; "
                "use the generated-verdict judge (or a server that returns logprobs, e.g. vLLM)"
            )
        instruction = f"Reply with only one of: {', '.join(options)}."

        def one(prompt):
            messages, params, _ = self._request(prompt, instruction=instruction)
            msg = self._call(
                messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=self.top_logprobs, **params
            )
            top = _top_logprobs(msg)
            if top is None:
                raise CaiError(
                    f"{self.base_url or self.provider} returned a reply without log-probs; "
                    "rerun with a server that returns logprobs"
                )
            return self._score(top, options)

        self._settle_prefix(prompts)
        return self._map(one, list(prompts))

    def _score(self, top: list[tuple[str, float]], options: list[str]) -> list[float]:
        listed = [lp for _, lp in top]
        unlisted = 1.0 - sum(math.exp(lp) for lp in listed)
        bound = min(min(listed), math.log(unlisted)) if unlisted > 1e-12 else min(listed)
        floor = bound - math.log(2)
        out = []
        for o in options:
            hits = [lp for tok, lp in top if tok.strip() == o.strip()]
            self._count(options_scored=1)
            if hits:
                m = max(hits)
                out.append(m + math.log(sum(math.exp(h - m) for h in hits)))
            else:
                self._count(options_floored=1)
                out.append(floor)
        return out


def _text(msg) -> str:
    content = msg.content
    if isinstance(content, list):  # content blocks (some providers)
        content = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return content or ""


def _prompt_tokens(msg) -> int | None:
    """The prompt length the server reports (usage.prompt_tokens), or None."""
    usage = getattr(msg, "usage_metadata", None) or {}
    return usage.get("input_tokens") or None


def _top_logprobs(msg) -> list[tuple[str, float]] | None:
    """[(token, logprob)] for the first generated token, or None when the reply carries none."""
    lp = (msg.response_metadata or {}).get("logprobs") or {}
    content = lp.get("content") if isinstance(lp, dict) else None
    if not content:
        return None
    first = content[0]
    top = [(t["token"], float(t["logprob"])) for t in first.get("top_logprobs") or []]
    if not top and "token" in first:  # top_logprobs not honoured: only the chosen token
        top = [(first["token"], float(first["logprob"]))]
    return top or None


def _from_provider(e: Exception) -> bool:
    """An error the server or provider SDK reported (turned into CaiError), not a bug of ours."""
    from langchain_core.exceptions import ModelError

    if isinstance(e, ModelError | ConnectionError | TimeoutError) or hasattr(e, "status_code"):
        return True
    sdk = type(e).__module__.split(".")[0]
    return sdk in ("openai", "httpx", "httpx2", "httpcore", "anthropic", "google")


def _retryable(e: Exception) -> bool:
    """What a retry can fix: no connection, a timeout, a busy or failing server (408, 409, 429,
    5xx). A 4xx for the request itself (400, 401, 404, 422) fails the same way every time."""
    status = getattr(e, "status_code", None)
    if isinstance(status, int):
        return status in (408, 409, 429) or status >= 500
    if getattr(e, "is_retryable", False) or isinstance(e, ConnectionError | TimeoutError):
        return True
    return any(k in type(e).__name__ for k in ("Connection", "Timeout"))


def _retry_after(e: Exception) -> float | None:
    """The server's Retry-After in seconds (at most 60), when it sent one."""
    response = getattr(e, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _is_rejection(e: Exception) -> bool:
    """A 400/422 for the request's shape (an unknown field, say), not for its length."""
    from langchain_core.exceptions import ContextOverflowError

    if isinstance(e, ContextOverflowError):
        return False
    return getattr(e, "status_code", None) in (400, 422)
