"""The quota-aware wrapper of ``openai.AsyncOpenAI``: ``QuotaClient``'s twin for coroutines.

The provider call, the waits and the stream are asynchronous; the quota steps (estimate,
reserve, admit, settle) are the sync client's, run with ``asgiref.sync.sync_to_async`` (in
the thread Django gives sync code called from async code) until the engine has async twins.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import sync_to_async

from quotas import services
from quotas.llm.calls import CallOptions, LogicalCall, Rung, with_options
from quotas.llm.client import cached_answer
from quotas.llm.errors import RungRefused
from quotas.llm.retries import async_retrying
from quotas.llm.streams import AsyncMeteredStream
from quotas.llm.usage import Hold

__all__ = ["AsyncQuotaClient"]


class AsyncQuotaClient:
    """The wrapped async client: ``await chat.completions.create(...)`` is quota-aware;
    every other attribute is the SDK client's own."""

    def __init__(self, client: Any, options: CallOptions) -> None:
        self._original = client
        self._client = client.with_options(max_retries=0)
        self._options = options
        self.chat = _AsyncChat(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    async def create(self, arguments: dict[str, Any], **changes: Any) -> Any:
        """One logical call through the ladder (see ``quotas.llm.calls``)."""
        call = LogicalCall(with_options(self._options, **changes), arguments)
        rungs = [call.first_rung()]
        for rung in rungs:  # grows once: the ladder is read after the first refusal
            try:
                answer = await self._serve(call, rung)
            except RungRefused as refusal:
                call.refused(refusal)
            else:
                call.note_served(rung)
                return answer
            if len(call.refusals) == 1:
                rungs += await sync_to_async(call.lower_rungs)()
        raise call.failure()

    async def _serve(self, call: LogicalCall, rung: Rung) -> Any:
        if rung.kind == "cache":
            return cached_answer(call, rung, await sync_to_async(call.from_cache)())
        if rung.kind == "defer":
            raise await sync_to_async(call.defer)()
        hold, admission = await self._hold(call, rung)
        try:
            raw = await self._send(call, rung, hold, admission)
        except BaseException:
            await sync_to_async(hold.refund)()
            raise
        answer = raw.parse()
        if not call.stream:
            return await sync_to_async(call.served)(rung, hold, answer)
        await sync_to_async(call.attach)(hold)  # may refund the request's own reservation
        ended = sync_to_async(call.stream_ended)
        return AsyncMeteredStream(
            answer,
            lambda usage, text, whole: ended(hold, usage, text, whole),
            show_usage=call.wants_usage_chunk(),
            rung=rung.label,
        )

    async def _hold(self, call: LogicalCall, rung: Rung) -> tuple[Hold, Any]:
        estimate = await sync_to_async(call.estimate)(rung)
        tokens = await sync_to_async(call.provider_tokens)(rung, estimate)
        admission = await self._admit(call, rung, tokens)
        try:
            return await sync_to_async(call.reserve)(rung, estimate, tokens), admission
        except BaseException:
            await sync_to_async(call.release)(rung, tokens, admission)
            raise

    async def _send(self, call: LogicalCall, rung: Rung, hold: Hold, admission: Any) -> Any:
        admitted = [admission]  # the first attempt was admitted before the user's reservation
        async for attempt in async_retrying(call.deadline):
            with attempt:
                go = admitted.pop() if admitted else await self._admit(call, rung, hold.tokens)
                return await self._attempt(call, rung, hold, go)
        raise AssertionError("tenacity ends with an answer or an error")  # pragma: no cover

    async def _admit(self, call: LogicalCall, rung: Rung, tokens: int) -> Any:
        patience = call.patience()
        admit = sync_to_async(services.admit_call)
        while True:
            admission = await admit(call.options.provider, rung.model, tokens)
            wait = call.admission_wait(admission, rung, tokens, patience)
            if wait is None:
                return admission
            await asyncio.sleep(wait)
            patience -= wait

    async def _attempt(self, call: LogicalCall, rung: Rung, hold: Hold, admission: Any) -> Any:
        completions = self._client.chat.completions.with_raw_response
        observe = sync_to_async(call.observe)
        try:
            raw = await completions.create(**call.sdk_arguments(rung))
        except BaseException as exc:
            await observe(rung, hold, admission, exc, None)
            raise
        await observe(rung, hold, admission, None, raw.headers)
        return raw


class _AsyncCompletions:
    def __init__(self, owner: AsyncQuotaClient) -> None:
        self._owner = owner

    async def create(
        self, *, degrade: bool | None = None, deadline: float | None = None, **arguments: Any
    ) -> Any:
        """The SDK's ``chat.completions.create``, quota-aware (see the sync client)."""
        return await self._owner.create(arguments, degrade=degrade, deadline_seconds=deadline)


class _AsyncChat:
    def __init__(self, owner: AsyncQuotaClient) -> None:
        self.completions = _AsyncCompletions(owner)
