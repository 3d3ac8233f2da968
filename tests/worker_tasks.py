"""A task the tests' Celery workers can run: one request's reserve and settle, as a host's
task that calls an LLM makes them."""

from __future__ import annotations

from celery import shared_task
from django.contrib.auth import get_user_model

from quotas import services


@shared_task(name="tests.reserve_and_settle")
def reserve_and_settle(user_id: int, tokens: int) -> str:
    reservation = services.reserve(get_user_model().objects.get(pk=user_id), tokens)
    services.settle(reservation, total_tokens=tokens)
    return reservation.id
