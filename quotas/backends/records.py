"""The store's records, as the Lua scripts write them: a reservation's ledger record in the
outbox (``LedgerEntry``) and one consistent read of a window for the audit
(``WindowContents``). Framework-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LedgerEntry", "WindowContents", "as_text", "parse_pending"]


@dataclass(frozen=True)
class LedgerEntry:
    """A reservation's ledger record, waiting in the outbox for its row: settled (``status``
    "settled", "refunded" or "degraded", with the actual usage) or "expired" (reached its TTL
    unsettled: charged at its estimate, ``settled_at_ms`` is ``None``)."""

    scope: str
    reservation_id: str
    status: str
    estimate: int
    actual: int
    reserved_at_ms: int
    settled_at_ms: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str = ""
    estimated_cost: int = 0
    cost: int = 0
    team: str = ""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> LedgerEntry:
        """The entry of a ``services.usage_payload`` dict (what the Celery task receives)."""
        return cls(
            scope=str(payload["scope"]),
            reservation_id=str(payload["request_id"]),
            status=str(payload["status"]),
            estimate=int(payload["estimated_tokens"]),
            actual=int(payload["actual_tokens"]),
            reserved_at_ms=int(payload["reserved_at_ms"]),
            settled_at_ms=payload.get("settled_at_ms"),
            prompt_tokens=payload.get("prompt_tokens"),
            completion_tokens=payload.get("completion_tokens"),
            model=str(payload.get("model") or ""),
            estimated_cost=int(payload.get("estimated_cost") or 0),
            cost=int(payload.get("cost") or 0),
            team=str(payload.get("team") or ""),
        )

    @classmethod
    def parse(cls, scope: str, rid: bytes | str, rec: bytes | str) -> LedgerEntry:
        """Read an outbox record as ``settle.lua`` (``s2:``; ``s:`` before layered limits)
        or ``expire.lua`` (``e:``, then the reservation record) wrote it."""
        text = as_text(rec)
        if text.startswith(("s:", "s2:")):
            return cls._settled(scope, as_text(rid), text)
        if text.startswith("e:"):  # expire.lua's: "e:<moved at ms>:" + the pending record
            text = text.split(":", 2)[2]
        held = parse_pending(text)
        tokens = held["tokens"]
        return cls(
            scope,
            as_text(rid),
            "expired",
            tokens,
            tokens,
            held["reserved_at"],
            model=held["model"],
            estimated_cost=held["cost"],
            cost=held["cost"],
            team=held["team"],
        )

    @classmethod
    def _settled(cls, scope: str, rid: str, text: str) -> LedgerEntry:
        if text.startswith("s2:"):
            fields = text.split(":", 11)
            estimated_cost, cost, team = int(fields[8] or 0), int(fields[9] or 0), fields[10]
        else:
            fields = text.split(":", 8)
            estimated_cost, cost, team = 0, 0, ""
        estimate, actual, reserved_at, settled_at, prompt, completion, status = fields[1:8]
        return cls(
            scope,
            rid,
            status,
            int(estimate),
            int(actual),
            int(reserved_at),
            int(settled_at),
            int(prompt) if prompt else None,
            int(completion) if completion else None,
            fields[-1],
            estimated_cost,
            cost,
            team,
        )


@dataclass(frozen=True)
class WindowContents:
    """One consistent read of a token window, for the audit.

    ``epoch`` is empty when the window was never built or was lost (nothing else is read).
    ``buckets`` maps bucket index to tokens (non-empty live buckets only); ``pending`` maps
    reservation ids to ``(bucket index, estimate)``; ``outbox`` holds the ledger records not
    yet written as rows.
    """

    epoch: str
    now_ms: int
    first_bucket: int
    current_bucket: int
    buckets: dict[int, int]
    pending: dict[str, tuple[int, int]]
    outbox: list[LedgerEntry]
    reset_ms: int = 0


def as_text(value: bytes | str) -> str:
    """A Redis reply's bytes as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_pending(text: str) -> dict[str, Any]:
    """A reservation record as reserve.lua writes it (see ``parse_pending`` in _window.lua):
    ``bucket``, ``tokens``, ``reserved_at``, ``cost``, ``team``, ``counters`` (names),
    ``model``. Records made before layered limits have no cost, team or counters."""
    if text.startswith("v2:"):
        _, bucket, tokens, at, cost, team, counters, model = text.split(":", 7)
    else:
        bucket, tokens, at, model = text.split(":", 3)
        cost, team, counters = "0", "", ""
    return {
        "bucket": int(bucket),
        "tokens": int(tokens),
        "reserved_at": int(at),
        "cost": int(cost or 0),
        "team": team,
        "counters": [name for name in counters.split(",") if name],
        "model": model,
    }
