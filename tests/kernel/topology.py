"""A reusable namespace topology for kernel tests (and benches).

Everything is created inside network namespaces named ``<prefix>-<role>``
(prefix ``oct-`` + random hex by default); nothing is configured in the
root namespace (every ``ip`` call uses ``-n <ns>``). ``Topology.cleanup()``
kills the processes the topology started (by pid) and deletes exactly the
namespaces it created; use it in a ``finally`` or through the ``topo``
fixture in ``tests/kernel/conftest.py``.

Layout::

    <prefix>-vnet        bridge "br0" (the underlay L2 segment)
    <prefix>-<node>      "eth0" <node ip>/16, veth to br0
    <prefix>-<host>      an outside host on br0, e.g. 10.224.0.200/16 (+ 203.0.113.x)
    <prefix>-<pod>       empty pod namespaces for the data plane to attach

Example::

    topo = Topology()
    topo.add_underlay()
    n1 = topo.add_node("n1", "10.224.0.1/16")
    pod = topo.add_netns("p1")           # the path CNI would pass in CNI_NETNS
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Interface

NETNS_DIR = "/var/run/netns"


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip_json(ns: str, *args: str) -> list[dict]:
    out = run("ip", "-n", ns, "-j", *args).stdout
    return json.loads(out) if out.strip() else []


@dataclass
class NodeNs:
    ns: str
    ip: IPv4Interface
    ifname: str = "eth0"
    port: str = ""  # its bridge port in the vnet namespace (capture the wire there)

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.ns)


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: "oct-" + secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    vnet: str | None = None
    _port: int = 0

    def ns_name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def add_netns(self, role: str) -> str:
        """Create an empty namespace (lo up); returns its path."""
        name = self.ns_name(role)
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return os.path.join(NETNS_DIR, name)

    def add_underlay(self) -> str:
        self.add_netns("vnet")
        self.vnet = self.ns_name("vnet")
        run("ip", "-n", self.vnet, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.vnet, "link", "set", "br0", "up")
        return self.vnet

    def _plug(self, ns: str, ip: IPv4Interface, *, mtu: int, ifname: str = "eth0") -> str:
        assert self.vnet is not None, "add_underlay() first"
        self._port += 1
        port = f"p{self._port}"
        run("ip", "-n", self.vnet, "link", "add", port, "mtu", str(mtu), "type", "veth",
            "peer", "name", ifname, "netns", ns)
        run("ip", "-n", self.vnet, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", ns, "link", "set", ifname, "mtu", str(mtu), "up")
        run("ip", "-n", ns, "addr", "add", str(ip), "dev", ifname)
        return port

    def add_node(self, role: str, ip: str, *, mtu: int = 1500) -> NodeNs:
        self.add_netns(role)
        node = NodeNs(self.ns_name(role), IPv4Interface(ip))
        node.port = self._plug(node.ns, node.ip, mtu=mtu)
        return node

    def add_host(self, role: str, ip: str, *, extra: tuple[str, ...] = (), mtu: int = 1500) -> NodeNs:
        """An outside host on the underlay; ``extra`` addresses (e.g. 203.0.113.10/24) go on its eth0 too."""
        host = self.add_node(role, ip, mtu=mtu)
        for addr in extra:
            run("ip", "-n", host.ns, "addr", "add", addr, "dev", "eth0")
        return host

    def exec(self, ns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def spawn(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        """Start a process inside ``ns``; it is killed (by pid) in ``cleanup``."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)
        self.processes.append(proc)
        return proc

    def ping(self, ns: str, dst: str, *, count: int = 1, size: int | None = None, df: bool = False,
             wait: float = 2, attempts: int = 3) -> bool:
        """True if ``dst`` answers. Retried ``attempts`` times: the kernel's ARP table is
        shared by every namespace on the machine, and when other workloads fill it
        (``neighbor table overflow``) a first ARP resolution can fail transiently."""
        cmd = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), "-i", "0.2"]
        if size is not None:
            cmd += ["-s", str(size)]
        if df:
            cmd += ["-M", "do"]
        return any(self.exec(ns, *cmd, dst, check=False, timeout=wait * count + 10).returncode == 0 for _ in range(attempts))

    def cleanup(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.processes.clear()
        for name in reversed(self.namespaces):
            run("ip", "netns", "del", name, check=False)
        self.namespaces.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
