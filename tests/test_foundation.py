"""Tests of the demo project's foundation: offline token counting, demo seeding, Redis finding."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from project.devtools.redis_server import (
    ensure_redis,
    redis_answers,
    start_private_redis,
)
from quotas.models import Plan, UserQuota
from tests.support import refusing_port

OFFLINE_COUNT_SCRIPT = textwrap.dedent(
    """
    import socket

    def refuse(*args, **kwargs):
        raise OSError("networking is disabled in this test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import time

    from quotas.core.tokens import encoding_for_model, get_encoding

    enc = get_encoding("cl100k_base")
    print(len(enc.encode("hello world")))
    print(len(enc.encode("The quick brown fox jumps over the lazy dog.")))
    started = time.monotonic()
    fallback = encoding_for_model("gpt-4o")  # o200k_base is not shipped: falls back at once
    print(fallback.name, time.monotonic() - started < 5)
    """
)


def test_tiktoken_counts_cl100k_without_network(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"}
    }
    env["TMPDIR"] = str(tmp_path)  # hides tiktoken's default cache of earlier downloads
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_COUNT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "10", "cl100k_base", "True"]


def seeded_counts() -> tuple[int, int, int, int]:
    return (
        Plan.objects.count(),
        get_user_model().objects.count(),
        UserQuota.objects.count(),
        Token.objects.count(),
    )


@pytest.mark.django_db
def test_seed_demo_is_idempotent() -> None:
    call_command("seed_demo", stdout=io.StringIO())
    first = seeded_counts()
    token = Token.objects.get(user__username="demo").key

    out = io.StringIO()
    call_command("seed_demo", "--print-token", stdout=out)

    assert first == (3, 2, 1, 1)
    assert seeded_counts() == first
    assert out.getvalue().strip() == token
    assert Plan.objects.get(is_default=True).slug == "free"
    assert UserQuota.objects.get(user__username="demo").plan.slug == "free"
    assert get_user_model().objects.get(username="admin").is_superuser


@pytest.mark.django_db
def test_seed_demo_keeps_plans_edited_in_the_admin() -> None:
    call_command("seed_demo", stdout=io.StringIO())
    Plan.objects.filter(slug="pro").update(tokens_per_hour=123_456)

    call_command("seed_demo", stdout=io.StringIO())

    assert Plan.objects.get(slug="pro").tokens_per_hour == 123_456


@pytest.mark.integration
def test_ensure_redis_uses_a_redis_url_that_answers(tmp_path: Path) -> None:
    with start_private_redis(tmp_path) as server:
        url, handle = ensure_redis(server.url, default_url=None)

    assert (url, handle) == (server.url, None)


@pytest.mark.integration
def test_ensure_redis_starts_embedded_server_when_nothing_answers(tmp_path: Path) -> None:
    with refusing_port() as first, refusing_port() as second:
        url, handle = ensure_redis(
            f"redis://127.0.0.1:{first}/0",
            default_url=f"redis://127.0.0.1:{second}/0",
            data_dir=tmp_path,
        )
    try:
        assert handle is not None
        redis.Redis.from_url(url).set("k", "v")
        assert redis.Redis.from_url(url).get("k") == b"v"
    finally:
        if handle is not None:
            handle.stop()

    assert not redis_answers(url)


@pytest.mark.integration
def test_ensure_redis_skips_the_default_address_when_its_probe_says_so(tmp_path: Path) -> None:
    probed: list[str] = []

    def probe(url: str) -> bool:
        probed.append(url)
        return url != "redis://127.0.0.1:6379/0" and redis_answers(url)

    url, handle = ensure_redis(None, probe=probe, data_dir=tmp_path)
    try:
        assert handle is not None
        assert url != "redis://127.0.0.1:6379/0"
        assert probed[0] == "redis://127.0.0.1:6379/0"
    finally:
        if handle is not None:
            handle.stop()


@pytest.mark.integration
def test_private_redis_restarts_on_the_same_port_with_empty_data(tmp_path: Path) -> None:
    server = start_private_redis(tmp_path)
    try:
        redis.Redis.from_url(server.url).set("k", "v")
        server.stop()
        assert not redis_answers(server.url)

        server.start()

        assert redis.Redis.from_url(server.url).get("k") is None
    finally:
        server.stop()
