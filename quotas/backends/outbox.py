"""The ledger's side of the store: the outboxes where settles and expiry leave ledger records
until their rows are written, the registries that find them without ``SCAN``, and the
dead letters of records the database refused. Framework-free; mixed into
``RedisWindowStore``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from quotas.backends.records import LedgerEntry, as_text
from quotas.backends.scripts import ScriptRunner
from quotas.exceptions import StoreUnavailable

__all__ = ["DEAD_LETTER_TTL_MS", "LedgerOutbox"]

logger = logging.getLogger("quotas")
# Ledger records the database refused wait this long for an operator (30 days).
DEAD_LETTER_TTL_MS = 30 * 24 * 3600 * 1000


class LedgerOutbox:
    """Outbox, registry and dead-letter operations of a store (see ``RedisWindowStore``)."""

    client: Redis
    prefix: str
    scripts: ScriptRunner
    keys: Callable[[str], list[str]]
    scope_of: Callable[[bytes | str, str], str]
    _call: Callable[..., Any]

    @property
    def backlog_key(self) -> str:
        """The registry of outboxes with records waiting for their rows (see _window.lua)."""
        return f"{self.prefix}:ledger:backlog"

    @property
    def due_key(self) -> str:
        """The registry of pending reservations' earliest deadlines (see _window.lua)."""
        return f"{self.prefix}:ledger:due"

    def backlog_key_for(self, scope: str) -> str:
        """The backlog registry the scripts of ``scope`` keep (one per key prefix here; one
        per hash slot on Redis Cluster, where a script reaches only its own slot)."""
        return self.backlog_key

    def due_key_for(self, scope: str) -> str:
        """The due registry the scripts of ``scope`` keep (see ``backlog_key_for``)."""
        return self.due_key

    def outbox(self, scope: str, *, batch: int = 500) -> list[LedgerEntry]:
        """Up to about ``batch`` ledger records whose rows are not yet acknowledged."""
        key = self.keys(scope)[4]
        entries: list[LedgerEntry] = []
        cursor = 0
        while True:
            reply: Any = self._call(self.client.hscan, key, cursor, count=batch)
            cursor, records = int(reply[0]), reply[1]
            entries += self._parsed(scope, records)
            if not cursor or len(entries) >= batch:
                return entries

    def _parsed(self, scope: str, records: dict[Any, Any]) -> list[LedgerEntry]:
        """The outbox records that parse; one that does not (never written by these scripts)
        is set aside in the dead-letter hash, so it cannot stop the sweep of the others."""
        entries = []
        for rid, rec in records.items():
            try:
                entries.append(LedgerEntry.parse(scope, rid, rec))
            except (ValueError, TypeError) as exc:
                reason = f"unreadable outbox record ({exc})"
                logger.error("quotas: %s %s of %s set aside", reason, as_text(rid), scope)
                record = json.dumps({"record": as_text(rec)[:1000], "reason": reason})
                self.dead_letter(scope, as_text(rid), record)
        return entries

    def dead_letter(self, scope: str, reservation_id: str, record: str) -> None:
        """Keep a ledger record whose row the database refused (``record``: its fields and
        the reason, as JSON) where an operator can read it, for ``DEAD_LETTER_TTL_MS``, and
        drop it from the outbox so no sweep tries it again."""
        key = self.dead_letter_key(scope)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, reservation_id, record)
        pipe.pexpire(key, DEAD_LETTER_TTL_MS)
        pipe.hdel(self.keys(scope)[4], reservation_id)
        self._call(pipe.execute)

    def dead_letter_key(self, scope: str) -> str:
        """The hash of one quota key's refused ledger records (id -> JSON)."""
        return f"{self.prefix}:{{{scope}}}:dead"

    def dead_letters(self, scope: str) -> dict[str, dict[str, Any]]:
        """The refused ledger records of one quota key, by reservation id."""
        raw: Any = self._call(self.client.hgetall, self.dead_letter_key(scope))
        return {as_text(rid): json.loads(as_text(record)) for rid, record in raw.items()}

    def ack_outbox(
        self, scope: str, reservation_ids: Sequence[str], *, now_ms: int | None = None
    ) -> int:
        """Forget outbox records once their ledger rows are written; return the records left.

        Also keeps the backlog registry true (an empty outbox leaves it), so call it after a
        sweep found nothing too."""
        override = "" if now_ms is None else str(int(now_ms))
        keys = [self.keys(scope)[4], self.backlog_key_for(scope)]
        return int(self.scripts.run("ack", keys, [override, *reservation_ids]))

    def ack_outboxes(self, reservation_ids: Mapping[str, Sequence[str]]) -> None:
        """``ack_outbox`` for several quota keys in one round trip (a pipeline; acknowledging
        twice changes nothing)."""
        if len(reservation_ids) == 1:  # one key: one script call, no pipeline
            [(scope, ids)] = reservation_ids.items()
            self.ack_outbox(scope, ids)
            return
        calls = [
            ([self.keys(scope)[4], self.backlog_key], ["", *ids])
            for scope, ids in reservation_ids.items()
        ]
        for reply in self.scripts.run_many("ack", calls):
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"Redis error: {reply}")

    def backlog(self, *, now_ms: int | None = None) -> tuple[int, float | None]:
        """The ledger's backlog: outboxes holding records not yet written as rows, and how
        many seconds the oldest of those records has waited (``None``: nothing waits)."""
        override = "" if now_ms is None else str(int(now_ms))
        count, since, now = self.scripts.run("backlog", [self.backlog_key], [override])
        waited = None if int(since) < 0 else max(int(now) - int(since), 0) / 1000
        return int(count), waited

    def backlog_scopes(self) -> Iterator[str]:
        """Quota keys whose outbox holds records (the backlog registry)."""
        try:
            for key in self.client.zscan_iter(self.backlog_key, count=1000):
                yield self.scope_of(key[0], "x")
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def due_scopes(self, *, limit: int = 100_000, now_ms: int | None = None) -> list[str]:
        """Quota keys holding reservations past their deadline (the due registry)."""
        override = "" if now_ms is None else str(int(now_ms))
        keys = self.scripts.run("due", [self.due_key], [override, limit])
        return [self.scope_of(key, "p") for key in keys]

    def claim_scan(self, every_seconds: int) -> bool:
        """True at most once per ``every_seconds`` per prefix (and after Redis lost its data):
        the caller then also finds keys by SCAN, for keys the registries do not know."""
        marker = f"{self.prefix}:ledger:scanned"
        return bool(self._call(self.client.set, marker, 1, nx=True, ex=every_seconds))

    def iter_window_keys(self) -> Iterator[str]:
        """Every primary token window hash, by SCAN (never KEYS): for background jobs only."""
        pattern = f"{_glob_escape(self.prefix)}:{{*}}:w"
        try:
            for key in self.client.scan_iter(match=pattern, count=1000, _type="HASH"):
                yield key.decode() if isinstance(key, bytes) else key
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    def iter_scopes(self, suffix: str) -> Iterator[str]:
        """Quota keys that have a key with this suffix (e.g. ``"p"``: pending reservations)."""
        pattern = f"{_glob_escape(self.prefix)}:{{*}}:{suffix}"
        try:
            for key in self.client.scan_iter(match=pattern, count=1000):
                yield self.scope_of(key, suffix)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a ``SCAN MATCH`` pattern (a cache prefix may hold any
    character)."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
