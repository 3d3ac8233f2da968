"""Fuzzing the demo's ``POST /v1/chat/completions`` with generated bodies (hypothesis): no
body is answered 500, and none costs the server more than 1 s of CPU. Plus the worst bodies
we could think of, each timed.

- ``test_generated_bodies_never_fail_the_server``: a few hundred bodies through the Django
  test client (which re-raises anything a view lets escape), in the default run;
- ``test_thousands_of_generated_bodies`` (``slow``): the same with 3000 bodies;
- ``test_generated_bodies_against_a_real_gunicorn`` (``integration``): bodies sent over HTTP to
  a real server with one worker, whose own CPU time is read from ``/proc`` per request.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.fuzz_bodies import raw_bodies
from tests.gateway_server import MASTERS, running_gateway

URL = "/v1/chat/completions"
ANSWERS = {200, 400, 413, 429}
# What a body up to the size limit may cost: a bound against super-linear work (a quadratic
# pass over 1 MB would take minutes), with room for a loaded machine (the widest nested
# body once took 1.002 s of CPU in CI, where it was bounded at 1 s).
CPU_LIMIT_SECONDS = 2.0
MEGABYTE = 1_000_000


@pytest.fixture
def token(make_plan, make_user) -> str:
    plan = make_plan(tokens_per_hour=10**9, max_tokens_per_request=10**8)
    return Token.objects.create(user=make_user(plan=plan)).key


@pytest.fixture
def server_like_heap() -> Iterator[None]:
    """This process holds pytest's and hypothesis's objects besides the project's: several
    times a server worker's heap. The garbage collector's full passes over them, set off by a
    body of a few hundred thousand lists, would be charged to the request here but not in a
    server, so they are left out (``gc.freeze``); the gunicorn test below measures a real
    worker, heap and all."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def api(token, quota_config, server_like_heap) -> APIClient:
    # One client sends every body, so the rejected-attempts allowance (tested on its own) is
    # turned off: past it every body would get the same 429 and test nothing.
    quota_config(REJECTED_PER_MINUTE=0)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    # Once per process, not per body: loading the encodings (about a second for each).
    for model in ("gpt-4", "gpt-4o", "my-model"):
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        assert client.post(URL, body, format="json").status_code == 200
    return client


def answer_within_limits(client: APIClient, raw: bytes) -> float:
    started = time.process_time()
    response = client.generic("POST", URL, raw, content_type="application/json")
    if response.streaming:
        b"".join(response.streaming_content)  # a stream settles when it ends
    took = time.process_time() - started
    assert response.status_code in ANSWERS, (response.status_code, raw[:300])
    if response.status_code != 200:
        assert response.json()["error"]["message"]
    assert took < CPU_LIMIT_SECONDS, (took, raw[:300])
    return took


FUZZ = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.django_db
@settings(FUZZ, max_examples=300, derandomize=True)
@given(raw=raw_bodies)
def test_generated_bodies_never_fail_the_server(api, raw):
    answer_within_limits(api, raw)


@pytest.mark.slow
@pytest.mark.django_db
@settings(FUZZ, max_examples=3000)
@given(raw=raw_bodies)
def test_thousands_of_generated_bodies(api, raw):
    answer_within_limits(api, raw)


def _letters(count: int) -> str:
    rng = random.Random(7)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


def _chat(*messages: Any, **fields: Any) -> bytes:
    body = {"model": "gpt-4", "messages": list(messages), "max_tokens": 10, **fields}
    return json.dumps(body, separators=(",", ":")).encode()


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# The slowest bodies up to the body-size limit we could think of.
WORST = {
    "333k-empty-messages": lambda: _chat(*[{}] * 333_310),
    "2048-messages": lambda: _chat(*[_user(f"m{i}") for i in range(2048)]),
    "2049-messages": lambda: _chat(*[_user("") for _ in range(2049)]),
    "random-letters": lambda: _chat(_user(_letters(MEGABYTE - 200))),
    "spaces": lambda: _chat(_user(" " * (MEGABYTE - 200))),
    "punctuation": lambda: _chat(_user("!?" * (MEGABYTE // 2 - 100))),
    "many-parts": lambda: _chat(*[_user(["p"] * 5) for _ in range(2000)]),
    "many-images": lambda: _chat(
        _user([{"type": "image_url", "image_url": {"url": "http://x/y"}}] * 9000)
    ),
    "wide-tool-schema": lambda: _chat(_user("Hi"), tools=[[[i / 7] for i in range(45_000)]]),
    "many-small-strings": lambda: _chat(_user("Hi"), tools=[str(i) for i in range(110_000)]),
    "nested-1000": lambda: b"[" * 1000 + b"]" * 1000,
    "nested-60-then-wide": lambda: _chat(_user("Hi"), extra=[[[[]]]] * 120_000),
    "wide-nested-tools": lambda: _chat(_user("Hi"), tools=[[[[]]]] * 120_000),
    "big-data-url": lambda: _chat(
        _user(
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 990_000}}]
        )
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("name", list(WORST))
def test_the_worst_bodies_cost_under_two_seconds(api, name):
    raw = WORST[name]()
    assert len(raw) <= MEGABYTE
    took = answer_within_limits(api, raw)
    print(f"{name}: {len(raw)} bytes, {took:.3f} s of CPU")


# -- a real server ------------------------------------------------------------------------------
def _worker_pid(port: int) -> int:
    """The pid of the (only) gunicorn worker serving ``port``: the child of its master."""
    master = MASTERS[port]
    children = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == master:
                children.append(int(proc.name))
    [worker] = children
    return worker


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_generated_bodies_against_a_real_gunicorn(isolated_quotas, make_plan, make_user):
    plan = make_plan(tokens_per_hour=10**9, max_tokens_per_request=10**8)
    # Several clients, each sending fewer bodies than the rejected-attempts allowance.
    tokens = [Token.objects.create(user=make_user(plan=plan)).key for _ in range(12)]
    statuses: list[int] = []
    with running_gateway(isolated_quotas, workers=1) as port:
        worker = _worker_pid(port)
        for model in ("gpt-4", "gpt-4o", "my-model"):  # the encodings load once per process
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
            assert _post(port, tokens[-1], json.dumps(body).encode()) == 200

        @settings(FUZZ, max_examples=250)
        @given(raw=raw_bodies)
        def send(raw: bytes) -> None:
            token = tokens[len(statuses) // 25 % len(tokens)]
            before = _cpu_seconds(worker)
            status = _post(port, token, raw)
            assert status in ANSWERS, (status, raw[:300])
            assert _cpu_seconds(worker) - before < CPU_LIMIT_SECONDS, raw[:300]
            statuses.append(status)

        send()
        for name, make in WORST.items():
            before = _cpu_seconds(worker)
            assert _post(port, tokens[-1], make()) in ANSWERS
            took = _cpu_seconds(worker) - before
            print(f"gunicorn worker, {name}: {took:.2f} s of CPU")
            assert took < CPU_LIMIT_SECONDS, name
    print(f"gunicorn fuzz: {len(statuses)} bodies, statuses {sorted(set(statuses))}")
    assert 200 in statuses and 400 in statuses


def _post(port: int, token: str, raw: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", URL, body=raw, headers=headers)
        response = conn.getresponse()
        response.read()  # a stream is read to its end, so it settles
        return response.status
    finally:
        conn.close()
