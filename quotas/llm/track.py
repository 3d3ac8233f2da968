"""``track``: the client's bookkeeping around any other SDK's call (Anthropic, Gemini, a
home-grown HTTP client)::

    with quotas.llm.track(request.user, {"model": "gpt-4o", "messages": messages}) as usage:
        response = anthropic_client.messages.create(...)
        usage.record(response.usage)     # input_tokens / output_tokens are understood too

The estimate (a request body, or a number of tokens) is reserved on entry (``QuotaExceeded``
or ``RequestTooLarge`` when it does not fit); leaving the block settles with what was
recorded (nothing recorded: the estimate stands); an exception refunds everything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from asgiref.sync import sync_to_async

from quotas import services
from quotas.llm.usage import Hold, usage_figures

__all__ = ["TrackedUsage", "atrack", "track"]


class TrackedUsage:
    """What the tracked call used, as recorded in the block; ``reservation`` is its hold."""

    def __init__(self, hold: Hold) -> None:
        self._hold = hold
        self.reservation = hold.reservation
        self.figures: dict[str, int] = {}

    def record(
        self,
        usage: Any = None,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        total_tokens: int | None = None,
    ) -> None:
        """The call's real usage: a ``usage`` object or dict, or the figures by name."""
        given = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
        }
        named = {k: v for k, v in given.items() if v is not None}
        self.figures = usage_figures(named) if named else usage_figures(usage)


def _hold(user: Any, estimate: int | Mapping[str, Any], model: str, request_id: str | None) -> Hold:
    if isinstance(estimate, Mapping):
        figures = services.estimate(dict(estimate))
        model = model or figures.model
        reservation = services.reserve(
            user,
            figures.named_tokens,
            model=model,
            request_id=request_id,
            add_default_output=figures.output_tokens is None,
            prompt_tokens=figures.prompt_tokens,
        )
        return Hold(reservation, model, reservation.estimated_tokens, figures.prompt_tokens)
    reservation = services.reserve(user, estimate, model=model, request_id=request_id)
    return Hold(reservation, model, reservation.estimated_tokens, 0)


@contextmanager
def track(
    user: Any, estimate: int | Mapping[str, Any], *, model: str = "", request_id: str | None = None
) -> Iterator[TrackedUsage]:
    """Reserve ``estimate`` for the block; settle what it records, refund if it raises."""
    usage = TrackedUsage(_hold(user, estimate, model, request_id))
    try:
        yield usage
    except BaseException:
        usage._hold.refund()
        raise
    usage._hold.settle(usage.figures)


@asynccontextmanager
async def atrack(
    user: Any, estimate: int | Mapping[str, Any], *, model: str = "", request_id: str | None = None
) -> AsyncIterator[TrackedUsage]:
    """``track`` for ``async with`` (the quota steps run in a thread)."""
    usage = TrackedUsage(await sync_to_async(_hold)(user, estimate, model, request_id))
    try:
        yield usage
    except BaseException:
        await sync_to_async(usage._hold.refund)()
        raise
    await sync_to_async(usage._hold.settle)(usage.figures)
