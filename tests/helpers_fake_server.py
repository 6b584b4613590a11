"""A tiny OpenAI-compatible HTTP server for tests (stdlib only, 127.0.0.1, random free port).

Serves `/v1/chat/completions` and `/v1/completions`. Each request takes the next status from `script`
(200 once the script is used up), so tests can say "429, then 200" and count what the client sent.
"""

from __future__ import annotations

import json
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
        error_messages: dict[int, str] | None = None,
    ):
        self.script = list(script or [])
        self.delay_s = delay_s
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.error_messages = dict(error_messages or {})
        self.requests: list[dict] = []
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
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    code, payload = server._reply(
                        self.path, status, body, self.headers.get("Authorization", "")
                    )
                finally:
                    with server._lock:
                        server.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
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

    def __exit__(self, *exc) -> None:
        assert self._httpd is not None
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
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
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
