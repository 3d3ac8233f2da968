"""The provider side under a load above the provider's limits.

The fake upstream (``project.fake_upstream``) allows ``RPM`` requests per model per
``WINDOW`` seconds; ``THREADS`` clients in this process call it as fast as they can for
``BENCH_PROVIDER_SECONDS`` (default 10) per mode, with ``PROMPTS`` distinct requests:

- ``plain SDK``: the official client alone, with its own retries (2, which honour
  retry-after) and without (``max_retries=0``);
- ``quotas.llm``: the quota-aware client without degradation (it holds calls back while
  the provider's headers say it would refuse, and refuses a call it cannot send in time);
- ``quotas.llm, degrade``: the same with the plan's ladder (a cheaper model with limits of
  its own, the response cache, deferred jobs).

Printed per mode: completions served per minute (and by which rung), 429s the clients saw,
429s the provider sent. Targets: no provider 429 reaches a client that allowed degradation;
the requested model serves at least the provider's limit over the run's whole windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import common
from common import Row

THREADS = 16
WINDOW = 5.0
RPM = 25  # per model per window: 5 requests a second, far below what 16 clients ask
PROMPTS = 40
SECTION = "Provider protection"


def seconds() -> float:
    return float(os.environ.get("BENCH_PROVIDER_SECONDS", "10"))


@contextmanager
def fake_upstream() -> Iterator[str]:
    limits = json.dumps({"gpt-4o": {"rpm": RPM}, "gpt-4o-mini": {"rpm": RPM}})
    command = [
        sys.executable,
        "-m",
        "project.fake_upstream",
        "--port",
        "0",
        "--window",
        str(WINDOW),
        "--rpm",
        "0",
        "--tpm",
        "0",
        "--model-limits",
        limits,
    ]
    process = subprocess.Popen(command, cwd=common.REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().split()[-1])
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def control(base: str, **changes: Any) -> dict[str, int]:
    data = json.dumps(changes).encode()
    request = urllib.request.Request(f"{base}/_control", data=data, method="POST")
    urllib.request.urlopen(request, timeout=5).read()
    with urllib.request.urlopen(f"{base}/_stats", timeout=5) as answer:
        return dict(json.loads(answer.read()))


def body(i: int) -> dict[str, Any]:
    content = f"Question number {i % PROMPTS}: what is a token window?"
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": 40}


def load(call: Callable[[dict[str, Any]], str]) -> tuple[Counter[str], float]:
    """``THREADS`` clients calling for ``seconds()``; outcomes counted, and the time taken."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    stop = started + seconds()

    def client(n: int) -> None:
        i = n
        while time.monotonic() < stop:
            outcome = call(body(i))
            i += THREADS
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.monotonic() - started


def plain_call(sdk: Any) -> Callable[[dict[str, Any]], str]:
    import openai

    def call(request: dict[str, Any]) -> str:
        try:
            sdk.chat.completions.create(**request)
        except openai.RateLimitError:
            return "429"
        return "served:preferred"

    return call


def quota_call(client: Any) -> Callable[[dict[str, Any]], str]:
    import openai

    from quotas import llm
    from quotas.exceptions import QuotaExceeded

    def call(request: dict[str, Any]) -> str:
        try:
            answer = client.chat.completions.create(**request)
        except (openai.RateLimitError, QuotaExceeded):  # ProviderRefused is a QuotaExceeded
            return "429"
        except llm.Deferred:
            return "deferred"
        except llm.ProviderUnavailable:
            return "503"
        return f"served:{answer.quota_rung}"

    return call


def rows_of(mode: str, outcomes: Counter[str], elapsed: float, stats: dict[str, int]) -> list[Row]:
    per_minute = 60 / elapsed
    served = sum(v for k, v in outcomes.items() if k.startswith("served"))
    rungs = ", ".join(
        f"{k.split(':')[1]} {v * per_minute:.0f}"
        for k, v in sorted(outcomes.items())
        if k.startswith("served")
    )
    rows = [
        Row(SECTION, f"{mode}: completions/min", f"{served * per_minute:.0f}", rungs),
        Row(SECTION, f"{mode}: 429s seen by clients", str(outcomes["429"])),
        Row(SECTION, f"{mode}: 429s the provider sent", str(stats.get("limited", 0))),
    ]
    if outcomes["deferred"]:
        rows.append(Row(SECTION, f"{mode}: deferred jobs", str(outcomes["deferred"])))
    return rows


def run() -> list[Row]:
    """Every mode, against one fake upstream reset between modes."""
    import openai

    from quotas import llm
    from quotas.engine import dispatch

    common.setup_django()
    # Deferred jobs are counted, not run (no worker here): nothing reaches the broker.
    dispatch.register(dispatch.RUN_JOB, lambda *args, **kwargs: None)
    user = common.make_user(
        "provider",
        10**9,
        fallback_models=["gpt-4o-mini"],
        serve_from_cache=True,
        defer_when_refused=True,
    )
    rows: list[Row] = []
    with fake_upstream() as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=2)
        bare = openai.OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0)
        modes = {
            "plain SDK, no retries": lambda: plain_call(bare),
            "plain SDK": lambda: plain_call(sdk),
            "quotas.llm": lambda: quota_call(llm.wrap(sdk, user=user, provider="bench-a")),
            "quotas.llm, degrade": lambda: quota_call(
                llm.wrap(sdk, user=user, provider="bench-b", degrade=True)
            ),
        }
        for mode, make in modes.items():
            control(base, reset=True)
            outcomes, elapsed = load(make())
            stats = control(base)
            rows += rows_of(mode, outcomes, elapsed, stats)
            if mode == "quotas.llm, degrade":
                rows += targets(outcomes, stats, elapsed)
    return rows


def targets(outcomes: Counter[str], stats: dict[str, int], elapsed: float) -> list[Row]:
    """No provider 429 reaches a client that allowed degradation; the requested model
    serves at least its provider limit over the run's whole windows."""
    limit = RPM * int(elapsed // WINDOW)
    preferred = outcomes["served:preferred"]
    return [
        Row(
            SECTION,
            "quotas.llm, degrade: 429s reaching clients",
            str(outcomes["429"]),
            "",
            "0",
            common.verdict(outcomes["429"] == 0),
        ),
        Row(
            SECTION,
            "quotas.llm, degrade: requested model served / provider limit",
            f"{preferred} / {limit}",
            f"{preferred / max(limit, 1):.2f}",
            ">= 1.0",
            common.verdict(preferred >= limit),
        ),
    ]


if __name__ == "__main__":
    common.main(run)
