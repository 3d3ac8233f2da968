"""Estimation: tiktoken throughput of ``quotas.core.estimate.estimate_request``.

Every enforced request is counted before it is reserved, so the estimate is on the hot path
too. Two OpenAI chat payloads: a typical one (a few short messages) and a large one (about
50,000 prompt tokens). Per-call time is also given as a ratio to one Redis ``PING``.

Run alone: ``python bench/estimation.py``.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import common
from common import Row

MODEL = "gpt-4"  # cl100k_base: always available offline
LARGE_TOKENS = 50_000
WORDS = (
    "token",
    "quota",
    "window",
    "bucket",
    "redis",
    "budget",
    "request",
    "limit",
    "user",
    "model",
    "prompt",
    "answer",
    "stream",
    "usage",
    "settle",
    "reserve",
    "estimate",
    "ledger",
    "plan",
    "hour",
    "minute",
    "second",
    "retry",
    "header",
    "client",
    "server",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "an",
    "be",
)


def typical_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a billing team."},
            {"role": "user", "content": "How many tokens did our team use last week?"},
            {"role": "assistant", "content": "About 1.2 million tokens, mostly on Tuesday."},
            {"role": "user", "content": "Summarise the three largest requests, one line each."},
        ],
    }


def large_body() -> dict[str, Any]:
    """A chat whose prompt is about ``LARGE_TOKENS`` tokens of varied text (fixed seed)."""
    rng = random.Random(6)
    # cl100k_base spends about 1.1 tokens per word of this vocabulary plus punctuation.
    words = [rng.choice(WORDS) + rng.choice(("", "", "", ",", ".", "s")) for _ in range(36_000)]
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer from the document only."},
            {"role": "user", "content": " ".join(words)},
        ],
        "max_tokens": 512,
    }


def throughput(body: dict[str, Any], seconds: float) -> tuple[int, float]:
    """(prompt tokens, seconds per call), calling the estimator for about ``seconds``."""
    from quotas.core.estimate import estimate_request

    tokens = estimate_request(body).prompt_tokens  # also loads the encoding, untimed
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 3:
        start = time.perf_counter()
        estimate_request(body)
        samples.append(time.perf_counter() - start)
    return tokens, statistics.median(samples)


def run() -> list[Row]:
    """Time both payloads; return the summary rows."""
    client = common.redis_client()
    ping_us = statistics.median(common.measure(client.ping, 2000, warmup=50))
    section = "Estimation: tiktoken (cl100k_base) via estimate_request (ratio: call time / PING)"
    rows = []
    for name, body in (("typical chat (4 messages)", typical_body()), ("large chat", large_body())):
        tokens, per_call = throughput(body, 1.0)
        rows.append(
            Row(
                section,
                f"{name}: {tokens:,} prompt tokens",
                f"{tokens / per_call:>12,.0f} tokens/s, {per_call * 1e6:,.0f} us/call",
                f"{per_call * 1e6 / ping_us:,.1f}x",
            )
        )
    return rows


if __name__ == "__main__":
    common.main(run)
