"""A real, minimal OpenAI-compatible HTTP server for tests, backed by a local transformers model.

Kept beside the real llama.cpp server (tests/llama_server.py) for what that one cannot do:
answer requests concurrently and count them (llama_cpp.server runs one at a time), honour or
reject vLLM's ``continue_final_message`` (llama_cpp.server silently ignores it), show the exact
request bodies, answer with ``"logprobs": null`` (llama_cpp.server answers 500 instead), and
produce the hf backend's numbers token for token, so the langchain backend's scoring is checked
exactly.

It speaks the subset of vLLM's chat-completions API that the langchain backend uses, over real
HTTP on 127.0.0.1 (ephemeral port, background thread), so tests exercise the same client code,
JSON and error paths as a vLLM fleet — without a GPU or the network:

    POST /v1/chat/completions  messages, max_tokens / max_completion_tokens, temperature, seed,
                               n=1, logprobs + top_logprobs (the model's real next-token
                               distribution, OpenAI's response schema), continue_final_message /
                               add_generation_prompt (vLLM's extra fields)
    GET  /v1/models

    with serve(model_dir) as base_url:          # "http://127.0.0.1:PORT/v1"
        ...
        base_url.server.max_in_flight            # what the server saw (a str with extras)

Switches: ``logprobs=False`` answers like a server without log-probs (``"logprobs": null``);
``continue_final_message=False`` rejects vLLM's extra fields with a 400, as OpenAI's own API
does; ``delay`` adds latency per request (outside the model lock) to make concurrency visible.

Requests are received concurrently (ThreadingHTTPServer) but run through the model one at a time
under a lock: torch modules and fast tokenizers are not meant to be driven from many threads.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BaseURL(str):
    """The base URL, carrying the running server for assertions (``url.server``)."""

    server: OpenAIServer


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }


class OpenAIServer:
    def __init__(
        self,
        hf,
        name: str = "test-model",
        *,
        logprobs: bool = True,
        continue_final_message: bool = True,
        max_logprobs: int = 20,
        delay: float = 0.0,
    ):
        self.hf, self.name = hf, name
        self.logprobs, self.continue_final_message = logprobs, continue_final_message
        self.max_logprobs, self.delay = max_logprobs, delay
        self.requests: list[dict] = []  # every chat request body, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        self._count_lock = threading.Lock()
        self._model_lock = threading.Lock()

    # -- bookkeeping -------------------------------------------------------------------------

    def enter(self, body: dict):
        with self._count_lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self):
        with self._count_lock:
            self.in_flight -= 1

    # -- the API -------------------------------------------------------------------------------

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "cai-tests"}],
        }

    def chat(self, req: dict) -> dict:
        messages = _messages(req.get("messages"))
        if req.get("model") != self.name:
            raise APIError(404, f"The model `{req.get('model')}` does not exist.", "NotFoundError", "model")
        if req.get("stream"):
            raise APIError(400, "stream=true is not supported by the test server", param="stream")
        if req.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        extra = [k for k in ("continue_final_message", "add_generation_prompt") if k in req]
        if extra and not self.continue_final_message:
            raise APIError(400, f"Unrecognized request argument supplied: {extra[0]}", param=extra[0])
        cont = bool(req.get("continue_final_message", False))
        gen_prompt = bool(req.get("add_generation_prompt", True))
        if cont and gen_prompt:
            raise APIError(
                400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        if cont and messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message")
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or 256
        temperature = req.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)  # OpenAI's default
        want_lp = bool(req.get("logprobs")) and self.logprobs
        top_k = int(req.get("top_logprobs") or 0)
        if req.get("top_logprobs") and not req.get("logprobs"):
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if top_k > self.max_logprobs:
            raise APIError(400, f"top_logprobs must be <= {self.max_logprobs}", param="top_logprobs")

        with self._model_lock:
            text, ids, new, logits, finish = self._run(
                messages, gen_prompt, cont, int(max_tokens), temperature, req.get("seed"), want_lp
            )
            lp = self._logprobs(new, logits, top_k) if want_lp else None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(new),
                "total_tokens": len(ids) + len(new),
            },
        }

    def _run(self, messages, gen_prompt, cont, max_tokens, temperature, seed, want_lp):
        import torch

        tok, model = self.hf.tok, self.hf.model
        # The same rendering and tokenisation as HFBackend, so greedy outputs match token for token.
        prompt = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen_prompt, continue_final_message=cont
        )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids], device=self.hf.device)
        kw = dict(
            max_new_tokens=max_tokens,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=want_lp,
        )  # raw logits: vLLM's default logprobs mode
        if temperature > 0:
            torch.manual_seed(int(seed) if seed is not None else int(time.time_ns() % 2**31))
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        new = out.sequences[0, len(ids) :].tolist()
        finish = "length"
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
            finish = "stop"
        text = tok.decode(new, skip_special_tokens=True)
        return text, ids, new, (out.logits if want_lp else None), finish

    def _logprobs(self, new: list[int], logits, top_k: int) -> dict:
        import torch

        tok = self.hf.tok

        def entry(tid: int, lp: float) -> dict:
            s = tok.decode([tid])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = []
        for step, tid in enumerate(new):
            lsm = torch.log_softmax(logits[step][0].float(), dim=-1)
            item = entry(tid, float(lsm[tid]))
            vals, idx = lsm.topk(top_k) if top_k else (torch.empty(0), torch.empty(0, dtype=torch.long))
            item["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(vals, idx)]
            content.append(item)
        return {"content": content}


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"bad message: {m!r}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise APIError(400, "message content must be text", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


class _Handler(BaseHTTPRequestHandler):
    server_version = "cai-test-openai/0.1"

    def log_message(self, *args):  # quiet: pytest output stays readable
        pass

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        api: OpenAIServer = self.server.api
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, api.models())
        else:
            self._send(404, APIError(404, f"no route {self.path}", "NotFoundError").body())

    def do_POST(self):
        api: OpenAIServer = self.server.api
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, APIError(404, f"no route {self.path}", "NotFoundError").body())
            return
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except json.JSONDecodeError as e:
            self._send(400, APIError(400, f"invalid JSON: {e}").body())
            return
        api.enter(req)
        try:
            if api.delay:
                time.sleep(api.delay)
            self._send(200, api.chat(req))
        except APIError as e:
            self._send(e.status, e.body())
        except Exception as e:  # a bug in the test server: say so, as a 500
            self._send(500, APIError(500, f"{type(e).__name__}: {e}", "InternalServerError").body())
        finally:
            api.leave()


@contextmanager
def serve(model, **options):
    """Serve ``model`` (a model folder, or an HFBackend to share) at http://127.0.0.1:PORT/v1.

    options: name, logprobs, continue_final_message, max_logprobs, delay (see OpenAIServer).
    """
    from cai.backends.hf import HFBackend

    hf = model if isinstance(model, HFBackend) else HFBackend(str(model), batch_size=1, device="cpu")
    api = OpenAIServer(hf, **options)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.api = api
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = BaseURL(f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    url.server = api
    try:
        yield url
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
