"""A tiny OpenAI-compatible HTTP server for tests (stdlib only, 127.0.0.1, random free port).

Serves `/v1/chat/completions` and `/v1/completions`. Each request takes the next status from `script`
(200 once the script is used up), so tests can say "429, then 200" and count what the client sent.

Each misbehaviour is a switch: `delay_s` (every answer late), `script` (429s, 500s, ...), `hang` (never
answer), `gate` (hold every answer until the test calls `srv.open_gate()`), `count_tokens` (the server's own
token count of each prompt, instead of the fixed `prompt_tokens`), and `n_ctx` (a llama.cpp-like context
window: served at `GET /props`, and a prompt over it is refused with HTTP 400 as llama.cpp does).

`scoring=True` makes it a vLLM-shaped scorer without a model: `POST /tokenize` splits text into characters (id
= 2 + code point mod 500, after a BOS id 1), and `/completions` with `echo` + `logprobs` or `prompt_logprobs`
returns fixed, finite log-probabilities per token id (`fake_logprob`). `corrupt(path, body, payload)` may
replace any 200 reply: return a dict (sent as JSON, NaN and Infinity written as the bare literals a careless
server sends), `(content_type, bytes)` (sent raw: HTML, cut-off JSON, nothing), or None to leave it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    """Context manager: `with FakeOpenAIServer(script=[429, 200]) as srv: ... srv.base_url ...`.

    `requests` records every request (path, lower-cased headers, JSON body); `max_in_flight` the most concurrent ones.
    Replies echo the last message (chat) or the prompt (completions) as `echo: ...`, with fixed usage
    (`prompt_tokens`, `completion_tokens`). Error replies carry `retry-after-ms: 10` so client backoff is
    tiny, and a 401 echoes the bearer token back, as careless servers do, to test redaction.
    """

    def __init__(
        self,
        script: list[int] | None = None,
        delay_s: float = 0.0,
        prompt_tokens: int = 11,
        completion_tokens: int = 7,
        hang: bool = False,
        gate: bool = False,
        count_tokens=None,
        n_ctx: int | None = None,
        error_messages: dict[int, str] | None = None,
        scoring: bool = False,
        corrupt=None,
    ):
        self.script = list(script or [])
        self.delay_s = delay_s
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.hang = hang
        self.count_tokens = count_tokens
        self.n_ctx = n_ctx
        self.error_messages = dict(error_messages or {})
        self.scoring = scoring
        self.corrupt = corrupt
        self._gate = threading.Event()
        if not gate:
            self._gate.set()
        self._closing = threading.Event()
        self.requests: list[dict] = []
        self.gets: list[str] = []
        self.answered: list[dict] = []
        """Every 200 reply sent, with its usage (what a paying client was billed)."""
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                    status = server.script.pop(0) if server.script else 200
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    while server.hang or not server._gate.is_set():
                        if server._closing.is_set():
                            return
                        time.sleep(0.02)
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    code, payload = server._reply(
                        self.path, status, body, self.headers.get("Authorization", "")
                    )
                finally:
                    with server._lock:
                        server.in_flight -= 1
                if code == 200:
                    with server._lock:
                        if "usage" in payload:
                            server.answered.append({"body": body, "usage": payload["usage"]})
                    bad = server.corrupt(self.path, body, payload) if server.corrupt else None
                    if isinstance(bad, tuple):
                        self._send_raw(200, bad[0], bad[1])
                        return
                    payload = payload if bad is None else bad
                self._send(code, payload)

            def do_GET(self) -> None:
                with server._lock:
                    server.gets.append(self.path)
                if self.path == "/props" and server.n_ctx:
                    self._send(200, {"default_generation_settings": {"n_ctx": server.n_ctx}, "total_slots": 1})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "error"}})

            def _send(self, code: int, payload: dict) -> None:
                self._send_raw(code, "application/json", json.dumps(payload).encode())

            def _send_raw(self, code: int, content_type: str, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if code >= 400:
                    self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def open_gate(self) -> None:
        """Let held requests (`gate=True`) be answered, and every later one at once."""
        self._gate.set()

    @property
    def posts(self) -> int:
        """Completion requests received (what a paying client would be billed for, if answered)."""
        with self._lock:
            return len(self.requests)

    @property
    def billed_tokens(self) -> int:
        """Input + output tokens of every answered request, by the server's own count."""
        with self._lock:
            return sum(a["usage"]["total_tokens"] for a in self.answered)

    def __exit__(self, *exc) -> None:
        assert self._httpd is not None
        self._closing.set()
        self._gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _reply(self, path: str, status: int, body: dict, auth: str) -> tuple[int, dict]:
        if status != 200:
            message = {
                400: "Invalid value for 'temperature'",
                401: f"Incorrect API key provided: {auth.removeprefix('Bearer ')}",
                403: "You do not have access to this model",
                404: f"The model `{body.get('model')}` does not exist",
                429: "Rate limit reached",
            }.get(status, "Internal server error")
            message = self.error_messages.get(status, message)
            return status, {"error": {"message": message, "type": "error", "param": None, "code": None}}
        if self.scoring and path == "/tokenize":
            return 200, {"count": len(fake_tokenize(body["prompt"])), "tokens": fake_tokenize(body["prompt"])}
        if self.scoring and path.endswith("/completions") and (body.get("echo") or body.get("prompt_logprobs")):
            return 200, fake_scoring_reply(body)
        text = body.get("prompt") if "prompt" in body else [m["content"] for m in body.get("messages", [])]
        prompt_tokens = self.count_tokens(text) if self.count_tokens else self.prompt_tokens
        if self.n_ctx and prompt_tokens > self.n_ctx:
            return 400, {"error": {"message": f"the request exceeds the available context size ({prompt_tokens} "
                                   f"tokens > {self.n_ctx})", "type": "invalid_request_error", "code": 400}}
        completion_tokens = min(self.completion_tokens, int(body.get("max_tokens") or self.completion_tokens))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        common = {"id": "x-1", "created": 0, "model": body.get("model", ""), "usage": usage}
        if path.endswith("/chat/completions"):
            last = body["messages"][-1]["content"]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo: {last}"},
                "finish_reason": "stop",
            }
            return 200, {**common, "object": "chat.completion", "choices": [choice]}
        if path.endswith("/completions"):
            choice = {
                "index": 0,
                "text": f"echo: {body['prompt']}",
                "finish_reason": "length",
                "logprobs": None,
            }
            return 200, {**common, "object": "text_completion", "choices": [choice]}
        return 404, {"error": {"message": f"no route {path}", "type": "error", "param": None, "code": None}}


def fake_tokenize(text: str) -> list[int]:
    """The scoring fake's tokenizer: BOS (1), then one id per character."""
    return [1] + [2 + ord(c) % 500 for c in text]


def fake_logprob(token: int) -> float:
    """The scoring fake's log-probability of `token` wherever it appears (finite, below 0)."""
    return -(0.1 + (token % 13) / 10)


def fake_scoring_reply(body: dict) -> dict:
    """vLLM's shape for echo + logprobs (and `prompt_logprobs: k` when asked) over one prompt or a batch."""
    prompts = body["prompt"]
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    k = body.get("prompt_logprobs")
    choices, n_tokens = [], 0
    for i, p in enumerate(prompts):
        ids = fake_tokenize(p) if isinstance(p, str) else list(p)
        n_tokens += len(ids)
        texts = ["" if t == 1 else chr((t - 2) % 500) for t in ids]
        choice = {"index": i, "text": "".join(texts) + "x", "finish_reason": "length"}
        if body.get("echo"):
            choice["logprobs"] = {"tokens": texts + ["x"], "token_logprobs": [None] + [fake_logprob(t) for t in ids[1:]]
                                  + [-0.5], "top_logprobs": None, "text_offset": None}
        if k:
            plp: list = [None]
            for t in ids[1:]:
                entry = {str(t): {"logprob": fake_logprob(t), "rank": 1, "decoded_token": "t"}}
                for r in range(1, int(k)):
                    entry[str(600 + r)] = {"logprob": fake_logprob(t) - r, "rank": r + 1, "decoded_token": "o"}
                plp.append(entry)
            choice["prompt_logprobs"] = plp
        choices.append(choice)
    usage = {"prompt_tokens": n_tokens, "completion_tokens": len(prompts), "total_tokens": n_tokens + len(prompts)}
    return {"id": "s-1", "object": "text_completion", "created": 0, "model": body.get("model", ""),
            "choices": choices, "usage": usage}


def interruptible() -> None:
    """Popen's preexec_fn for a child the test sends SIGINT: a shell that starts the suite in the background (a
    script's `make test &`) hands it SIGINT ignored, and Python then keeps it ignored in every child, so Ctrl-C
    would never reach the command under test. The child gets the default disposition, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
