"""A real Sentinel setup for the tests: a primary, a replica and three sentinels on free
loopback ports, from the same ``redis-server`` binary as the rest of the suite, without
persistence. ``kill_primary`` kills the primary (SIGKILL); the sentinels promote the replica."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.cluster_support import ClusterUnavailable, free_port

__all__ = ["SERVICE", "LocalSentinels"]

SERVICE = "mymaster"


@dataclass
class LocalSentinels:
    """``primary`` and ``replica`` ports, ``sentinels`` ports; ``current_primary()`` asks."""

    primary: int = 0
    replica: int = 0
    sentinels: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="quotas-sentinel-")))

    def begin(self) -> LocalSentinels:
        if not shutil.which("redis-server"):
            raise ClusterUnavailable("redis-server is not on PATH")
        self.primary, self.replica = free_port(), free_port()
        self._server(self.primary)
        self._server(self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        self._until(lambda: self._role(self.replica) == "up", "the replica never synced")
        for _ in range(3):
            port = free_port()
            self.sentinels.append(port)
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._spawn(port, [str(conf), "--sentinel"])
        self._until(self._sentinels_see_everyone, "the sentinels never saw the replica")
        return self

    def current_primary(self) -> int | None:
        """The primary's port as a sentinel says it (``None``: no sentinel answers)."""
        for port in self.sentinels:
            try:
                host_port = redis.Redis(port=port).sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if host_port:
                return int(host_port[1])
        return None

    def kill_primary(self) -> None:
        process = self.processes.pop(self.primary)
        process.kill()
        process.wait(timeout=10)

    def end(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- starting ------------------------------------------------------------------------
    def _server(self, port: int, *extra: str) -> None:
        directory = self.root / str(port)
        directory.mkdir()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._spawn(port, [*args, "--dir", str(directory), *extra])

    def _spawn(self, port: int, args: list[str]) -> None:
        self.processes[port] = subprocess.Popen(
            ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._until(lambda: self._ping(port), f"redis-server on {port} did not start")

    def _sentinels_see_everyone(self) -> bool:
        for port in self.sentinels:
            try:
                replicas = redis.Redis(port=port).sentinel_slaves(SERVICE)
                others = redis.Redis(port=port).sentinel_sentinels(SERVICE)
            except redis.RedisError:
                return False
            if not replicas or len(others) < len(self.sentinels) - 1:
                return False
        return True

    def _role(self, port: int) -> str:
        try:
            info = redis.Redis(port=port).info("replication")
        except redis.RedisError:
            return ""
        return str(info.get("master_link_status", ""))

    def _ping(self, port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def _until(self, check, message: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                self.end()
                raise ClusterUnavailable(message)
            time.sleep(0.1)
