"""What settling needs to know of a reservation: the object itself, or (settling by id alone)
what Redis keeps of it, with the counters it was charged to; and the cost of its real usage.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from django.contrib.auth import get_user_model

from quotas.core.decisions import Counter
from quotas.core.pricing import Price
from quotas.core.types import QuotaState
from quotas.engine.counters import counter_for, tag_of
from quotas.engine.plans import config_for
from quotas.engine.runtime import get_store, guarded, now_ms, window_spec
from quotas.engine.types import Reservation
from quotas.exceptions import QuotaError, StoreUnavailable

__all__ = ["actual_cost", "reservation_of"]


def reservation_of(reservation_or_id: Reservation | str) -> Reservation:
    """The reservation to settle: the object, or one rebuilt from its id and what Redis
    keeps of it (its estimate, cost, model, team, and the counters it charged, which the
    user's current limits give back). An id Redis does not know settles nothing anew."""
    if isinstance(reservation_or_id, Reservation):
        return reservation_or_id
    rid = str(reservation_or_id)
    scope, sep, _ = rid.partition("/")
    if not sep or not scope:
        raise ValueError(f"Not a reservation id: {reservation_or_id!r}.")
    bare = Reservation(
        id=rid,
        scope=scope,
        user_id=int(scope) if scope.isdigit() else None,
        model="",
        estimated_tokens=0,
        reserved_at_ms=now_ms(),
        state=QuotaState(0, 0, 0.0, window_spec().window_seconds),
    )
    try:
        record = guarded(get_store().pending_record, scope, rid)
    except StoreUnavailable:
        return bare  # the settle fails over to the ledger, as any settle does
    if record is None:
        return bare  # settled or expired already: the settle changes nothing
    return _rebuilt(bare, record)


def _rebuilt(bare: Reservation, record: dict[str, Any]) -> Reservation:
    counters, price, primary = _counters_of(bare, record)
    return replace(
        bare,
        model=record["model"],
        estimated_tokens=record["tokens"],
        reserved_at_ms=record["reserved_at"],
        estimated_cost=record["cost"],
        team=record["team"],
        counters=counters,
        primary=primary,
        price=price,
    )


def _counters_of(
    bare: Reservation, record: dict[str, Any]
) -> tuple[tuple[Counter, ...], Price | None, int]:
    """The counters named in the record, from the user's current limits (a limit removed
    since is gone: nothing to correct there); the current price of the model (settling by
    id alone cannot know the one at reserve time)."""
    try:
        config = config_for(_user(bare.user_id), None if bare.user_id else _address(bare))
    except QuotaError:
        return (), None, 0
    wanted = set(record["counters"])
    counters = []
    for limit in config.layers:
        counter = counter_for(limit, tag_of(limit, bare.scope, config))
        if counter.name in wanted:
            counters.append(counter)
    primary = next((i for i, c in enumerate(counters, 1) if c.limit.counter == "w"), 0)
    price = config.prices.price_for(record["model"])[0] if config.prices else None
    return tuple(counters), price, primary


def _user(user_id: int | None) -> Any:
    return get_user_model().objects.filter(pk=user_id).first() if user_id else None


def _address(bare: Reservation) -> str | None:
    """The client address of an anonymous quota key (as ``scope_for`` made it)."""
    scope = bare.scope
    return scope.removeprefix("anon-") if scope.startswith("anon-") else None


def actual_cost(
    reservation: Reservation, prompt: int | None, completion: int | None, total: int | None
) -> int | None:
    """Micro-dollars of the real usage at the price the reservation was made at; ``None``
    when no usage is known (the estimate stands) or no price applies."""
    price = reservation.price
    if price is None or total is None:
        return None
    if prompt is not None and completion is not None:
        return price.cost(prompt, completion)
    if prompt is not None or completion is not None:
        given = prompt if prompt is not None else total - (completion or 0)
        return price.cost(max(given, 0), max(total - given, 0))
    estimate_prompt = reservation.prompt_tokens
    if estimate_prompt is not None:
        used_prompt = min(estimate_prompt, total)
        return price.cost(used_prompt, total - used_prompt)
    dearer = max(price.input_per_million, price.output_per_million)
    return Price("", dearer, dearer).cost(total, 0)
