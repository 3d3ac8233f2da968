"""A fake OpenAI-compatible upstream: ``POST /v1/chat/completions`` answered by the demo's
deterministic fake model, behind rate limits of its own, as a real provider behaves.

- Limits: requests and tokens per fixed window (``--window`` seconds, default 60), per model
  (``--rpm``, ``--tpm``, ``--model-limits '{"gpt-4o": {"rpm": 20, "tpm": 8000}}'``). A
  request is charged its prompt plus the completion it will get. Every answer carries
  ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (requests
  and tokens); over a limit the answer is a 429 with ``retry-after-ms`` and ``retry-after``
  (until the window ends) and OpenAI's error body.
- Streams (``"stream": true``): server-sent events, one chunk every ``--pace`` seconds, the
  usage chunk when ``stream_options.include_usage`` asks for it.
- Modes, set at start or at run time with ``POST /_control`` (JSON): ``{"mode": "fail"}``
  answers 500 (``"fail_status"``), ``{"mode": "hang"}`` holds each request
  ``"hang_seconds"`` (default 3600) before closing it unanswered, ``{"mode": "normal"}``;
  ``"fail_count": n`` fails only the next n requests, ``"retry_after_ms"`` adds that header to
the failures; ``"pace"``, ``"first_byte_seconds"`` (a wait before a stream's first byte, as a
  model thinks), ``"answer_tokens"`` and
  ``"reset": true`` (new windows, zero counters) too. ``GET /_stats`` counts what happened
  (the chat requests by client too: ``agent:AsyncOpenAI``, the product of their
  ``User-Agent``).

Standard library only (plus the demo's fake model), one thread per connection:
``python -m project.fake_upstream --port 8100``; ``--port 0`` picks a free port, and the
first line printed is ``listening on <port>``.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from project.fake_upstream.limits import Decision, ModelLimits, RateLimiter, duration
from project.gateway import fake_model

__all__ = ["FakeUpstream", "main"]


class FakeUpstream(ThreadingHTTPServer):
    """The server: its limiter, its mode and its counters."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], limiter: RateLimiter, **mode: Any) -> None:
        super().__init__(address, Handler)
        self.limiter = limiter
        self.lock = threading.Lock()
        self.mode: dict[str, Any] = {
            "mode": "normal",
            "fail_status": 500,
            "fail_count": None,
            "retry_after_ms": None,
            "hang_seconds": 3600.0,
            "pace": 0.0,
            "first_byte_seconds": 0.0,
            "answer_tokens": 60,
        }
        self.mode.update(mode)
        self.stats: Counter[str] = Counter()

    def control(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the mode (see the module docstring); the mode after the change."""
        with self.lock:
            if changes.pop("reset", False):
                self.limiter.reset()
                self.stats.clear()
            self.mode.update(changes)
            return dict(self.mode)

    def failure_now(self) -> str | None:
        """``"fail"`` or ``"hang"`` when this request is to fail, else ``None``."""
        with self.lock:
            mode = self.mode["mode"]
            if mode == "normal":
                return None
            count = self.mode.get("fail_count")
            if count is not None:
                if count <= 0:
                    return None
                self.mode["fail_count"] = count - 1
            return str(mode)

    def count(self, *names: str) -> None:
        with self.lock:
            self.stats.update(names)


class Handler(BaseHTTPRequestHandler):
    server: FakeUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/_stats":
            with self.server.lock:
                self._json(200, dict(self.server.stats))
            return
        self._json(404, _error("Not found.", "invalid_request_error", "not_found"))

    def do_POST(self) -> None:
        body = self._body()
        if self.path.rstrip("/") == "/_control":
            self._json(200, self.server.control(body if isinstance(body, dict) else {}))
            return
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._json(404, _error("Not found.", "invalid_request_error", "not_found"))
            return
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            self._json(400, _error("A JSON body with a model.", "invalid_request_error", None))
            return
        agent = str(self.headers.get("User-Agent") or "").split("/")[0] or "unknown"
        self.server.count("requests", f"requests:{body['model']}", f"agent:{agent}")
        failure = self.server.failure_now()
        if failure == "hang":
            self.server.count("hung")
            time.sleep(float(self.server.mode["hang_seconds"]))
            self.close_connection = True
            return
        if failure == "fail":
            self.server.count("failed")
            status = int(self.server.mode["fail_status"])
            advice = self.server.mode.get("retry_after_ms")
            headers = {"retry-after-ms": str(advice)} if advice is not None else {}
            message = "The fake upstream failed on purpose."
            self._json(status, _error(message, "server_error", None), headers)
            return
        self._complete(body)

    def _complete(self, body: dict[str, Any]) -> None:
        model = body["model"]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        answer = fake_model.answer(
            model,
            body,
            natural_tokens=int(self.server.mode["answer_tokens"]),
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        )
        decision = self.server.limiter.decide(model, answer.usage["total_tokens"])
        headers = _limit_headers(decision)
        if not decision.allowed:
            self.server.count("limited", f"limited:{model}")
            wait = decision.reset_seconds
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["retry-after"] = str(max(math.ceil(wait), 1))
            message = f"Rate limit reached for {model} on {decision.kind}; try again later."
            self._json(429, _error(message, decision.kind, "rate_limit_exceeded"), headers)
            return
        self.server.count("served", f"served:{model}", f"tokens:{model}")
        if body.get("stream"):
            self._stream(body, answer, headers)
        else:
            self._json(200, _completion(answer), headers)

    def _stream(self, body: dict[str, Any], answer: Any, headers: dict[str, str]) -> None:
        first_byte = float(self.server.mode["first_byte_seconds"])
        if first_byte:
            time.sleep(first_byte)
        self.send_response(200)
        for name, value in {**headers, "Content-Type": "text/event-stream"}.items():
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        options = body.get("stream_options") or {}
        pace = float(self.server.mode["pace"])
        try:
            for chunk in _chunks(answer, include_usage=bool(options.get("include_usage"))):
                self._send_chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                if pace:
                    time.sleep(pace)
            self._send_chunk(b"data: [DONE]\n\n")
            self._send_chunk(b"")
        except OSError:  # the client went away
            self.close_connection = True

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return None

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {**(headers or {}), "Content-Type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", uuid.uuid4().hex)
        self.end_headers()
        self.wfile.write(data)


def _limit_headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    reset = duration(decision.reset_seconds)
    if decision.limits.rpm:
        headers["x-ratelimit-limit-requests"] = str(decision.limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(decision.requests_left)
        headers["x-ratelimit-reset-requests"] = reset
    if decision.limits.tpm:
        headers["x-ratelimit-limit-tokens"] = str(decision.limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(decision.tokens_left)
        headers["x-ratelimit-reset-tokens"] = reset
    return headers


def _error(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _completion(answer: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": answer.text, "refusal": None}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage,
    }


def _chunks(answer: Any, *, include_usage: bool) -> list[dict[str, Any]]:
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": answer.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in answer.pieces]
    chunks.append(chunk({}, answer.finish_reason))
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer.usage})
    return chunks


def build(argv: list[str] | None = None) -> FakeUpstream:
    """The server the command line describes (bound, not yet serving)."""
    parser = argparse.ArgumentParser(prog="python -m project.fake_upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--rpm", type=int, default=60, help="requests per window (0: none)")
    parser.add_argument("--tpm", type=int, default=40_000, help="tokens per window (0: none)")
    parser.add_argument("--window", type=float, default=60.0, help="window length, seconds")
    parser.add_argument("--model-limits", default="{}", help='{"model": {"rpm": n, "tpm": n}}')
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between stream chunks")
    parser.add_argument("--answer-tokens", type=int, default=60)
    parser.add_argument("--mode", choices=("normal", "fail", "hang"), default="normal")
    args = parser.parse_args(argv)
    per_model = {
        name: ModelLimits(int(v.get("rpm", 0)), int(v.get("tpm", 0)))
        for name, v in json.loads(args.model_limits).items()
    }
    limiter = RateLimiter(ModelLimits(args.rpm, args.tpm), per_model, window=args.window)
    return FakeUpstream(
        (args.host, args.port),
        limiter,
        mode=args.mode,
        pace=args.pace,
        answer_tokens=args.answer_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    server = build(argv)
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
