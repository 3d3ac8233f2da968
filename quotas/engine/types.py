"""What the engine hands to its callers: a ``Reservation`` (tokens held for one request) and
a ``Settlement`` (what settling it did)."""

from __future__ import annotations

from dataclasses import dataclass, field

from quotas.core.decisions import Counter
from quotas.core.pricing import Price
from quotas.core.types import QuotaState

__all__ = ["DEGRADED_EPOCH", "Reservation", "Settlement"]

# The epoch of reservations served while Redis was unavailable (real epochs are hex).
DEGRADED_EPOCH = "degraded"


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one request until it is settled.

    ``state`` (and ``limit``, ``remaining``, ``reset_seconds``) describe the user's budget
    right after this reservation; ``degraded`` is true when Redis was unavailable and the
    request was let through under the fail-open policy (its usage still goes to the ledger).
    """

    id: str
    scope: str
    user_id: int | None
    model: str
    estimated_tokens: int
    reserved_at_ms: int
    state: QuotaState
    epoch: str = ""
    plan_slug: str = ""
    degraded: bool = False
    # The layers it was charged to (each counter with its amount), the primary's 1-based
    # index among them, and what settling needs to price the real usage: the cost charged
    # (micro-dollars), the prompt part of the estimate, the price at reserve time (which
    # wins at settle, so a price edit never re-prices a request in flight), the team.
    counters: tuple[Counter, ...] = ()
    primary: int = 0
    estimated_cost: int = 0
    prompt_tokens: int | None = None
    price: Price | None = None
    team: str = ""
    # Whether it holds one of the user's concurrent-request slots (the plan has
    # ``max_concurrent_requests``): the slot is freed by the settle.
    holds_slot: bool = False
    # What ``settle`` made of this object: a later automatic settle (the middleware's, after a
    # view settled itself) then knows there is nothing left to do, without asking Redis.
    settlements: list[Settlement] = field(default_factory=list, compare=False, repr=False)

    @property
    def limit(self) -> int:
        return self.state.limit

    @property
    def remaining(self) -> int:
        return self.state.remaining

    @property
    def reset_seconds(self) -> float:
        return self.state.reset_seconds


@dataclass(frozen=True)
class Settlement:
    """What a settle did. ``settled_now`` is false for a repeated settle (nothing changed);
    ``remaining`` is ``None`` when Redis could not be reached (the ledger still has the row)."""

    reservation_id: str
    estimated_tokens: int
    actual_tokens: int
    applied_tokens: int
    settled_now: bool
    remaining: int | None
    # Every limit's figures after the settle (``None`` when Redis could not be reached).
    state: QuotaState | None = None
    cost: int = 0
