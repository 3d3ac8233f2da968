"""A real Redis Cluster for the tests: three masters (by default without replicas) on free
loopback ports, started from the same ``redis-server`` binary as the rest of the suite, in a
temporary directory, with no persistence. A test can stop one master (``stop``) and start it
again (``start``): it comes back empty, as a master that lost its data does.

With ``replicas=N`` every master gets N replicas of its own; a test can then kill a master
and wait for the cluster to promote one of them (``wait_promoted``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClusterUnavailable", "LocalCluster", "Node", "free_port"]


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
    """Three cluster masters (and ``replicas`` replicas of each) on loopback ports; ``url``
    names one of the nodes."""

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
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
        self.ports = [free_port() for _ in range(self.masters * (1 + self.replicas))]
        for port in self.ports:
            self.start(port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        create = [cli, "--cluster", "create", *nodes, "--cluster-replicas", str(self.replicas)]
        done = subprocess.run(
            [*create, "--cluster-yes"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            self.end()
            raise ClusterUnavailable(f"redis-cli --cluster create failed: {done.stdout[-500:]}")
        self.wait_ok()
        if self.replicas:
            self._check_layout()
        return self

    def _check_layout(self, timeout: float = 10.0) -> None:
        """Until every master has its replicas as the nodes see it (``redis-cli`` chooses
        which node is which; the others hear of it by gossip)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.nodes()
            masters = [node for node in nodes if node.master]
            if len(masters) == self.masters and all(
                len(self.replicas_of(node.port, nodes)) == self.replicas for node in masters
            ):
                return
            time.sleep(0.1)
        self.end()
        raise ClusterUnavailable(f"the masters did not get {self.replicas} replicas each")

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
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A master down leaves the other masters serving their own slots.
            "--cluster-require-full-coverage", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ]  # fmt: skip
        if self.replicas:
            # A replica takes over however long ago it last heard from its master.
            command += ["--cluster-replica-validity-factor", "0"]
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
        """Until every node says ``cluster_state:ok`` (with replicas: and every replica
        running is attached to its master, its initial copy done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [port for port in self.ports if port in self.processes]
            ok = all("cluster_state:ok" in self._info(port) for port in running)
            if ok and (not self.replicas or self._replicas_attached(running)):
                return
            time.sleep(0.1)
        raise ClusterUnavailable("the cluster never reached cluster_state:ok")

    def _replicas_attached(self, running: list[int]) -> bool:
        """Every running replica's link to its master is up, and the masters count as many
        connected replicas as there are replicas running."""
        replicas, connected = 0, 0
        for port in running:
            info = _fields(self._cli(port, "info", "replication"))
            if info.get("role") == "slave":
                replicas += 1
                if info.get("master_link_status") != "up":
                    return False
            elif info.get("role") == "master":
                connected += int(info.get("connected_slaves", "0"))
            else:
                return False
        return replicas == connected

    # -- the layout, as the running nodes see it ------------------------------------------
    def nodes(self) -> list[Node]:
        """Every node, as the first running node's ``CLUSTER NODES`` describes them."""
        for port in self.ports:
            if port in self.processes:
                text = self._cli(port, "cluster", "nodes")
                if text.strip():
                    return [Node.parse(line) for line in text.strip().splitlines()]
        return []

    def replicas_of(self, port: int, nodes: list[Node] | None = None) -> list[int]:
        """The ports of the replicas of the master on ``port``."""
        nodes = self.nodes() if nodes is None else nodes
        master = next((n for n in nodes if n.port == port), None)
        if master is None:
            return []
        return sorted(n.port for n in nodes if n.master_id == master.id)

    def promoted(self, replica: int, slots: tuple[tuple[int, int], ...]) -> bool:
        """Whether the node on ``replica`` is a master now, serving ``slots`` as every running
        node sees it, and every running node says ``cluster_state:ok``."""
        if _fields(self._cli(replica, "info", "replication")).get("role") != "master":
            return False
        for port in self.ports:
            if port not in self.processes:
                continue
            if "cluster_state:ok" not in self._info(port):
                return False
            text = self._cli(port, "cluster", "nodes").strip()
            view = {n.port: n for n in map(Node.parse, text.splitlines())} if text else {}
            node = view.get(replica)
            if node is None or not node.master or not set(slots) <= set(node.slots):
                return False
        return True

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> int:
        """Until a replica of the (killed) master on ``old_port`` serves its slots as a
        master, every node agreeing; the new master's port. Call it before that happened:
        the replicas and slots of the old master are read from the running nodes' view."""
        nodes = self.nodes()
        old = next(n for n in nodes if n.port == old_port)
        candidates = [p for p in self.replicas_of(old_port, nodes) if p in self.processes]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for port in candidates:
                if self.promoted(port, old.slots):
                    return port
            time.sleep(0.05)
        raise ClusterUnavailable(f"no replica of {old_port} was promoted in {timeout} s")

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


@dataclass(frozen=True)
class Node:
    """One line of ``CLUSTER NODES``: a node's id, port, role, master and slot ranges."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> Node:
        fields = line.split()
        node_id, address, flags, master_id = fields[:4]
        ranges = []
        for part in fields[8:]:
            if part.startswith("["):  # a slot being migrated
                continue
            first, _, last = part.partition("-")
            ranges.append((int(first), int(last or first)))
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        return cls(node_id, port, frozenset(flags.split(",")), master_id, tuple(ranges))

    @property
    def master(self) -> bool:
        return "master" in self.flags


def _fields(info: str) -> dict[str, str]:
    """``INFO``'s ``name:value`` lines as a dict."""
    pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    return {name.strip(): value.strip() for name, value in pairs}
