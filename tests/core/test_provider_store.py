"""The provider store's scripts on the real Redis, with the clock given: what a provider's
headers teach every process, the adaptive rate and the breaker."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from quotas.backends.provider import AdmitStatus, Outcome, ProviderStore, ProviderTuning
from quotas.core.ratelimits import ProviderHeaders

TUNING = ProviderTuning(breaker_failures=2, breaker_open_ms=1000, backoff_ms=500)


@pytest.fixture
def store(redis_client: Any, isolated_quotas: str) -> ProviderStore:
    return ProviderStore(redis_client, prefix=isolated_quotas)


@pytest.fixture
def model() -> str:
    return f"m-{uuid.uuid4().hex[:6]}"


def admit(store: ProviderStore, model: str, at: int) -> Any:
    return store.admit("p", model, 10, TUNING, now_ms=at)


def answer(store: ProviderStore, model: str, admission: Any, at: int, remaining: int,
           reset_ms: int, outcome: Outcome = Outcome.OK) -> None:  # fmt: skip
    headers = ProviderHeaders(requests_limit=10, requests_remaining=remaining,
                              requests_reset_ms=reset_ms)  # fmt: skip
    store.observe("p", model, outcome, 10, probe=admission.probe, headers=headers,
                  tuning=TUNING, admitted_at_ms=admission.admitted_at_ms, now_ms=at)  # fmt: skip


def learn_window(store: ProviderStore, model: str, at: int = 0) -> None:
    """The first call goes alone and brings the provider's figures: 9 of 10 left."""
    probe = admit(store, model, at)
    assert probe.admitted and probe.probe
    assert admit(store, model, at + 1).status is AdmitStatus.PROBING
    answer(store, model, probe, at + 10, remaining=9, reset_ms=5000)


def test_answers_out_of_order_never_cost_capacity(store, model):
    learn_window(store, model)
    calls = [admit(store, model, 100 + i) for i in range(5)]  # 4 left, 5 in flight
    # The fifth call the provider took answers first (the others are still in flight).
    answer(store, model, calls[4], 200, remaining=4, reset_ms=4800)
    answer(store, model, calls[0], 210, remaining=8, reset_ms=4800)
    assert [admit(store, model, 300 + i).admitted for i in range(5)] == [True] * 4 + [False]


def test_someone_else_using_the_key_lowers_what_is_left(store, model):
    learn_window(store, model)
    call = admit(store, model, 100)  # 8 left as we count
    answer(store, model, call, 200, remaining=3, reset_ms=4800)  # the provider says 3
    assert [admit(store, model, 300 + i).admitted for i in range(4)] == [True] * 3 + [False]


def test_a_late_answer_from_the_last_window_does_not_touch_the_new_one(store, model):
    learn_window(store, model)
    late = admit(store, model, 100)  # answered only after the window ended
    probe = admit(store, model, 5100)  # the window ended: one call goes to learn the next
    assert probe.admitted and probe.probe
    answer(store, model, probe, 5150, remaining=9, reset_ms=5000)  # 9 left, minus `late`
    answer(store, model, late, 5200, remaining=0, reset_ms=4800)  # the old window's figure
    assert [admit(store, model, 5300 + i).admitted for i in range(9)] == [True] * 8 + [False]


def test_held_back_until_the_providers_window_resets(store, model):
    learn_window(store, model)
    for i in range(9):
        assert admit(store, model, 100 + i).admitted
    refused = admit(store, model, 1000)
    assert refused.status is AdmitStatus.NO_REQUESTS_LEFT
    assert refused.wait_seconds == pytest.approx(4.01, abs=0.001)  # until 10 + 5000 ms


def test_a_429_backs_every_caller_off_then_paces_and_recovers(store, model):
    learn_window(store, model)
    call = admit(store, model, 100)
    answer(store, model, call, 150, remaining=8, reset_ms=4800, outcome=Outcome.LIMITED)
    backing = admit(store, model, 200)
    assert backing.status is AdmitStatus.BACKING_OFF and backing.wait_seconds == 0.45
    [state] = store.states()
    assert state.adaptive_rate and state.adaptive_rate == state.rate_before_cut * 0.5


def test_the_breaker_opens_after_failures_and_one_probe_closes_it(store, model):
    learn_window(store, model)
    for at in (100, 200):
        call = admit(store, model, at)
        answer(store, model, call, at + 50, remaining=-1, reset_ms=-1, outcome=Outcome.FAILED)
    assert admit(store, model, 300).status is AdmitStatus.BREAKER_OPEN
    probe = admit(store, model, 1300)  # open for 1000 ms after the failure at 250
    assert probe.admitted and probe.probe
    assert admit(store, model, 1301).status is AdmitStatus.PROBING
    answer(store, model, probe, 1350, remaining=5, reset_ms=3000)
    assert admit(store, model, 1400).admitted
