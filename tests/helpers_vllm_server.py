"""A test server that answers exactly in vLLM's response shapes, computed by a local transformers model.

Stdlib HTTP on 127.0.0.1 (random free port). It serves what Stillroom's server scoring and served teacher use:

* `POST /tokenize` (vLLM's `TokenizeRequest` / `TokenizeResponse`: `count`, `max_model_len`, `tokens`);
* `POST /v1/completions` (vLLM's `CompletionRequest` / `CompletionResponse`): `prompt` as text, a list of texts,
  a list of token ids or a list of such lists; `echo`, `logprobs`, `prompt_logprobs`, `max_tokens` (greedy).

Shapes follow vLLM's `completion/protocol.py` and `completion/serving.py`: with `echo` the prompt's own tokens
come first in `logprobs` (the first one `null`: nothing predicts it), then the generated ones; `top_logprobs[i]`
holds the actual token plus the top n (n + 1 entries, by decoded string); `prompt_logprobs` is a list with `null`
first, then one `{token_id: {logprob, rank, decoded_token}}` map per prompt token (the actual token first, then
the top k); echo with `logprobs` implies `prompt_logprobs = logprobs`. More log-probabilities than
`max_logprobs` (vLLM's default 20) is a 400 with vLLM's wording. Log-probabilities are a float32 log-softmax of
the model's logits, like the local backend's.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class VLLMShapedServer:
    """Context manager: `with VLLMShapedServer(model, tokenizer) as srv: ... srv.base_url ...`.

    `requests` records (path, body) of every request. `echo=False` imitates llama.cpp's server, which ignores
    `echo` and returns log-probabilities of generated tokens only; `tokenize=False` drops `/tokenize`.
    """

    def __init__(self, model, tokenizer, *, name: str = "served-model", max_logprobs: int = 20,
                 max_model_len: int = 2048, echo: bool = True, tokenize: bool = True):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.echo_supported, self.tokenize_supported = echo, tokenize
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> VLLMShapedServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with server._lock:
                    server.requests.append((self.path, body))
                try:
                    code, payload = server._route(self.path, body)
                except _BadRequest as exc:
                    code, payload = 400, _error(str(exc), 400)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------------------------------------ routes

    def _route(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/tokenize" and self.tokenize_supported:
            ids = self._encode(body["prompt"], body.get("add_special_tokens", True))
            strs = self.tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
            return 200, {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}
        if path == "/v1/completions":
            return 200, self._completions(body)
        return 404, _error(f"Not Found: {path}", 404)

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _decode(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def _completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [self._encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt:
            prompts = [self._encode(p) if isinstance(p, str) else list(p) for p in prompt]
        else:
            raise _BadRequest("Either prompt or prompt_embeds must be provided and non-empty.")
        n_lp = body.get("logprobs")
        echo = bool(body.get("echo")) and self.echo_supported
        n_plp = body.get("prompt_logprobs")
        if n_plp is None and echo:
            n_plp = n_lp  # vLLM: echo with logprobs asks for prompt log-probabilities of the same size
        if n_lp is not None and n_lp > self.max_logprobs:
            raise _BadRequest(f"Requested sample logprobs of {n_lp}, which is greater than max allowed: "
                              f"{self.max_logprobs}")
        if n_plp is not None and n_plp > self.max_logprobs:
            raise _BadRequest(f"Requested prompt logprobs of {n_plp}, which is greater than max allowed: "
                              f"{self.max_logprobs}")
        max_tokens = int(body.get("max_tokens", 16) if body.get("max_tokens") is not None else 16)
        choices, n_prompt, n_gen = [], 0, 0
        for ids in prompts:
            if len(ids) + max_tokens > self.max_model_len:
                raise _BadRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                  f"you requested {len(ids) + max_tokens} tokens.")
            prompt_lps, gen_ids, gen_lps = self._run(ids, n_plp, n_lp, max_tokens)
            if echo and max_tokens == 0:
                token_ids, out_lps = ids, prompt_lps
            elif echo:
                token_ids = ids + gen_ids
                out_lps = None if n_lp is None else prompt_lps + gen_lps
            else:
                token_ids, out_lps = gen_ids, gen_lps
            text = "".join(self._decode(t) for t in gen_ids)
            if echo:
                text = self.tokenizer.decode(ids) + text
            logprobs = self._completion_logprobs(token_ids, out_lps, n_lp) if n_lp is not None else None
            choices.append({
                "index": len(choices), "text": text, "logprobs": logprobs,
                "finish_reason": "length", "stop_reason": None, "token_ids": None,
                "prompt_logprobs": prompt_lps if n_plp is not None else None, "prompt_token_ids": None,
            })
            n_prompt += len(ids)
            n_gen += len(gen_ids)
        return {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": body.get("model"),
                "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                              "total_tokens": n_prompt + n_gen}}

    @torch.no_grad()
    def _run(self, ids: list[int], n_plp: int | None, n_lp: int | None, max_tokens: int):
        """(prompt_logprobs list, generated ids, their logprob maps): one forward per token, float32."""
        with self._lock:
            seq = list(ids)
            logits = self.model(input_ids=torch.tensor([seq])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            prompt_lps: list = [None]
            for pos in range(1, len(ids)):
                prompt_lps.append(self._entry(logp[pos - 1], ids[pos], n_plp or 0))
            gen_ids, gen_lps = [], []
            for _ in range(max_tokens):
                nxt = int(logp[-1].argmax())
                gen_lps.append(self._entry(logp[-1], nxt, n_lp or 0))
                gen_ids.append(nxt)
                seq.append(nxt)
                if len(gen_ids) < max_tokens:
                    logp = torch.log_softmax(self.model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
            return prompt_lps, gen_ids, gen_lps

    def _entry(self, row: torch.Tensor, actual: int, k: int) -> dict:
        """vLLM's per-position map: the actual token first (its true rank), then the top k by rank."""
        lp = float(row[actual])
        out = {str(actual): {"logprob": lp, "rank": int((row > row[actual]).sum()) + 1,
                             "decoded_token": self._decode(actual)}}
        if k:
            top = row.topk(min(k, row.numel()))
            for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1):
                out[str(t)] = {"logprob": float(v), "rank": r, "decoded_token": self._decode(t)}
        return out

    def _completion_logprobs(self, token_ids: list[int], lps: list | None, n: int) -> dict:
        """vLLM's `_create_completion_logprobs`: text_offset, token_logprobs, tokens, top_logprobs (n + 1 each)."""
        offsets, token_lps, tokens, tops = [], [], [], []
        last = 0
        for i, tok in enumerate(token_ids):
            step = lps[i] if lps is not None else None
            token = self._decode(tok)
            if step is None:
                token_lps.append(None)
                tops.append(None)
            else:
                token_lps.append(max(step[str(tok)]["logprob"], -9999.0))
                tops.append({v["decoded_token"]: max(v["logprob"], -9999.0)
                             for j, v in enumerate(step.values()) if n >= j})
            tokens.append(token)
            offsets.append(0 if not offsets else offsets[-1] + last)
            last = len(token)
        return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


class _BadRequest(Exception):
    pass


def _error(message: str, code: int) -> dict:
    return {"error": {"message": message, "type": "BadRequestError" if code == 400 else "NotFoundError",
                      "param": None, "code": code}}
