"""WSGI middleware of the demo: every request body is read in full, within a deadline, before
Django sees it.

- A client that declares more ``Content-Length`` than it sends, or sends it too slowly, gets
  ``408`` after ``GATEWAY["BODY_TIMEOUT_SECONDS"]`` instead of holding a worker thread (and,
  with gunicorn's sync workers, ending in its 500 page).
- A body that ends before its ``Content-Length`` (the client closed) is a ``400``.
- A chunked body (``Transfer-Encoding: chunked``, which Django's WSGI handler reads as empty)
  is read here, up to the body limit, and handed on with its length.
- A body declared larger than the limit is not read: the view refuses it from its length.

Deadlines need the socket, which gunicorn puts in the environ; under another server the body
is still read in full, without a deadline. In production a buffering proxy in front (nginx)
does this job for every slow client; see the README's deployment notes.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["RequestBodyGuard"]

CHUNK_BYTES = 65_536
Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class BodyUnreadable(Exception):
    """The body could not be read in full: answered with ``status`` and this message."""

    def __init__(self, status: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class RequestBodyGuard:
    """Reads the request body before the application does (see the module docstring)."""

    def __init__(
        self, app: WSGIApp, *, limit: Callable[[], int], timeout: Callable[[], float]
    ) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        declared = _declared_length(environ)
        if not chunked and (not declared or declared > self.limit()):
            return self.app(environ, start_response)  # nothing to read, or refused unread
        try:
            body = self._read(environ, declared if not chunked else None)
        except BodyUnreadable as exc:
            return _error(start_response, exc)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)  # what follows is no longer chunked
        return self.app(environ, start_response)

    def _read(self, environ: Environ, declared: int | None) -> bytes:
        sock = environ.get("gunicorn.socket")
        deadline = time.monotonic() + self.timeout()
        try:
            return self._read_until(environ["wsgi.input"], sock, deadline, declared)
        except TimeoutError as exc:
            raise BodyUnreadable(
                "408 Request Timeout",
                "request_timeout",
                f"The request body did not arrive within {self.timeout():g} s.",
            ) from exc
        except OSError as exc:
            raise BodyUnreadable(
                "400 Bad Request", "request_body_unreadable", "The request body broke off."
            ) from exc
        finally:
            if isinstance(sock, socket.socket):
                sock.settimeout(None)  # back to what the server expects

    def _read_until(self, stream: Any, sock: Any, deadline: float, declared: int | None) -> bytes:
        """Read the body: ``declared`` bytes, or to its end (chunked) up to the limit + 1."""
        wanted = declared if declared is not None else self.limit() + 1
        parts: list[bytes] = []
        got = 0
        while got < wanted:
            if isinstance(sock, socket.socket):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            part = stream.read(min(CHUNK_BYTES, wanted - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        self._check(got, declared)
        return b"".join(parts)

    def _check(self, got: int, declared: int | None) -> None:
        if declared is not None and got < declared:
            raise BodyUnreadable(
                "400 Bad Request",
                "request_body_incomplete",
                f"The request body ended after {got} of the {declared} bytes its "
                "Content-Length announced.",
            )
        if declared is None and got > self.limit():
            raise BodyUnreadable(
                "400 Bad Request",
                "request_body_too_large",
                f"The chunked request body is over the {self.limit()}-byte limit.",
            )


def _declared_length(environ: Environ) -> int | None:
    value = environ.get("CONTENT_LENGTH") or ""
    return int(value) if value.isdigit() else None


def _error(start_response: StartResponse, exc: BodyUnreadable) -> list[bytes]:
    """The error in the app's JSON shape; the connection closes (the rest of the body, if any,
    is never read)."""
    message = str(exc)
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": exc.code}
    body = json.dumps({"detail": message, "error": error}).encode()
    start_response(
        exc.status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    return [body]
