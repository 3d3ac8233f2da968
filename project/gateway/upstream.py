"""Forwarding to an upstream OpenAI-compatible API (``settings.GATEWAY["UPSTREAM_URL"]``).

Non-streaming only. Every failure (unreachable, timeout, an HTTP error, a body that is not a
JSON object) becomes one ``UpstreamError`` whose message says what went wrong, so the view can
answer 502 and the quota middleware refunds the reservation.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = ["UpstreamError", "complete_upstream"]


class UpstreamError(Exception):
    """The upstream API did not give a usable answer."""


def complete_upstream(
    body: Mapping[str, Any], *, base_url: str, api_key: str, timeout: float
) -> dict[str, Any]:
    """POST ``body`` to ``<base_url>/chat/completions``; its JSON answer, or ``UpstreamError``."""
    request = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers=_headers(api_key),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise UpstreamError(f"The upstream API answered HTTP {exc.code}: {_excerpt(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout
        reason = getattr(exc, "reason", exc)
        raise UpstreamError(f"The upstream API could not be reached: {reason}.") from exc
    return _json_object(raw)


def _headers(api_key: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _excerpt(exc: urllib.error.HTTPError) -> str:
    """The upstream's own error message when it sent one, else the start of its body."""
    try:
        raw = exc.read(2000)
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        return raw.decode(errors="replace").strip() or exc.reason
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise UpstreamError("The upstream API answered with a body that is not JSON.") from exc
    if not isinstance(payload, dict):
        raise UpstreamError("The upstream API answered with JSON that is not an object.")
    return payload
