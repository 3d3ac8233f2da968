"""The fake OpenAI-compatible upstream (``project.fake_upstream``) as a real server process,
for tests: started on a free port, controlled and read over HTTP, stopped afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Upstream", "running_upstream"]


class Upstream:
    """A running fake upstream: its URL, its counters, its mode."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=5) as r:
            return dict(json.loads(r.read()))

    def control(self, **changes: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_control",
            data=json.dumps(changes).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            return dict(json.loads(r.read()))


@contextmanager
def running_upstream(*args: str) -> Iterator[Upstream]:
    """``python -m project.fake_upstream --port 0 *args``; yields once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "project.fake_upstream", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"The fake upstream did not start: {line!r}")
        yield Upstream(int(line.split()[-1]))
    finally:
        process.terminate()
        process.wait(10)
