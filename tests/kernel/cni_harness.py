"""A small cluster for CNI/agent kernel tests: real agents in node
namespaces, the installed plugin run as a runtime runs it.

Everything lives in a ``tests.kernel.topology.Topology`` (namespaces that the
test creates and removes). Plugins run with ``nsenter --net=<node netns>``,
as a runtime on that node would: chained reference plugins (portmap,
bandwidth) then program the node's namespace, never the root one. With an
etcd store, etcd runs in a control-plane namespace on the underlay, and
every CLI call that talks to it runs inside that namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kernel.topology import NodeNs, Topology, run

OVERLAYCNI = str(Path(sys.executable).with_name("overlaycni"))
REF_PLUGINS = "/usr/lib/cni"


@dataclass
class AgentProc:
    node: NodeNs
    name: str
    socket: str
    proc: subprocess.Popen
    ready: dict[str, Any]


@dataclass
class Cluster:
    topo: Topology
    workdir: Path
    store: str = ""
    ctl: NodeNs | None = None  # where CLI calls against etcd run
    agents: dict[str, AgentProc] = field(default_factory=dict)
    etcd: subprocess.Popen | None = None
    lease_ttl: int = 6

    # ----- control plane ------------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [OVERLAYCNI, "--datastore", self.store, *args]
        if self.ctl is not None:
            cmd = ["ip", "netns", "exec", self.ctl.ns, *cmd]
        return run(*cmd, check=check)

    def start_etcd(self, ip: str = "10.224.0.250") -> None:
        """etcd in a control-plane namespace on the underlay (never on the host)."""
        self.ctl = self.topo.add_host("ctl", f"{ip}/16")
        self.store = f"etcd://{ip}:2379"
        self._spawn_etcd()

    def _spawn_etcd(self) -> None:
        assert self.ctl is not None
        ip = str(self.ctl.ip.ip)
        with open(self.workdir / "etcd.log", "a") as log:  # etcd keeps its own copy of the fd
            self.etcd = self.topo.spawn(
                self.ctl.ns, "etcd", "--name", "ctl", "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", f"http://{ip}:2379", "--advertise-client-urls", f"http://{ip}:2379",
                "--listen-peer-urls", f"http://{ip}:2380", "--initial-advertise-peer-urls", f"http://{ip}:2380",
                "--initial-cluster", f"ctl=http://{ip}:2380", stdout=log, stderr=log,
            )
        for _ in range(150):
            if self.cli("cluster", "list", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("etcd did not come up: " + (self.workdir / "etcd.log").read_text()[-2000:])

    def stop_etcd(self) -> None:
        assert self.etcd is not None
        self.etcd.terminate()
        self.etcd.wait(10)
        self.topo.processes.remove(self.etcd)

    def restart_etcd(self) -> None:
        self._spawn_etcd()

    def create(self, *flags: str) -> None:
        if not self.store:
            self.store = f"sqlite://{self.workdir}/state.db"
        self.cli("cluster", "create", "--name", "t", "--network-plugin", "azure", "--network-plugin-mode", "overlay",
                 "--pod-cidr", "10.244.0.0/16", "--service-cidr", "10.0.0.0/16", "--dns-service-ip", "10.0.0.10",
                 *flags)

    # ----- nodes ---------------------------------------------------------------------
    def add_node(self, name: str, ip: str, *agent_flags: str) -> AgentProc:
        node = self.topo.add_node(name, f"{ip}/16")
        return self.start_agent(name, node, *agent_flags)

    def start_agent(self, name: str, node: NodeNs, *agent_flags: str, socket: str | None = None) -> AgentProc:
        sock = socket or str(self.workdir / f"{name}.sock")
        with open(self.workdir / f"{name}.log", "a") as log:  # the agent keeps its own copy of the fd
            proc = self.topo.spawn(
                node.ns, OVERLAYCNI, "--datastore", self.store, "agent", "--cluster", "t", "--node", name,
                "--node-ip", str(node.ip.ip), "--socket", sock, "--metrics-addr", "127.0.0.1:0",
                "--lease-ttl", str(self.lease_ttl), "--resync-interval", "5", *agent_flags,
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {name} failed: " + (self.workdir / f"{name}.log").read_text()[-3000:])
        agent = AgentProc(node=node, name=name, socket=sock, proc=proc, ready=json.loads(line))
        self.agents[name] = agent
        return agent

    def kill_agent(self, name: str) -> None:
        a = self.agents[name]
        a.proc.kill()
        a.proc.wait(5)
        self.topo.processes.remove(a.proc)

    def drained(self, name: str, timeout: float = 20.0) -> None:
        """Wait until the agent's DEL quarantine is empty (``agent status``): every
        DELeted address's conntrack entries flushed and the address released."""
        end = time.monotonic() + timeout
        while True:
            got = self.cli("agent", "status", "--socket", self.agents[name].socket, "--output", "json", check=False)
            q = json.loads(got.stdout)["quarantine"] if got.stdout.strip() else None
            held = q["held"] + q.get("parked", 0) if q else None  # parked: DELs' veths the drain deletes first
            if held == 0:
                return
            assert time.monotonic() < end, f"agent {name}: quarantine still holds {held} addresses: {got.stdout}"
            time.sleep(0.05)

    def conf(self, name: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": "overlaycni", "type": "overlaycni",
                "socket": self.agents[name].socket, **extra}

    # ----- plugins ---------------------------------------------------------------------
    def plugin(self, node: str, command: str, pod_ns: str, conf: dict[str, Any] | str, *, plugin: str | None = None,
               cid: str | None = None, ifname: str = "eth0", timeout: float = 30, netns_path: str | None = None,
               k8s_namespace: str = "default") -> tuple[int, Any, float]:
        """Run a plugin on ``node`` as a runtime would; returns (exit, stdout JSON, seconds).
        ``netns_path``: CNI_NETNS as given (default: the path of ``pod_ns``); ``conf``: a dict, or stdin as is."""
        binary = plugin or str(self.workdir / "bin/overlaycni")
        env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": command, "CNI_CONTAINERID": cid or pod_ns,
               "CNI_NETNS": netns_path or f"/var/run/netns/{pod_ns}", "CNI_IFNAME": ifname,
               "CNI_PATH": f"{self.workdir}/bin:{REF_PLUGINS}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_namespace};K8S_POD_NAME={pod_ns}"}
        start = time.monotonic()
        p = subprocess.run(["nsenter", f"--net=/var/run/netns/{self.agents[node].node.ns}", binary],
                           input=conf if isinstance(conf, str) else json.dumps(conf), env=env, capture_output=True,
                           text=True, timeout=timeout)
        took = time.monotonic() - start
        out = json.loads(p.stdout) if p.stdout.strip() else None
        return p.returncode, out, took

    def install(self) -> None:
        run(OVERLAYCNI, "install-cni", "--cluster", "t", "--bin-dir", str(self.workdir / "bin"),
            "--conf-dir", str(self.workdir / "net.d"))

    def pod(self, node: str, name: str, version: str = "1.0.0") -> tuple[str, dict[str, Any]]:
        path = self.topo.add_netns(name)
        ns = os.path.basename(path)
        code, res, _ = self.plugin(node, "ADD", ns, self.conf(node, version))
        assert code == 0, res
        return ns, res
