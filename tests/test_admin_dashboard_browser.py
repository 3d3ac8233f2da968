"""The dashboard in a real headless browser (Chromium) at 1280 px, light and dark: the
screenshot is taken, and the page is checked by the DOM the browser built, not by pixels."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from quotas import services
from quotas.exceptions import QuotaExceeded
from tests.test_admin_dashboard import record

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.integration,
    pytest.mark.urls("tests.dashboard_urls"),
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium"),
]


def browse(url: str, shot: Path, *, dark: bool) -> str:
    """Take a 1280 px wide screenshot of ``url``; return the DOM the browser built."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1280,2400", "--virtual-time-budget=3000"]  # fmt: skip
    if dark:
        flags += ["--force-dark-mode", "--blink-settings=preferredColorScheme=0"]
    run = {"capture_output": True, "text": True, "timeout": 90, "check": True}
    subprocess.run([*flags, f"--screenshot={shot}", url], **run)  # type: ignore[call-overload]
    return subprocess.run([*flags, "--dump-dom", url], **run).stdout  # type: ignore[call-overload]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_the_dashboard_renders_in_chromium_with_data(
    theme: str,
    live_server: Any,
    make_plan: Any,
    make_user: Any,
    tmp_path: Path,
    django_user_model: Any,
) -> None:
    plan = make_plan(slug="pro", name="Pro", tokens_per_hour=1000, is_default=True)
    users = [make_user(plan=plan, username=f"user-{n}") for n in range(3)]
    for n, user in enumerate(users):
        record(user, 100 * (n + 1), model=["gpt-4o", "gpt-4o-mini"][n % 2], cost=50_000 * (n + 1))
    services.reserve(users[2], 600)
    with pytest.raises(QuotaExceeded):
        services.reserve(users[2], 600)
    services.roll_up_refusals()
    boss = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")
    shot = tmp_path / f"dashboard-{theme}.png"
    url = f"{live_server.url}/test-login/{boss.pk}/?next=/admin/quotas/dashboard/"
    dom = browse(url, shot, dark=theme == "dark")
    assert png_size(shot)[0] == 1280
    assert 'id="quota-dashboard"' in dom and dom.count('class="quota-chart"') == 8
    assert "user-2" in dom and "user tokens per hour" in dom  # top users, refusals by limit
    assert "<rect" in dom and "gpt-4o-mini: 200" in dom
    pages = {
        "user": (f"/admin/quotas/dashboard/user/{users[2].pk}/", ['id="quota-limits"', "90%"]),
        "users": ("/admin/quotas/dashboard/users/", ['id="quota-users-table"', "user-0"]),
        "ledger": ("/admin/quotas/usagerecord/", ['id="quota-ledger-sums"', "Export CSV"]),
        "quotas": ("/admin/quotas/userquota/", ["100 left, full in", "usage page"]),
    }
    for name, (path, expected) in pages.items():
        page = tmp_path / f"{name}-{theme}.png"
        dom = browse(
            f"{live_server.url}/test-login/{boss.pk}/?next={path}", page, dark=theme == "dark"
        )
        assert png_size(page)[0] == 1280 and all(text in dom for text in expected), name
    keep = os.environ.get("QUOTAS_SCREENSHOTS")  # a directory to keep them in, to look at
    if keep:
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, keep)
