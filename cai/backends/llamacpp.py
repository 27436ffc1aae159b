"""llama.cpp backend: any GGUF file, in process, several sequences decoded in one forward pass.

``--backend llamacpp`` runs the model with llama.cpp through llama-cpp-python's low-level API
(``pip install 'cai[llamacpp]'``). The embedded default is its GGUF file as shipped (no
conversion to fp32); ``--model path/to/model.gguf`` takes any other.

Why in process, and why the batch API rather than ``llama_cpp.Llama``: ``Llama`` (and the
``llama_cpp.server`` built on it) decode one sequence at a time. This backend keeps up to
``batch_size`` sequences in one llama.cpp context (one KV stream each) and feeds them to
``llama_decode`` together: every step carries one new token for each sequence that is
generating plus prompt tokens for sequences that are starting (continuous batching), so the
weights are read once per step for all of them. Measured in docs/architecture.md.

Prompts reuse what a sequence slot already holds: a slot keeps its KV cache between prompts,
the next prompt for it is the remaining one sharing the longest token prefix with what it holds
(prompts are kept sorted, so that is a neighbour), and only the tokens after the shared prefix
are computed. The judge's prompts for one pair (both orders, several principles) share their
whole conversation, so most of it is computed once.

The chat template is the one in the GGUF file, rendered with Jinja exactly as transformers
does (a trailing assistant message is continued), and tokenised with special tokens parsed and
none added, as the hf backend does: the same model gives the same prompt tokens on both.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path

from cai.backends.base import Generation
from cai.errors import CaiError, InputError

_CONTINUE_TAG = "CAI_CONTINUE_FINAL_MESSAGE"


def _import_llama_cpp():
    # ggml's CPU threads are OpenMP threads, which spin while they wait by default. On a shared
    # CPU (more runnable threads than cores) a spinning thread holds the core its partner needs:
    # measured here under load, 2 threads decoded 3 tokens/s spinning and 39 passive (1 thread: 20).
    # Read once, when libgomp loads, so set before the first import; OMP_WAIT_POLICY=active
    # in the environment keeps spinning (a little faster on an idle machine).
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        import llama_cpp
    except ImportError:
        raise InputError(
            "the llamacpp backend needs llama-cpp-python: pip install 'cai[llamacpp]' "
            "(or pip install 'llama-cpp-python==0.3.36')"
        ) from None
    return llama_cpp


def resolve_gguf(model: str | None) -> tuple[str, str]:
    """(GGUF path to load, what to record). None/'default' is the embedded default's own GGUF."""
    from cai.models import DEFAULT_MODEL, default_gguf

    if not model or model in ("default", DEFAULT_MODEL):
        return str(default_gguf()), DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) != 1:
            raise InputError(
                f"the llamacpp backend needs one .gguf file; this folder has {len(ggufs)} — "
                "pass the file itself to --model",
                p,
            )
        p = ggufs[0]
    if not p.is_file():
        raise InputError(
            "GGUF file not found; pass a .gguf file to --model (the llamacpp backend reads GGUF "
            "only; use --backend hf for Hugging Face folders and ids)",
            p,
        )
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(
                "not a GGUF file; the llamacpp backend reads GGUF only "
                "(use --backend hf for safetensors folders)",
                p,
            )
    return str(p), str(p)


@dataclass
class _Job:
    index: int  # position in the caller's list
    tokens: list[int]  # the prompt
    pending: list[int] = field(default_factory=list)  # tokens still to feed
    n_past: int = 0  # tokens of this job already in its slot's KV cache
    out: list[int] = field(default_factory=list)  # generated tokens
    rng: object = None


class LlamaCppBackend:
    name = "llamacpp"
    supports_logprobs = True

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 16,
        threads: int | None = None,
        ctx_per_seq: int = 2048,
        n_batch: int = 512,
        flash_attn: bool = False,
        extra_buffers: bool = False,
        **_ignored,
    ):
        """
        model: a .gguf file (or a folder holding exactly one); None = the embedded default's GGUF.
        batch_size: sequences decoded together (llama.cpp parallel sequences; one KV stream each).
        threads: CPU threads (default: all cores the process may use).
        ctx_per_seq: context of each sequence (prompt + generated); longer prompts are cut from
            the left, as the hf backend does.
        n_batch: at most this many tokens per llama_decode call (prompt tokens are chunked).
        extra_buffers: let llama.cpp repack weights for AMX/ARM kernels (see the note below).
        """
        llama_cpp = _import_llama_cpp()
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's load log is hundreds of lines on stderr
        self._ll = llama_cpp
        self.path, self.model_id = resolve_gguf(model)
        self.model_path = self.path  # fingerprinted into meta by the stages
        self.batch_size = max(1, min(int(batch_size), int(llama_cpp.llama_max_parallel_sequences())))
        self.threads = int(threads or _cores())
        self.stats = {
            "prompt_tokens": 0,
            "computed_tokens": 0,
            "prefix_tokens_reused": 0,
            "generated_tokens": 0,
            "truncated_prompts": 0,
            "decode_calls": 0,
        }

        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        # Extra buffer types hold weights repacked for special kernels (AMX, ARM repack). Off by
        # default: on a VM whose CPU reports AMX without enabling its tile state (this project's
        # machine), ggml's AMX matmul faults on its first multi-token batch (`ldtilecfg`, SIGSEGV).
        # Q4_1 (the embedded default) gets no repacked kernel elsewhere, so nothing is lost for it.
        mparams.use_extra_bufts = bool(extra_buffers)
        try:
            self._model = _internals.LlamaModel(path_model=self.path, params=mparams, verbose=False)
        except ValueError as e:
            raise InputError(f"llama.cpp cannot load this GGUF ({e})", self.path) from None
        n_train = self._model.n_ctx_train()
        self.ctx_per_seq = int(min(ctx_per_seq, n_train) if n_train > 0 else ctx_per_seq)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.ctx_per_seq * self.batch_size
        cparams.n_batch = int(n_batch)
        cparams.n_ubatch = int(n_batch)
        cparams.n_seq_max = self.batch_size
        cparams.kv_unified = False  # one KV stream per sequence: attention reads only its own cells
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        except ValueError as e:
            raise CaiError(
                f"llama.cpp could not create a context for {self.path} with {self.batch_size} "
                f"sequences of {self.ctx_per_seq} tokens ({e}); lower --batch-size"
            ) from None
        self.n_batch = int(n_batch)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()
        self._slots: list[list[int]] = [[] for _ in range(self.batch_size)]  # tokens each slot's KV holds
        meta = self._model.metadata()
        self._template = meta.get("tokenizer.chat_template")
        self.quantisation = _file_type(meta.get("general.file_type"))
        self._bos = self._piece(self._model.token_bos())
        self._eos = self._piece(self._model.token_eos())

    def close(self):
        if getattr(self, "_batch", None) is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
        for name in ("_ctx", "_model"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def describe(self) -> dict:
        import llama_cpp

        return {
            "backend": self.name,
            "model": self.model_id,
            "gguf": Path(self.path).name,
            "quantisation": self.quantisation,
            "engine": f"llama-cpp-python {llama_cpp.__version__}",
            "device": "cpu",
            "threads": self.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "batch_size": self.batch_size,
            "ctx_per_seq": self.ctx_per_seq,
        }

    # -- text <-> tokens -------------------------------------------------------------------

    def _piece(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self._model.token_get_text(tok)

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

    def _encode(self, conversation: list[dict], room: int) -> list[int]:
        ids = self._model.tokenize(self.render(conversation).encode("utf-8"), add_bos=False, special=True)
        if not ids:
            raise InputError("an empty prompt cannot be run")
        limit = max(1, self.ctx_per_seq - room)
        if len(ids) > limit:
            ids = ids[-limit:]  # keep the end: it matters most
            self.stats["truncated_prompts"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return ids

    def option_token_ids(self, options: list[str]) -> list[int]:
        ids = []
        for o in options:
            t = self._model.tokenize(o.encode("utf-8"), add_bos=False, special=False)
            if not t:
                raise InputError(f"option {o!r} encodes to no token")
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            raise InputError(f"options {options} share a first token; use distinct single-token letters")
        return ids

    # -- the two operations --------------------------------------------------------------

    def generate(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None):
        import numpy as np

        max_new = max(1, int(max_new_tokens))
        jobs = [_Job(i, self._encode(c, room=max_new)) for i, c in enumerate(conversations)]
        sampled = bool(temperature and temperature > 0)
        for j in jobs:
            # One generator per (seed, position in the call): reproducible whatever the batching.
            j.rng = np.random.default_rng([seed or 0, j.index]) if sampled else None

        def step(job: _Job, logits) -> list[int] | None:
            if sampled:
                z = logits.astype(np.float64) / float(temperature)
                p = np.exp(z - z.max())
                tok = int(job.rng.choice(len(p), p=p / p.sum()))
            else:
                tok = int(logits.argmax())
            job.out.append(tok)
            if self._ll.llama_vocab_is_eog(self._vocab, tok) or len(job.out) >= max_new:
                return None
            return [tok]

        self._run(jobs, step)
        out = []
        for j in jobs:
            toks = j.out[:-1] if j.out and self._ll.llama_vocab_is_eog(self._vocab, j.out[-1]) else j.out
            text = self._model.detokenize(toks, special=False).decode("utf-8", errors="replace")
            self.stats["generated_tokens"] += len(j.out)
            out.append(Generation(text.strip(), len(j.out)))
        return out

    def option_logprobs(self, prompts, options):
        import numpy as np

        opt = np.array(self.option_token_ids(options))
        jobs = [_Job(i, self._encode(p, room=1)) for i, p in enumerate(prompts)]
        out: list[list[float] | None] = [None] * len(jobs)

        def step(job: _Job, logits) -> None:
            x = logits.astype(np.float64)
            m = x.max()
            lse = m + np.log(np.exp(x - m).sum())
            out[job.index] = (x[opt] - lse).tolist()
            return None

        self._run(jobs, step)
        return out

    # -- the engine ------------------------------------------------------------------------

    def _run(self, jobs: list[_Job], step):
        """Feed every job through the context with up to batch_size sequences per decode call.

        ``step(job, logits)`` is called with the logits after a job's last fed token and returns
        the next tokens to feed (generation) or None (the job is done)."""
        import numpy as np

        ll, ctx, mem = self._ll, self._ctx.ctx, self._ctx.memory
        waiting = sorted(jobs, key=lambda j: j.tokens)  # neighbours share the longest prefixes
        keys = [j.tokens for j in waiting]
        active: dict[int, _Job] = {}
        P = self.batch_size
        # First fill, part 1: a slot still holding the start of a waiting prompt (the last call's
        # prompt and answer, which this call's prompt repeats: revise's critique prompt holds the
        # response just generated, its revision prompt the critique) takes that prompt.
        for slot in range(P):
            if waiting and self._slots[slot]:
                pos = self._nearest(keys, self._slots[slot])
                if _lcp(keys[pos], self._slots[slot]) >= MIN_REUSE:
                    keys.pop(pos)
                    active[slot] = self._admit(slot, waiting.pop(pos), mem)
        # Part 2: the other slots spread over the sorted prompts, so each works through a run of
        # prompts that share prefixes with each other.
        free = [s for s in range(P) if s not in active]
        n, m = len(waiting), min(len(free), len(waiting))
        starts = sorted({(k * n) // m for k in range(m)}, reverse=True) if m else []
        for slot, pos in zip(free, starts):
            active[slot] = self._admit(slot, waiting.pop(pos), mem)
            keys.pop(pos)
        batch = self._batch
        while active:
            # One decode call: generating sequences first (one token each), then prompt chunks.
            batch.n_tokens = 0
            wanted: list[tuple[int, int]] = []  # (batch position, slot) whose logits we read
            order = sorted(active, key=lambda s: len(active[s].pending))
            for slot in order:
                job = active[slot]
                room = self.n_batch - batch.n_tokens
                if room <= 0:
                    break
                take = job.pending[:room]
                for t in take:
                    k = batch.n_tokens
                    batch.token[k] = t
                    batch.pos[k] = job.n_past
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = slot
                    batch.logits[k] = 0
                    batch.n_tokens = k + 1
                    job.n_past += 1
                del job.pending[: len(take)]
                self._slots[slot].extend(take)
                if not job.pending:
                    batch.logits[batch.n_tokens - 1] = 1
                    wanted.append((batch.n_tokens - 1, slot))
            rc = ll.llama_decode(ctx, batch)
            self.stats["decode_calls"] += 1
            self.stats["computed_tokens"] += batch.n_tokens
            if rc != 0:
                raise CaiError(
                    f"llama.cpp failed to decode a batch of {batch.n_tokens} tokens (code {rc}) "
                    f"with {self.path}; lower --batch-size"
                )
            for k, slot in wanted:
                job = active[slot]
                ptr = ll.llama_get_logits_ith(ctx, k)
                logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
                nxt = step(job, logits)
                if nxt is not None:
                    job.pending = list(nxt)
                    continue
                del active[slot]
                if waiting:
                    pos = self._nearest(keys, self._slots[slot])
                    keys.pop(pos)
                    active[slot] = self._admit(slot, waiting.pop(pos), mem)

    @staticmethod
    def _nearest(keys: list[list[int]], held: list[int]) -> int:
        """Index of the waiting prompt sharing the longest prefix with ``held`` (a sorted list's
        neighbour of it)."""
        pos = bisect.bisect_left(keys, held)
        cands = [p for p in (pos - 1, pos) if 0 <= p < len(keys)]
        return max(cands, key=lambda p: (_lcp(keys[p], held), -p))

    def _admit(self, slot: int, job: _Job, mem) -> _Job:
        """Put ``job`` in ``slot``, keeping the part of the slot's KV cache that is its prefix."""
        held = self._slots[slot]
        keep = min(_lcp(held, job.tokens), len(job.tokens) - 1)  # at least one token to compute
        if keep < len(held):
            if not self._ll.llama_memory_seq_rm(mem, slot, keep, -1):
                self._ll.llama_memory_seq_rm(mem, slot, -1, -1)
                keep = 0
            del held[keep:]
        self.stats["prefix_tokens_reused"] += keep
        job.n_past = keep
        job.pending = list(job.tokens[keep:])
        return job


# A shared start shorter than this does not decide which slot takes a prompt (every prompt shares
# the chat template's system text).
MIN_REUSE = 64


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_TEMPLATES: dict[str, object] = {}


def _compiled(source: str):
    """The chat template compiled as transformers compiles it (sandboxed Jinja, same helpers)."""
    if source not in _TEMPLATES:
        import json
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


def _cores() -> int:
    """CPU cores this process may use (its affinity mask, not the whole machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
