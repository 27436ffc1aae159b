"""llama.cpp backend: any GGUF file, in process, on llama.cpp's own C++ server engine.

The CPU engine (``--backend auto`` picks it on a machine without a GPU for GGUF models, the
embedded default included). It runs llama.cpp through ``xllamacpp``, a prebuilt wheel of
llama.cpp with its native server (``xllamacpp.Server``), called in process:

* **Several sequences per decode call, continuous admission.** The server has ``batch_size``
  slots; each decode step carries one token for every generating slot plus prompt chunks for
  slots that are starting, and a slot that finishes takes the next waiting prompt.
* **Shared prefixes computed once.** Prompts are sorted by their tokens and split into at most
  ``batch_size`` runs of neighbours, cut where a family of prompts sharing a long prefix ends
  (cut_runs); wave k holds the k-th prompt of every run, and the server gives each prompt the
  idle slot whose cache shares the longest prefix with it (its predecessor's), so only the
  tokens after the shared prefix are computed. The judge's prompts for one pair (both orders,
  every principle) are neighbours, as are a critique prompt and the generation it repeats.
  Judge calls use half the slots (judge_slots), leaving the others' prefixes (the re-check's
  question list) for the next call.
* **The weight format that runs fastest.** A Q4_1 file (the embedded default) runs as its Q8_0
  copy, made once (gguf_weights.py); ``weights="as-is"`` keeps the file's own format.

Batching and results: a run repeated on the same machine gives the same rows bit for bit.
llama.cpp's numbers for a prompt depend on how the server chunks it beside the other slots'
work, so (1) each wave reaches the server as one request holding all of its prompts (what
shares each decode step then follows from the prompts, not from when requests arrived), and
(2) the K cache is F32 and weights are not repacked, so a prompt cut into chunks of any size,
a single token included, gets the numbers of one whole prefill (tests/test_llamacpp.py).
What still moves a rounding: a prefix computed while generating (the response a critique
extends) and the same prefix prefilled differ (8-bit activations amplify it, up to 0.2 in
log-prob), and which one a prompt reuses follows from ``batch_size`` and the calls before it,
so another ``--batch-size`` can give other rows (docs/architecture.md, "Results and batching",
has the measurements). The prebuilt CPU wheel is built without ``-march=native`` (AVX2
kernels, also on AVX-512 machines), so two x86-64 machines with AVX2 run the same kernels.

The chat template is the one in the GGUF file, rendered with Jinja exactly as transformers
does (a trailing assistant message is continued), and tokenised by llama.cpp with special
tokens parsed and none added, as the hf backend does: the same model gives the same prompt
tokens on both. Requests (llama.cpp's native ``/completion`` and ``/tokenize``) go to the
loopback address the in-process server listens on, guarded by a random API key held by this
process.
"""

from __future__ import annotations

import bisect
import json
import os
import secrets
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cai.backends.base import Generation, Option
from cai.backends.gguf_weights import is_gguf, resolve_gguf  # noqa: F401 (re-exported)
from cai.errors import CaiError, InputError

_CONTINUE_TAG = "CAI_CONTINUE_FINAL_MESSAGE"
WEIGHTS = ("auto", "as-is")
# Alternatives the server lists per judged prompt. The options' log-probs are exact whenever they
# are among them (the server's log-probs are a softmax over the whole vocabulary); an option
# outside them is floored like the langchain backend's (counted in stats["options_floored"]).
TOP_PROBS = 100


def import_xllamacpp():
    # ggml's CPU threads are OpenMP threads; how they wait between operations is read once, when
    # libgomp loads, so it is chosen before the first import (wait_policy; an OMP_WAIT_POLICY or
    # GOMP_SPINCOUNT in the environment is kept as it is).
    wait_policy()
    try:
        import xllamacpp
    except ImportError:
        raise InputError(
            "the llamacpp backend needs xllamacpp (a prebuilt llama.cpp wheel): pip install xllamacpp"
        ) from None
    return xllamacpp


class LlamaCppBackend:
    name = "llamacpp"
    supports_logprobs = True
    shared = ("batch_size", "threads")
    options = (
        Option("ctx_per_seq", int, "Longest prompt + generation one slot holds (tokens).", min=64),
        Option("n_batch", int, "At most this many tokens per llama_decode call.", min=1),
        Option(
            "weights",
            str,
            "auto: run a Q4_1 file as its cached Q8_0 copy; as-is: the file's format.",
            WEIGHTS,
        ),
        Option(
            "flash_attn", bool, "llama.cpp's flash attention (off: its numbers depend on batch partners)."
        ),
    )

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 16,
        threads: int | None = None,
        ctx_per_seq: int = 4096,
        n_batch: int = 512,
        weights: str = "auto",
        flash_attn: bool = False,
    ):
        """
        model: a .gguf file (or a folder holding exactly one); None = the embedded default's GGUF.
        batch_size: server slots, i.e. sequences decoded together (one KV stream each).
        threads: CPU threads (default: all cores the process may use).
        ctx_per_seq: the longest prompt + generation a slot holds; longer prompts are cut from the
            left, as the hf backend does. The KV cache for batch_size slots of ctx_per_seq tokens
            is allocated when the server starts (the embedded model: 23 KB per token, 0.75 GB
            for 16 x 2048), so slots start with 512 tokens and double (a restart of the server)
            when a call's prompts need more, up to ctx_per_seq.
        n_batch: at most this many tokens per llama_decode call (prompts are chunked).
        weights: "auto" runs a Q4_1 file as its cached Q8_0 copy (gguf_weights.py); "as-is"
            runs the file's own format.
        flash_attn: llama.cpp's flash attention. Off: its CPU kernel gives a prompt different
            numbers depending on which other prompts share its batch (up to 0.3 in log-prob on
            the embedded model), and which prompts are prefilled together depends on timing.
        """
        if weights not in WEIGHTS:
            raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        self._xl = import_xllamacpp()
        self.path, self.model_id = resolve_gguf(model)
        self.model_path = self.path  # fingerprinted into meta by the stages (the file given)
        self.batch_size = max(1, int(batch_size))
        self.threads = int(threads or _cores())
        self.n_batch = int(n_batch)
        self.flash_attn = bool(flash_attn)
        self.weights = weights
        self.stats = {
            "prompt_tokens": 0,
            "computed_tokens": 0,
            "prefix_tokens_reused": 0,
            "generated_tokens": 0,
            "truncated_prompts": 0,
            "options_floored": 0,
            "server_starts": 0,
            "requests": 0,
        }
        meta = _metadata(self.path)
        self._template = meta.get("tokenizer.chat_template")
        self.quantisation = _file_type(meta.get("general.file_type"))
        arch = meta.get("general.architecture")
        self.n_ctx_train = int(meta.get(f"{arch}.context_length") or 0)
        self.max_ctx = int(min(ctx_per_seq, self.n_ctx_train) if self.n_ctx_train > 0 else ctx_per_seq)
        tokens = meta.get("tokenizer.ggml.tokens") or []
        self._bos = _token(tokens, meta.get("tokenizer.ggml.bos_token_id"))
        self._eos = _token(tokens, meta.get("tokenizer.ggml.eos_token_id"))
        self.run_path, self.run_weights = weights_to_run(self.path, self.quantisation, weights)
        self._key = secrets.token_hex(16)  # the in-process server's HTTP side answers only us
        self._memo: OrderedDict = OrderedDict()  # identical prompts' results (see _run)
        self._server = None
        self._lock = threading.Lock()
        self.ctx_per_seq = 0
        self._start(min(512, self.max_ctx))

    # -- the server --------------------------------------------------------------------

    def _start(self, ctx_per_seq: int):
        """(Re)start the in-process server with room for ``ctx_per_seq`` tokens per slot."""
        xl = self._xl
        p = server_params(
            xl,
            self.run_path,
            parallel=self.batch_size,
            ctx_per_seq=ctx_per_seq,
            threads=self.threads,
            n_batch=self.n_batch,
            flash_attn=self.flash_attn,
        )
        p.n_threads_http = 2
        p.api_keys = [self._key]
        self._params = p  # what describe() records
        self._server = None  # free the old KV cache before the new one is allocated
        try:
            self._server = xl.Server(p)
        except Exception as e:  # noqa: BLE001 - the binding raises plain RuntimeError/ValueError
            raise CaiError(
                f"llama.cpp could not load {self.path} with {self.batch_size} slots of "
                f"{ctx_per_seq} tokens ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "check the file, or lower --batch-size"
            ) from None
        self.ctx_per_seq = ctx_per_seq
        self._url = self._server.listening_address
        self.stats["server_starts"] += 1

    def _room_for(self, ids: list[list[int]], room: int) -> None:
        """Grow the slots' context (doubling, up to max_ctx) when a prompt + ``room`` needs it."""
        need = max((len(t) for t in ids), default=0) + room
        if need <= self.ctx_per_seq or self.ctx_per_seq >= self.max_ctx:
            return
        n = self.ctx_per_seq
        while n < need and n < self.max_ctx:
            n *= 2
        self._start(min(n, self.max_ctx))

    def close(self):
        self._server = None

    def describe(self) -> dict:
        xl, p = self._xl, self._params
        return {
            "backend": self.name,
            "model": self.model_id,
            "gguf": Path(self.path).name,
            "quantisation": self.quantisation,
            "weights": self.run_weights,
            "engine": f"xllamacpp {xl.__version__} (llama.cpp server, in process)",
            "cpu_features": _cpu_features(xl),
            "device": "cpu",
            "threads": self.threads,
            "omp_wait_policy": _described_policy(),
            "batch_size": self.batch_size,
            "ctx_per_seq": self.max_ctx,
            "kv_cache": f"K {_type_name(p.cache_type_k)}, V {_type_name(p.cache_type_v)}",
            "weight_repack": not p.no_extra_bufts,
            "flash_attn": p.flash_attn_type == xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        }

    def _post(self, endpoint: str, body: dict, timeout: float | None = 60) -> dict | list:
        req = urllib.request.Request(
            self._url + endpoint,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def _complete(self, body: dict) -> list[dict]:
        """llama.cpp's own ``/completion`` endpoint for a list of prompts: one result per
        prompt, in order, each with its own timings (the OpenAI-style endpoint reports one
        prompt's timings for the whole list). No timeout: the server is this process's own."""
        try:
            r = self._post("/completion", body, timeout=None)
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read()).get("error", {})
            except ValueError:
                err = {}
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise CaiError(f"llama.cpp refused a request for {self.path}: {msg or e}") from None
        except urllib.error.URLError as e:
            raise CaiError(f"llama.cpp's in-process server did not answer ({e.reason})") from None
        return r if isinstance(r, list) else [r]

    # -- text <-> tokens -------------------------------------------------------------------

    def render(self, conversation: list[dict]) -> str:
        """The exact text the model sees; a trailing assistant message is continued (as
        transformers' ``continue_final_message`` does), otherwise the generation prompt is added."""
        prefix = conversation[-1]["role"] == "assistant"
        if not self._template:
            from cai.records import to_transcript

            body = to_transcript(conversation).lstrip()
            return body if prefix else body + "\n\nAssistant:"
        msgs = [dict(m) for m in conversation]
        if prefix:
            msgs[-1]["content"] = msgs[-1]["content"] + _CONTINUE_TAG
        text = _compiled(self._template).render(
            messages=msgs, add_generation_prompt=not prefix, bos_token=self._bos, eos_token=self._eos
        )
        if prefix:
            if _CONTINUE_TAG not in text:
                raise InputError(
                    f"the chat template of {self.path} drops the final assistant message; "
                    "it cannot continue a prefix"
                )
            text = text[: text.rindex(_CONTINUE_TAG)]
        return text

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": special})[
            "tokens"
        ]

    def _encode(self, conversations: list[list[dict]], room: int) -> list[list[int]]:
        texts = [self.render(c) for c in conversations]
        with ThreadPoolExecutor(2) as ex:  # each is a loopback request: overlap their latency
            ids = list(ex.map(self.tokenize, texts))
        if any(not t for t in ids):
            raise InputError("an empty prompt cannot be run")
        self._room_for(ids, room)
        limit = max(1, self.ctx_per_seq - room)
        for k, t in enumerate(ids):
            if len(t) > limit:
                ids[k] = t[-limit:]  # keep the end: it matters most
                self.stats["truncated_prompts"] += 1
            self.stats["prompt_tokens"] += len(ids[k])
        return ids

    def option_token_ids(self, options: list[str]) -> list[int]:
        ids = []
        for o in options:
            t = self.tokenize(o, special=False)
            if not t:
                raise InputError(f"option {o!r} encodes to no token")
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            raise InputError(f"options {options} share a first token; use distinct single-token letters")
        return ids

    # -- the two operations --------------------------------------------------------------

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        max_new = max(1, int(max_new_tokens))
        ids = self._encode(conversations, room=max_new)
        sampled = bool(temperature and temperature > 0)
        base = {
            "n_predict": max_new,
            "cache_prompt": True,
            # plain temperature sampling over the whole vocabulary, as the hf backend samples
            "temperature": float(temperature) if sampled else 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
        }

        def parse(i, res):
            n = int(res.get("tokens_predicted", 0))
            with self._lock:
                self.stats["generated_tokens"] += n
            return Generation(res["content"].strip(), n)

        if sampled:
            return self._sampled(ids, base, parse, seed or 0)
        return self._run(ids, base, parse, memo=("generate", max_new))

    def option_logprobs(self, prompts, options):
        import math

        opt = self.option_token_ids(options)
        ids = self._encode(prompts, room=1)
        # The one token sampled is never read: it is pinned to the first option, because llama.cpp
        # reports no probabilities at all when the sampled token is an incomplete UTF-8 character
        # (a byte of an emoji, say), and the list it reports is the model's own distribution,
        # taken before any bias (tests/test_llamacpp.py).
        base = {
            "n_predict": 1,
            "temperature": 0.0,
            "cache_prompt": True,
            "n_probs": TOP_PROBS,
            "logit_bias": [[opt[0], PIN_BIAS]],
        }

        def parse(i, res):
            probs = res.get("completion_probabilities")
            if not probs:
                raise CaiError(
                    f"llama.cpp returned no next-token probabilities for a judge prompt ({self.path}; "
                    f"it stopped with {res.get('stop_type')!r})"
                )
            top = probs[0]["top_logprobs"]
            listed = {int(t["id"]): float(t["logprob"]) for t in top}
            if all(o in listed for o in opt):
                return [listed[o] for o in opt]
            # An option outside the list: at most min(lowest listed, unlisted mass); score half that.
            unlisted = 1.0 - sum(math.exp(v) for v in listed.values())
            low = min(listed.values())
            bound = min(low, math.log(unlisted)) if unlisted > 1e-12 else low
            with self._lock:
                self.stats["options_floored"] += sum(o not in listed for o in opt)
            return [listed.get(o, bound - math.log(2)) for o in opt]

        # half the slots at a time: the other half keep what the previous call left (judge_slots)
        return self._run(
            ids, base, parse, memo=("options", tuple(opt)), max_runs=judge_slots(self.batch_size)
        )

    def _wave(self, ids: list[list[int]], wave: list[int], body: dict, parse) -> dict:
        """One request carrying the prompts ``wave`` (positions in ``ids``); their results by
        position. The server receives the whole wave at once, so which prompts share each of its
        decode steps depends on the prompts only, never on when requests arrived."""
        results = self._complete(dict(body, prompt=[ids[i] for i in wave]))
        if len(results) != len(wave):
            raise CaiError(f"llama.cpp answered {len(results)} results for {len(wave)} prompts ({self.path})")
        out = {}
        for k, res in enumerate(results):
            i = wave[int(res.get("index", k))]
            t = res.get("timings") or {}
            with self._lock:
                self.stats["computed_tokens"] += int(t.get("prompt_n", len(ids[i])))
                self.stats["prefix_tokens_reused"] += int(t.get("cache_n", 0))
            out[i] = parse(i, res)
        with self._lock:
            self.stats["requests"] += 1
        return out

    def _run(self, ids: list[list[int]], body: dict, parse, memo: tuple, max_runs: int | None = None):
        """Greedy results for every prompt, in input order, computed in waves.

        Reproducible: llama.cpp's numbers for a prompt depend on how the server chunks it
        beside the other slots' work in each decode step (docs/architecture.md, "Results and
        batching"), and with one request per prompt that depends on when each request arrives.
        So the prompts go in waves, each wave one request holding all of its prompts: the server
        takes a wave in whole, and every decode step's content follows from the prompts alone.

        Shared prefixes: the prompts are sorted by their tokens and cut into at most
        ``max_runs`` (default ``batch_size``) runs of neighbours, where a family of prompts
        sharing a long prefix ends (cut_runs); wave k holds the k-th prompt of every run, so a
        prompt follows its predecessor in the run, and the server gives each prompt the idle slot
        whose cache shares the longest prefix with it (its predecessor's), computing only the
        tokens after that prefix.

        ``memo`` (the request's settings) makes identical prompts computed once per backend: a
        prompt found whole in a slot's cache would get its last token's logits from a one-row
        kernel, a rounding apart from the prefill's, so the first result is remembered (at most
        MEMO results) instead of computed again."""
        key = lambda i: (memo, tuple(ids[i]))  # noqa: E731
        first: dict = {}
        for i in range(len(ids)):
            if key(i) not in self._memo:
                first.setdefault(key(i), i)
        uniq = sorted(first.values(), key=lambda i: (ids[i], i))
        runs = [
            [uniq[j] for j in run] for run in cut_runs([ids[i] for i in uniq], max_runs or self.batch_size)
        ]
        done: dict[int, object] = {}
        for k in range(max((len(r) for r in runs), default=0)):
            done.update(self._wave(ids, [run[k] for run in runs if k < len(run)], body, parse))
        for k, i in first.items():
            self._memo[k] = done[i]
        out = [self._memo[key(i)] for i in range(len(ids))]
        while len(self._memo) > MEMO:
            self._memo.popitem(last=False)
        return out

    def _sampled(self, ids: list[list[int]], body: dict, parse, seed: int):
        """Sampled results, in input order. Wave j holds the j-th occurrence of each distinct
        prompt and is seeded by (seed, j): a run repeats exactly, and the same prompt asked n
        times in a call gets n different samples."""
        seen: dict = {}
        waves: list[list[int]] = []
        for i in range(len(ids)):
            j = seen.get(tuple(ids[i]), 0)
            seen[tuple(ids[i])] = j + 1
            if j == len(waves):
                waves.append([])
            waves[j].append(i)
        done: dict[int, object] = {}
        for j, wave in enumerate(waves):
            done.update(self._wave(ids, wave, dict(body, seed=_seed(seed, j)), parse))
        return [done[i] for i in range(len(ids))]


# Results remembered per backend for identical prompts (see LlamaCppBackend._run).
MEMO = 20_000
# Added to the first option's logit for the judge's one sampled token (option_logprobs): enough to
# make it the greedy pick whatever the model's logits are.
PIN_BIAS = 1.0e4
# cut_runs' cost model, in prompt tokens: what one request costs beyond its tokens (a server
# iteration, the top-N list; measured below), and how many tokens a run may recompute at its
# start and still count as a cheap place to cut.
REQUEST_COST = 8
CHEAP_CUT = 16


def judge_slots(batch_size: int) -> int:
    """Runs a judge call (prompts only, one token each) may use: half the slots. Measured on the
    embedded model, 2 cores: a 3-token request after a cached 500-token prefix took 14.5 ms alone
    and 8.8 ms each with 16 slots at once, against ~1.9 ms per token of prefill, so prompt tokens
    cost the same in one slot as spread over many, while a slot a judge call leaves alone keeps
    its prefix for the next call: `--recheck` alternates label calls with re-check calls whose 30
    prompts per pair all start with the same ~420-token list of questions."""
    return max(1, batch_size // 2)


def cut_runs(prompts: list[list[int]], k: int) -> list[list[int]]:
    """Cut sorted ``prompts`` into at most ``k`` runs of neighbours of about equal work; returns
    the runs as lists of positions.

    A run computes a prompt's tokens after its predecessor's shared prefix, and its first prompt
    after what its slot holds (at best the prefix every prompt of the call shares). So a cut
    between two prompts that share much more than that (the 30 re-check prompts of one pair,
    which share the pair's conversation and responses) makes a second slot compute the shared
    part again, while a cut where a new family of prompts starts costs nothing. Each of the
    ``k - 1`` even cuts (by work: tokens computed plus REQUEST_COST per request) moves to the
    nearest cheap place (recomputing at most CHEAP_CUT tokens beyond the common prefix); cuts
    landing on the same place merge, so a call with fewer families than slots uses fewer slots
    (prompt tokens cost the same in one slot as in many: judge_slots). Deterministic: it depends
    on the tokens only."""

    n = len(prompts)
    if n == 0:
        return []
    if k <= 1 or n <= 1:
        return [list(range(n))]
    shared = [0] + [_lcp(prompts[j - 1], prompts[j]) for j in range(1, n)]
    base = min(shared[1:])
    shared[0] = min(base, len(prompts[0]))  # the slots hold the common prefix (after the first call)
    cum = [0]
    for j in range(n):
        cum.append(cum[-1] + len(prompts[j]) - shared[j] + REQUEST_COST)
    cheap = [j for j in range(1, n) if shared[j] - base <= CHEAP_CUT]  # never empty: base is a min
    k = min(k, n)
    at = [cum[j] for j in cheap]
    cuts = set()
    for r in range(1, k):
        target = cum[n] * r / k
        q = bisect.bisect_left(at, target)
        near = [c for c in (q - 1, q) if 0 <= c < len(cheap)]
        cuts.add(cheap[min(near, key=lambda c: (abs(at[c] - target), c))])
    bounds = [0, *sorted(cuts), n]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def weights_to_run(path: str, quantisation: str | None, weights: str = "auto") -> tuple[str, str | None]:
    """(the file llama.cpp loads, what it holds): for ``auto`` a Q4_1 file's cached Q8_0 copy
    (gguf_weights.py), else the file itself."""
    from cai.backends import gguf_weights
    from cai.models import cache_dir

    if weights != "auto":
        return path, quantisation
    try:
        slow = gguf_weights.slow_tensors(path)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"llama.cpp cannot read this GGUF ({e})", path) from None
    if not slow:
        return path, quantisation
    copy, _ = gguf_weights.fast_copy(path, cache_dir() / "gguf")
    return str(copy), f"{gguf_weights.TARGET} copy of the {quantisation} file"


# Spins before a waiting thread sleeps, when the cores are free (libgomp's GOMP_SPINCOUNT).
IDLE_SPINS = 10_000


def wait_policy() -> str:
    """Set how ggml's OpenMP threads wait, from a measurement of the machine now: spin briefly
    (GOMP_SPINCOUNT=10000, then sleep) when no other process is using the cores, sleep at once
    (OMP_WAIT_POLICY=passive) when one is. Measured here, 16 slots of the embedded model:
    idle, brief spinning decoded 255 tokens/s against 168 sleeping at once (prefill 11.7 vs
    14.1 s); with one other busy process, 55 against 137 (prefill 37 vs 22 s): a spinning thread
    holds the core its partner needs. Returns what was chosen (recorded in describe())."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return _described_policy()
    busy = busy_cores()
    os.environ["OMP_WAIT_POLICY"] = "passive"
    if busy is not None and busy < 0.5:
        os.environ["GOMP_SPINCOUNT"] = str(IDLE_SPINS)
    return _described_policy()


def _described_policy() -> str:
    spins = os.environ.get("GOMP_SPINCOUNT")
    return f"{os.environ.get('OMP_WAIT_POLICY', 'default')}" + (f", GOMP_SPINCOUNT={spins}" if spins else "")


def busy_cores(window: float = 0.2) -> float | None:
    """Cores kept busy by other processes over the next ``window`` seconds (this one sleeps
    meanwhile), from /proc/stat; None where that is not available."""
    import time

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]), v[3] + (v[4] if len(v) > 4 else 0)  # all, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / (t1 - t0))


def server_params(xl, path, *, parallel, ctx_per_seq, threads, n_batch=512, flash_attn=False):
    """llama.cpp server parameters for ``path``: ``parallel`` slots of ``ctx_per_seq`` tokens.
    The in-process backend and ``cai serve`` start their servers from these."""
    p = xl.CommonParams()
    p.model.path = str(path)
    p.n_parallel = parallel
    p.n_ctx = ctx_per_seq * parallel
    p.kv_unified = False  # one KV stream per slot: attention reads only its own cells
    # A prompt's numbers must not depend on how it is cut into chunks. Two of ggml's CPU paths
    # make them: with an F16 K cache, a chunk holding one token of a prompt takes another
    # attention kernel; with repacked weights (ggml's "extra" buffer types), a row takes the
    # 4-row GEMM or the one-row GEMV by its place in the batch. With an F32 K cache and no
    # repacking, any chunking gives one whole prefill's numbers; the backend's waves (one
    # request each) make what shares a decode step independent of request timing, and the two
    # together make repeated runs agree bit for bit (docs/architecture.md, "Results and batching").
    p.cache_type_k = xl.ggml_type.GGML_TYPE_F32
    p.no_extra_bufts = True
    p.n_batch = p.n_ubatch = n_batch
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
    p.n_gpu_layers = 0  # the CPU engine (hf is the GPU path)
    p.cache_ram_mib = 0  # slots keep their own prompts; no second copy in host memory
    p.ctx_shift = False
    p.warmup = False
    p.no_perf = True
    p.verbosity = -1  # llama.cpp's load log is hundreds of lines on stderr
    fa = xl.llama_flash_attn_type
    p.flash_attn_type = fa.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else fa.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return p


def _type_name(t) -> str:
    """``GGML_TYPE_F32`` -> ``f32``."""
    return t.name.removeprefix("GGML_TYPE_").lower()


def _seed(seed: int, index: int) -> int:
    """A 32-bit sampler seed for one (seed, position) pair (llama.cpp's seeds are uint32)."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")
    return h % 0xFFFFFFFF  # 0xFFFFFFFF is llama.cpp's "pick a random seed"


def _metadata(path: str) -> dict:
    """The GGUF file's key/value metadata (strings, numbers and the token list)."""
    import gguf

    from cai.backends.gguf_weights import _field_value

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"llama.cpp cannot read this GGUF ({e})", path) from None
    keep = ("general.", "tokenizer.chat_template", "tokenizer.ggml.bos", "tokenizer.ggml.eos")
    out = {}
    for key, f in reader.fields.items():
        if key.startswith(keep) or key.endswith(".context_length") or key == "tokenizer.ggml.tokens":
            try:
                out[key] = _field_value(f)
            except (ValueError, IndexError, UnicodeError):
                continue
    return out


def _token(tokens: list, tid) -> str:
    try:
        return tokens[int(tid)]
    except (TypeError, ValueError, IndexError):
        return ""


_TEMPLATES: dict[str, object] = {}


def _compiled(source: str):
    """The chat template compiled as transformers compiles it (sandboxed Jinja, same helpers)."""
    if source not in _TEMPLATES:
        from datetime import datetime

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InputError(f"the model's chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


# llama.cpp's LLAMA_FTYPE_* names, for provenance (general.file_type in the GGUF metadata).
_FTYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


def _file_type(value) -> str | None:
    try:
        return _FTYPES.get(int(value), f"ftype {int(value)}")
    except (TypeError, ValueError):
        return None


def _cpu_features(xl) -> str:
    """The instruction sets llama.cpp's CPU kernels use here (from its own system info)."""
    info = xl.get_system_info()
    feats = [part.split("=")[0].strip() for part in info.split("|") if part.strip().endswith("= 1")]
    return ", ".join(f.replace("CPU : ", "") for f in feats)


def _cores() -> int:
    """CPU cores this process may use (its affinity mask, not the whole machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
