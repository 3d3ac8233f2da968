"""A real Redis Cluster for the tests: three masters (no replicas) on free loopback ports,
started from the same ``redis-server`` binary as the rest of the suite, in a temporary
directory, with no persistence. A test can stop one master (``stop``) and start it again
(``start``): it comes back empty, as a master that lost its data does."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClusterUnavailable", "LocalCluster", "free_port"]


class ClusterUnavailable(RuntimeError):
    """This machine cannot start a Redis Cluster (no binary, or it refused)."""


def free_port() -> int:
    """A loopback port nobody listens on now (and whose cluster bus port, +10000, is free)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536 and _free(port + 10000):
            return port
    raise ClusterUnavailable("no free loopback port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class LocalCluster:
    """Three cluster masters on loopback ports; ``url`` names one of them."""

    masters: int = 3
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="quotas-cluster-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def begin(self) -> LocalCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if not server or not cli:
            raise ClusterUnavailable("redis-server or redis-cli is not on PATH")
        self.ports = [free_port() for _ in range(self.masters)]
        for port in self.ports:
            self.start(port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        create = [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0"]
        done = subprocess.run(
            [*create, "--cluster-yes"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            self.end()
            raise ClusterUnavailable(f"redis-cli --cluster create failed: {done.stdout[-500:]}")
        self.wait_ok()
        return self

    def start(self, port: int) -> None:
        """Start (or restart, empty) the node on ``port``; it keeps its cluster config file."""
        directory = self.root / str(port)
        directory.mkdir(exist_ok=True)
        command = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000",
            # A master down leaves the other masters serving their own slots.
            "--cluster-require-full-coverage", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ]  # fmt: skip
        self.processes[port] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._ping(port):
            if time.monotonic() > deadline or self.processes[port].poll() is not None:
                raise ClusterUnavailable(f"redis-server --cluster-enabled on {port} did not start")
            time.sleep(0.05)

    def stop(self, port: int) -> None:
        """Kill the node on ``port`` (SIGKILL: no goodbye to the others)."""
        process = self.processes.pop(port, None)
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [port for port in self.ports if port in self.processes]
            if all("cluster_state:ok" in self._info(port) for port in running):
                return
            time.sleep(0.1)
        raise ClusterUnavailable("the cluster never reached cluster_state:ok")

    def end(self) -> None:
        for port in list(self.processes):
            self.stop(port)
        shutil.rmtree(self.root, ignore_errors=True)

    def _info(self, port: int) -> str:
        return self._cli(port, "cluster", "info")

    def _ping(self, port: int) -> bool:
        return self._cli(port, "ping").strip() == "PONG"

    @staticmethod
    def _cli(port: int, *args: str) -> str:
        try:
            done = subprocess.run(
                ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout
