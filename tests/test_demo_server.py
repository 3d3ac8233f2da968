"""The demo as ``make run`` serves it (gunicorn with the demo's config), through real sockets:
the admin's static files, slow and careless clients, chunked bodies, logged 500s."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token

from tests.gateway_server import running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CHAT = {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}


@pytest.fixture
def token(make_plan: Any, make_user: Any) -> str:
    user = make_user(plan=make_plan(tokens_per_hour=100_000))
    return Token.objects.create(user=user).key


@pytest.fixture
def server(isolated_quotas: str, transactional_db: Any) -> Iterator[int]:
    with running_gateway(isolated_quotas, workers=1, GATEWAY_BODY_TIMEOUT_SECONDS="1") as port:
        yield port


def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw_request(port: int, head: bytes, body: bytes = b"", *, close_write: bool = False) -> bytes:
    """Send ``head`` + ``body`` on a socket of its own; return everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def post_head(path: str, length: int | None, token: str, chunked: bool = False) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Authorization: Bearer {token}",
        "Connection: close",
    ]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_and_json(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, json.loads(body)


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if not n:
            return out
        out, body = out + rest[:n], rest[n + 2 :]
    return out


# -- static files --------------------------------------------------------------------------------
def test_the_admin_css_is_served_after_collectstatic(isolated_quotas, transactional_db):
    with tempfile.TemporaryDirectory() as var_dir:
        env = {"VAR_DIR": var_dir, "DJANGO_SETTINGS_MODULE": "project.settings"}
        subprocess.run(
            [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
            cwd=settings.BASE_DIR,
            env={**__import__("os").environ, **env},
            check=True,
            timeout=120,
        )
        css = Path(var_dir, "static/admin/css/base.css").read_bytes()
        with running_gateway(isolated_quotas, workers=1, VAR_DIR=var_dir) as port:
            status, headers, body = get(port, "/static/admin/css/base.css")
            login_status, _, login = get(port, "/admin/login/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/css")
    assert body == css
    assert login_status == 200 and b"/static/admin/css/base.css" in login


# -- slow and careless clients ---------------------------------------------------------------------
def test_clients_that_send_only_headers_do_not_stop_a_normal_request(server, token):
    slow = [socket.create_connection(("127.0.0.1", server), timeout=10) for _ in range(2)]
    try:
        for sock in slow:  # a request line and a header, never the blank line that ends them
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        status, _, _ = get(server, "/quotas/plans/")
        elapsed = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
    assert status == 200
    assert elapsed < 2.0


def test_a_body_shorter_than_its_content_length_times_out_as_a_408_not_a_500(server, token):
    body = json.dumps(CHAT).encode()
    started = time.monotonic()
    raw = raw_request(server, post_head("/v1/chat/completions", len(body) + 500, token), body)
    elapsed = time.monotonic() - started
    status, payload = status_and_json(raw)
    assert status == 408
    assert payload["error"]["code"] == "request_timeout"
    assert elapsed < 5  # GATEWAY_BODY_TIMEOUT_SECONDS=1, not gunicorn's 30 s worker timeout


def test_a_body_that_ends_early_is_a_400_naming_the_lengths(server, token):
    body = json.dumps(CHAT).encode()
    head = post_head("/v1/chat/completions", len(body) + 500, token)
    status, payload = status_and_json(raw_request(server, head, body, close_write=True))
    assert status == 400
    assert payload["error"]["code"] == "request_body_incomplete"
    assert f"after {len(body)} of the {len(body) + 500} bytes" in payload["error"]["message"]


def test_a_chunked_body_is_read(server, token):
    body = json.dumps(CHAT).encode()
    chunked = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:10], body[10:])
    )
    raw = raw_request(
        server, post_head("/v1/chat/completions", None, token, True), chunked + b"0\r\n\r\n"
    )
    status, payload = status_and_json(raw)
    assert status == 200, payload
    assert payload["usage"]["completion_tokens"] == 20


def test_a_chunked_body_over_the_limit_is_a_400(server, token):
    part = b"x" * 400_000
    chunks = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for _ in range(3))
    raw = raw_request(
        server, post_head("/v1/chat/completions", None, token, True), chunks + b"0\r\n\r\n"
    )
    status, payload = status_and_json(raw)
    assert status == 400
    assert payload["error"]["code"] == "request_body_too_large"


# -- errors are logged -----------------------------------------------------------------------------
def test_a_500_is_logged_with_its_traceback(isolated_quotas, transactional_db):
    with tempfile.TemporaryFile() as log:
        with running_gateway(
            isolated_quotas, workers=1, log=log, DJANGO_SETTINGS_MODULE="tests.server_settings"
        ) as port:
            status, _, _ = get(port, "/boom/")
            time.sleep(0.3)
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert status == 500
    assert "Internal Server Error: /boom/" in output
    assert "RuntimeError: the boom view failed on purpose" in output
