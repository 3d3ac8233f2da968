"""The async twins of the Python API: ``areserve``, ``asettle``, ``arefund``, ``abudget_for``.

Each is its sync twin with the Redis round trips awaited on ``redis.asyncio``
(``quotas.backends.aio``): the same Lua scripts with the same arguments, the same circuit
breaker (one per process, shared with the sync path), the same failure policy and the same
ledger path. What is not Redis runs where it cannot stall the event loop:

- the user's limits come from this process's memory; reading them from the database (the
  first request of a user, or after an edit) runs in a worker thread;
- rebuilding a window from the ledger (Redis lost it) runs in a worker thread;
- the ledger record joins this process's ledger batch on the loop (a batch it fills wakes
  the batch's own thread), unless ``LEDGER_BATCH_SECONDS = 0`` (each is sent at once) or a
  receiver of ``usage_settled`` is connected (it may block): then from a worker thread;
- signals (``quota_exceeded``, ``usage_settled``...) are sent on the event loop, as Django
  sends signals: receivers that do I/O should hand it off.

Worker threads are asgiref's ``sync_to_async(thread_sensitive=False)``: they never queue
behind the request's own sync code; each has its own database connection, closed (or kept,
per ``CONN_MAX_AGE``) after each call as Django does after a request.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from quotas.backends.aio import AsyncRedisWindowStore, async_client_for
from quotas.conf import quota_settings
from quotas.core.bounds import check_model_name, check_reservation_id, check_token_figure
from quotas.core.decisions import Counter, Decision, DecisionStatus, Peek
from quotas.engine.budgets import _budget_dict
from quotas.engine.config import QuotaConfig, configs
from quotas.engine.counters import all_counters, primary_index
from quotas.engine.plans import User, config_for, scope_for
from quotas.engine.reservations import (
    STALE_RETRIES,
    Ask,
    Request,
    _degraded,
    _outcome,
    ask_for,
    reserve_arguments,
)
from quotas.engine.runtime import get_breaker, get_store, per_process
from quotas.engine.seeding import counter_seeds
from quotas.engine.settlement import _finish_settle, _settle_job, _SettleJob
from quotas.engine.types import Reservation, Settlement
from quotas.exceptions import RequestTooLarge, StoreUnavailable
from quotas.signals import usage_settled

__all__ = ["abudget_for", "aget_store", "aguarded", "arefund", "areserve", "asettle"]

T = TypeVar("T")


def in_thread(fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """``fn`` run in a worker thread (never on the event loop); the thread's database
    connection is then closed or kept as ``CONN_MAX_AGE`` says, as at the end of a request."""

    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)


def aget_store() -> AsyncRedisWindowStore:
    """This process's async store for the running event loop (a ``redis.asyncio`` client
    belongs to one loop), on the same django-redis alias as ``get_store``."""
    loop = asyncio.get_running_loop()
    stores: weakref.WeakKeyDictionary[Any, AsyncRedisWindowStore] = per_process(
        "async_stores", weakref.WeakKeyDictionary
    )
    store = stores.get(loop)
    if store is None:
        sync = get_store()
        store = stores[loop] = AsyncRedisWindowStore(sync, async_client_for(sync.client))
    return store


async def aguarded(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """``guarded`` for coroutines: through the same breaker; an open breaker fails at once."""
    breaker = get_breaker()
    if not breaker.allow():
        raise StoreUnavailable("Redis circuit breaker is open.")
    try:
        result = await fn(*args, **kwargs)
    except StoreUnavailable:
        breaker.record_failure()
        raise
    breaker.record_success()
    return result


async def areserve(
    user: User | None,
    tokens: int,
    *,
    model: str = "",
    request_id: str | None = None,
    client_address: str | None = None,
    add_default_output: bool = False,
    prompt_tokens: int | None = None,
) -> Reservation:
    """``reserve`` for coroutines: the same arguments, result and exceptions."""
    check_token_figure(tokens, "tokens", minimum=0)
    check_model_name(model)
    scope = scope_for(user, client_address)
    rid = f"{scope}/{request_id or secrets.token_hex(16)}"
    if request_id:
        check_reservation_id(rid)
    request = Request(
        user, client_address, scope, rid, model, tokens, add_default_output, prompt_tokens
    )
    try:
        ask, decision = await aguarded(_adecide, request)
    except StoreUnavailable:
        if quota_settings.FAILURE_POLICY == "closed":
            raise
        return await in_thread(_degraded)(request)
    return _outcome(request, ask, decision)


async def asettle(
    reservation_or_id: Reservation | str,
    *,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    total_tokens: int | None = None,
    status: str = "settled",
) -> Settlement:
    """``settle`` for coroutines: the same arguments and result; idempotent by id."""
    figures = (prompt_tokens, completion_tokens, total_tokens, status)
    if isinstance(reservation_or_id, Reservation):
        job = _settle_job(reservation_or_id, *figures)
    else:  # rebuilt from what Redis and the database know of it
        job = await in_thread(_settle_job)(reservation_or_id, *figures)
    result = await _astore_settle(job)
    outcome = await _afinish(job, result)
    if isinstance(reservation_or_id, Reservation):
        reservation_or_id.settlements.append(outcome)
    return outcome


async def arefund(reservation_or_id: Reservation | str) -> Settlement:
    """``refund`` for coroutines: give back the whole reservation."""
    return await asettle(reservation_or_id, total_tokens=0, status="refunded")


async def abudget_for(user: User) -> dict[str, Any]:
    """``budget_for`` for coroutines: the same dict."""
    config = await _aconfig_for(user, None)
    scope = scope_for(user)
    counters = all_counters(config, scope)
    try:
        peek = await aguarded(_asnapshot, scope, config, counters)
    except StoreUnavailable:
        return _budget_dict(config, counters, None)
    return _budget_dict(config, counters, peek)


async def _astore_settle(job: _SettleJob) -> Any:
    """The store's settle, tried twice: it is idempotent by id, and on a busy event loop a
    reply can be read after the socket timeout has fired (the settle did run)."""
    store, arguments = aget_store(), job.store_arguments()
    try:
        return await aguarded(store.settle, **arguments)
    except StoreUnavailable:
        pass
    try:
        return await aguarded(store.settle, **arguments)
    except StoreUnavailable as exc:
        return exc


async def _afinish(job: _SettleJob, result: Any) -> Settlement:
    if quota_settings.LEDGER_BATCH_SECONDS > 0 and not usage_settled.has_listeners(Reservation):
        # Nothing left that can block: the record joins the batch without sending it (a
        # batch it fills wakes the batch's thread) and no receiver runs. One thread hop
        # less per settle.
        return _finish_settle(job, result, on_loop=True)
    # In a worker thread: with LEDGER_BATCH_SECONDS = 0 every record is sent at once (a
    # broker publish, or database writes when the broker is down), and receivers of
    # usage_settled may do blocking I/O (the ORM refuses to run on an event loop).
    return await in_thread(_finish_settle)(job, result)


async def _aconfig_for(user: User | None, address: str | None) -> QuotaConfig:
    """``config_for``: from memory, else read in a worker thread."""
    config = configs().get(scope_for(user, address))
    if config is None or not configs().version:
        config = await in_thread(config_for)(user, address)
    return config


async def _adecide(request: Request) -> tuple[Ask, Decision]:
    """``reservations._decide``, awaited (see there)."""
    store = aget_store()
    for _ in range(STALE_RETRIES):
        config = await _aconfig_for(request.user, request.address)
        try:
            ask = ask_for(request, config)
        except RequestTooLarge:
            if await _astill_current(store, config):
                raise
            continue
        decision = await _asend(store, request, ask, {})
        if decision.status is DecisionStatus.NEEDS_SEED:
            team = ask.config.team.id if ask.config.team else None
            counters = ask.charges.counters
            seeds = await in_thread(counter_seeds)(request.scope, team, counters, decision.unbuilt)
            decision = await _asend(store, request, ask, seeds)
        if decision.status is not DecisionStatus.STALE_CONFIG:
            return ask, decision
        configs().stale(decision.version)
    raise StoreUnavailable("The limits kept changing during the decision.")


async def _astill_current(store: AsyncRedisWindowStore, config: QuotaConfig) -> bool:
    version = await store.current_version()
    if version == config.version:
        return True
    configs().stale(version)
    return False


async def _asend(store: AsyncRedisWindowStore, request: Request, ask: Ask, seeds: dict) -> Decision:
    """``reservations._send``, awaited."""
    args, kwargs = reserve_arguments(request, ask, seeds)
    return await store.reserve(*args, **kwargs)


async def _asnapshot(scope: str, config: QuotaConfig, counters: tuple[Counter, ...]) -> Peek:
    """``budgets.snapshot``, awaited."""
    store, primary = aget_store(), primary_index(counters)
    peek = await store.peek(scope, counters, primary=primary)
    if peek.unbuilt:
        team = config.team.id if config.team else None
        seeds = await in_thread(counter_seeds)(scope, team, counters, peek.unbuilt)
        peek = await store.peek(scope, counters, primary=primary, seeds=seeds)
    return peek
