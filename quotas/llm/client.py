"""The quota-aware wrapper of the official ``openai`` client (sync).

``wrap(OpenAI(...), user=request.user).chat.completions.create(...)`` takes and returns what
the SDK's does. Per call: the user's budget is reserved (once per rung: retries never charge
twice), the provider's shared state admits the call (or holds it back, or refuses), the SDK
is called with retries (``quotas.llm.retries``), the answer's headers teach every process,
and the reservation is settled with the answer's ``usage`` (streams: when they end or are
closed) or refunded when the call failed.
"""

from __future__ import annotations

import time
from typing import Any

from openai.types.chat import ChatCompletion

from quotas import services
from quotas.llm.calls import CallOptions, LogicalCall, Rung, label, with_options
from quotas.llm.errors import RungRefused
from quotas.llm.retries import retrying
from quotas.llm.streams import CachedStream, MeteredStream, cached_chunks
from quotas.llm.usage import Hold

__all__ = ["QuotaClient"]


class QuotaClient:
    """The wrapped client: ``chat.completions.create`` is quota-aware; every other attribute
    is the SDK client's own (not metered)."""

    def __init__(self, client: Any, options: CallOptions) -> None:
        self._original = client
        self._client = client.with_options(max_retries=0)  # retries are ours (no multiplying)
        self._options = options
        self.chat = _Chat(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def create(self, arguments: dict[str, Any], **changes: Any) -> Any:
        """One logical call through the ladder (see ``quotas.llm.calls``)."""
        return self.create_with(LogicalCall(with_options(self._options, **changes), arguments))

    def complete_unsettled(self, arguments: dict[str, Any]) -> tuple[Any, Hold]:
        """A non-streamed call whose caller settles the reservation itself (deferred jobs:
        the answer is saved first); the model rungs only."""
        call = LogicalCall(with_options(self._options, settle=False, degrade=False), arguments)
        answer = self.create_with(call)
        assert call.hold is not None
        return answer, call.hold

    def create_with(self, call: LogicalCall) -> Any:
        """Try each rung of the call's ladder until one serves."""
        for rung in call.rungs():
            try:
                answer = self._serve(call, rung)
            except RungRefused as refusal:
                call.refused(refusal)
                continue
            call.note_served(rung)
            return answer
        raise call.failure()

    def _serve(self, call: LogicalCall, rung: Rung) -> Any:
        if rung.kind == "cache":
            return cached_answer(call, rung, call.from_cache())
        if rung.kind == "defer":
            raise call.defer()
        hold, admission = self._hold(call, rung)
        try:
            raw = self._send(call, rung, hold, admission)
        except BaseException:
            hold.refund()
            raise
        answer = raw.parse()
        if not call.stream:
            return call.served(rung, hold, answer)
        call.attach(hold)
        return MeteredStream(
            answer,
            lambda usage, text, whole: call.stream_ended(hold, usage, text, whole),
            show_usage=call.wants_usage_chunk(),
            rung=rung.label,
        )

    def _hold(self, call: LogicalCall, rung: Rung) -> tuple[Hold, Any]:
        """The provider's admission, then the user's reservation (the admission given back
        when the reservation is refused)."""
        estimate = call.estimate(rung)
        tokens = call.provider_tokens(rung, estimate)
        admission = self._admit(call, rung, tokens)
        try:
            return call.reserve(rung, estimate, tokens), admission
        except BaseException:
            call.release(rung, tokens, admission)
            raise

    def _send(self, call: LogicalCall, rung: Rung, hold: Hold, admission: Any) -> Any:
        admitted = [admission]  # the first attempt was admitted before the user's reservation
        for attempt in retrying(call.deadline):
            with attempt:
                go = admitted.pop() if admitted else self._admit(call, rung, hold.tokens)
                return self._attempt(call, rung, hold, go)
        raise AssertionError("tenacity ends with an answer or an error")  # pragma: no cover

    def _admit(self, call: LogicalCall, rung: Rung, tokens: int) -> Any:
        """Wait until the provider's shared state admits the call; its admission."""
        patience = call.patience()
        while True:
            admission = services.admit_call(call.options.provider, rung.model, tokens)
            wait = call.admission_wait(admission, rung, tokens, patience)
            if wait is None:
                return admission
            time.sleep(wait)
            patience -= wait

    def _attempt(self, call: LogicalCall, rung: Rung, hold: Hold, admission: Any) -> Any:
        completions = self._client.chat.completions.with_raw_response
        try:
            raw = completions.create(**call.sdk_arguments(rung))
        except BaseException as exc:
            call.observe(rung, hold, admission, exc, None)
            raise
        call.observe(rung, hold, admission, None, raw.headers)
        return raw


def cached_answer(call: LogicalCall, rung: Rung, answer: dict[str, Any]) -> Any:
    """A cached answer as the SDK would return it: a ``ChatCompletion``, or a stream."""
    if call.stream:
        return CachedStream(cached_chunks(answer, show_usage=call.wants_usage_chunk()), rung.label)
    return label(ChatCompletion.model_validate(answer), rung)


class _Completions:
    def __init__(self, owner: QuotaClient) -> None:
        self._owner = owner

    def create(
        self, *, degrade: bool | None = None, deadline: float | None = None, **arguments: Any
    ) -> Any:
        """The SDK's ``chat.completions.create``, quota-aware. ``degrade``: let the plan's
        ladder serve when the requested model refuses; ``deadline``: seconds this call may
        take in all (retries and waits included)."""
        return self._owner.create(arguments, degrade=degrade, deadline_seconds=deadline)


class _Chat:
    def __init__(self, owner: QuotaClient) -> None:
        self.completions = _Completions(owner)
