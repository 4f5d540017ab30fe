"""Soak: a seeded random sequence of operations against one lab, then every invariant.

A dev tool (root; every packet stays inside the lab's own namespaces, as in
any lab). It brings up its own lab (``sk<random>``, in a temporary lab
directory), runs ``--steps`` operations chosen by a seeded RNG (the seed is
printed first: ``--seed N`` replays the same operations; pods and nodes
are chosen from lists sorted by name, so a burst's completion order does
not change later choices; the kernel's timing, which the seed does not
fix, can), and after every ``--check-every`` steps and at the end
checks every invariant; it stops at the first violation, printing the seed,
the step log and the evidence. The lab is taken down at the end, pass or
fail, unless ``--keep``.

Operations: pod add (random node, namespace, labels), pod delete, pod
delete + re-add of the same pod at once (the same attachment), pod delete +
a new pod asking for its address (``ips``), pod label change, node add, node delete (never below 2 nodes), agent SIGKILL then
restart, agent SIGTERM then restart, agent SIGKILL left dead past its
lease (peers drop the node) then restart, a burst of pod adds at once (threads
calling ``lab pod add``'s own code at the same time, as shells would), and
a NetworkPolicy apply/delete that selects some pods but allows all traffic
(so it exercises the agents' policy path without changing what ``lab
check`` expects).

Faults added later (``--faults``, all by default; the CI test's fixed seed
runs without them, so its operations stay the same): ``inflight`` SIGKILLs
a node's agent while ADDs and DELs on that node are in flight, restarts it,
and does the runtime's part (a DEL of each failed ADD's attachment, as the
CNI spec asks, maybe a fresh ADD; a failed DEL again); ``etcd_pause``
(``--store etcd`` only) SIGSTOPs etcd for a few seconds while adds and
deletes run (an ADD refused with a CNI error meanwhile is allowed and
listed); ``traffic`` pings between two pods on different nodes while one
of their agents restarts (SIGTERM or SIGKILL) and lists the packets lost
(never asserted: the data path should not depend on the agent, ~0 lost).
The lab cannot pass agent flags (a short ``--reap-grace``), so a DEL that
completed just before a SIGKILL is excused and listed, as for ``agent_kill``.

Invariants (``violations``, pure over the ``Facts`` gathered from the
kernel, the datastore and the agents):

- ``lab check``: every pair and every external path (a bounded convergence
  wait: several checks, never a single sample);
- ``ipam check`` clean; every allocation belongs to a pod of the lab on
  that pod's node with that pod's addresses, every lab pod has exactly one
  (no leak, no double hand-out);
- no host veth (``oc…``) without a pod, no parked veth (``oz…``) once idle,
  no pod namespace without a pod, every pod's namespace exists;
- every agent ready, without ``last_error``, its quarantine empty once idle;
- the datastore's node records are the lab's nodes, with their blocks.

Usage: .venv/bin/python bench/soak.py [--seed N] [--steps 40] [--check-every 10]
       [--backend vxlan|direct|wireguard] [--store sqlite|etcd] [--ip-families ipv4,ipv6] [--keep]
       [--faults inflight,etcd_pause,traffic]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OC = str(Path(sys.executable).parent / "overlaycni")
NAMESPACES = ("default", "ns-a", "ns-b")
APPS = ("web", "db", "api")
WEIGHTS = {
    "pod_add": 6, "pod_del": 4, "pod_label": 2, "node_add": 1, "node_del": 1,
    "agent_kill": 1, "agent_term": 1, "burst": 1, "policy": 1, "pod_readd": 1, "pod_reuse_ip": 1,
    "agent_down": 1,
}  # fmt: skip
# Faults added later, opt-in (``run(faults=...)``, the CLI's ``--faults``, all by default there) so the
# operations an existing seed chose, and the CI test's fixed seed, stay the same.
FAULTS = {"inflight": 2, "etcd_pause": 2, "traffic": 1}
FAULT_NAMES = tuple(FAULTS)
INFLIGHT_DELAY = (0.0, 0.06)  # seconds from an ADD's pod namespace appearing (or the DELs' start) to the SIGKILL:
# the lab creates the namespace just before it runs the plugin, and an agent's ADD or DEL takes some 10-50 ms
ETCD_PAUSE = (2.0, 8.0)  # seconds etcd is stopped (SIGSTOP) while operations run
PING_INTERVAL = 0.05  # seconds between two echo requests of the traffic operation
MAX_PODS = 14  # lab check pings every pair: keep it affordable
MAX_NODES = 5
KILL_WINDOW = 2.0  # a DEL this close before its agent's SIGKILL may still be quarantined (agent.quarantine: <= 1 s)
REAP_WAIT = 90.0  # seconds the final reaper check waits: the agents' default --reap-grace (60 s) after a restart, and margin
SETTLE = 45.0  # seconds the invariants may take to converge (agent resync 5 s, quarantine drain when idle)


# --- the invariants (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class PodFact:
    key: str  # NAMESPACE/NAME
    node: str
    container_id: str
    netns: str
    ips: tuple[str, ...]  # as the CNI result gave them


@dataclass(frozen=True)
class AllocFact:
    container_id: str
    ifname: str
    node: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class Facts:
    """What the lab looks like, from every side."""

    pods: tuple[PodFact, ...]
    allocations: tuple[AllocFact, ...]
    ipam_problems: tuple[str, ...]
    veths: dict[str, tuple[str, ...]]  # node -> host links named oc…/oz…
    pod_netns: tuple[str, ...]  # the lab's pod namespaces that exist
    agents: dict[str, dict[str, Any]]  # node -> agent status (or {"error": ...})
    lab_nodes: dict[str, str]  # node -> block, as the lab recorded it
    store_nodes: dict[str, str]  # node -> block, as the datastore's node records say
    connectivity: tuple[str, ...] = ()  # lab check failures (empty: ok, or not run)


def host_veth(container_id: str) -> str:
    from overlaycni.dataplane.model import host_veth_name

    return host_veth_name(container_id, "eth0")


def violations(f: Facts, *, idle: bool = True, excused: Mapping[str, str] = {}) -> list[str]:  # noqa: B006 - read only
    """Every broken invariant, one line each (empty: all hold). ``idle``:
    nothing is in flight, so quarantines and parked veths must be empty.
    ``excused``: container ID -> node of pods deleted just before their
    node's agent was SIGKILLed (the in-memory quarantine is lost; the leak
    reaper releases the address after its interval and grace, by design):
    their allocations are not counted as leaks."""
    out = [f"ipam check: {p}" for p in f.ipam_problems]
    by_cid: dict[str, list[AllocFact]] = {}
    for a in f.allocations:
        by_cid.setdefault(a.container_id, []).append(a)
    pods = {p.container_id: p for p in f.pods}
    for cid, allocs in sorted(by_cid.items()):
        p = pods.get(cid)
        if p is None and all(excused.get(cid) == a.node for a in allocs):
            continue
        if p is None:
            out += [f"leak: allocation {a.ips} on {a.node} ({cid} {a.ifname}) belongs to no pod of the lab" for a in allocs]
            continue
        if len(allocs) > 1:
            out.append(f"double: pod {p.key} holds {len(allocs)} allocations: {[a.ips for a in allocs]}")
        for a in allocs:
            if a.node != p.node or sorted(a.ips) != sorted(p.ips) or a.ifname != "eth0":
                out.append(f"mismatch: pod {p.key} on {p.node} has {p.ips}, its allocation is {a.ips} {a.ifname} on {a.node}")
    owners: dict[str, list[str]] = {}
    for a in f.allocations:
        for ip in a.ips:
            owners.setdefault(ip, []).append(a.container_id)
    out += [f"double hand-out: {ip} is allocated to {cids}" for ip, cids in sorted(owners.items()) if len(cids) > 1]
    given: dict[str, list[str]] = {}
    for p in f.pods:
        if p.container_id not in by_cid:
            out.append(f"lost: pod {p.key} on {p.node} ({', '.join(p.ips) or 'no IP'}) has no allocation")
        for ip in p.ips:
            given.setdefault(ip, []).append(p.key)
    out += [f"double hand-out: pods {keys} all have {ip}" for ip, keys in sorted(given.items()) if len(keys) > 1]

    for node, links in sorted(f.veths.items()):
        want = {host_veth(p.container_id) for p in f.pods if p.node == node}
        have = {x for x in links if x.startswith("oc")}
        out += [f"leftover veth {x} on {node}: no pod of the lab" for x in sorted(have - want)]
        out += [f"missing veth {x} on {node} (pod {next(p.key for p in f.pods if host_veth(p.container_id) == x)})"
                for x in sorted(want - have)]  # fmt: skip
        if idle:
            out += [f"parked veth {x} on {node} still there once idle" for x in sorted(links) if x.startswith("oz")]
    want_ns = {p.netns for p in f.pods}
    out += [f"leftover pod namespace {ns}" for ns in sorted(set(f.pod_netns) - want_ns)]
    out += [f"pod {p.key}: its namespace {p.netns} is gone" for p in f.pods if p.netns not in f.pod_netns]

    for node, h in sorted(f.agents.items()):
        if "error" in h:
            out.append(f"agent {node}: {h['error']}")
            continue
        if not h.get("ready"):
            out.append(f"agent {node} not ready: {h.get('reasons')}")
        if h.get("last_error"):
            out.append(f"agent {node} last_error: {h['last_error']}")
        q = h.get("quarantine") or {}
        if idle and q.get("held"):
            out.append(f"agent {node} quarantine holds {q.get('held')} once idle: {q.get('addresses')}")
        pods_here = sum(1 for p in f.pods if p.node == node)
        pending = sum(1 for a in f.allocations if excused.get(a.container_id) == node and a.container_id not in pods)
        if h.get("pods") is not None and h.get("pods") not in range(pods_here, pods_here + pending + 1):
            out.append(f"agent {node} knows {h.get('pods')} pods, the lab has {pods_here} there")
    if f.lab_nodes != f.store_nodes:
        out.append(f"node records: the datastore has {f.store_nodes}, the lab {f.lab_nodes}")
    out += [f"lab check: {x}" for x in f.connectivity]
    return out


# --- gathering the facts ------------------------------------------------------------------------


def gather(name: str, root: str, *, connectivity: bool) -> Facts:
    from overlaycni import ipam
    from overlaycni.cli.agent import query_agent
    from overlaycni.datastore.keys import cluster_root
    from overlaycni.lab import check, control, netns, topology
    from overlaycni.lab import state as st

    s = st.load(name, root)

    def read(store: Any) -> tuple[Any, list[AllocFact], dict[str, str]]:
        rep = ipam.check(store, name)
        allocs = []
        for kv in store.list(cluster_root(name) + "handles/"):
            a = ipam.decode_allocation(kv)
            allocs.append(AllocFact(a.container_id, a.ifname, a.node, tuple(str(x) for x in a.ips)))
        nodes = {n.name: str(n.block) for n in ipam.list_nodes(store, name)}
        return rep, allocs, nodes

    rep, allocs, store_nodes = control.with_store(s, read)
    veths = {}
    for n in s.nodes:
        links = json.loads(netns.ip(n.netns, "-j", "link", "show").stdout or "[]")
        veths[n.name] = tuple(
            x["ifname"] for x in links if x["ifname"].startswith(("oc", "oz")) and not x["ifname"].startswith("ocni")
        )
    agents: dict[str, dict[str, Any]] = {}
    for n in s.nodes:
        try:
            agents[n.name] = query_agent(n.socket)
        except Exception as exc:  # noqa: BLE001 - the evidence is the point
            agents[n.name] = {"error": f"{type(exc).__name__}: {exc}"}
    pods = tuple(
        PodFact(p.key, p.node, p.container_id, p.netns, tuple(str(i.ip) for i in (p.ip, p.ip_v6) if i is not None))
        for p in s.pods
    )
    failures: tuple[str, ...] = ()
    if connectivity:
        failures = tuple(check.run_check(s).failures())
    return Facts(
        pods=pods,
        allocations=tuple(allocs),
        ipam_problems=tuple(f"{p.kind}: {p.message}" for p in rep.problems),
        veths=veths,
        pod_netns=tuple(netns.list_netns(topology.netns_prefix(name) + "pod.")),
        agents=agents,
        lab_nodes={n.name: str(n.block) for n in s.nodes},
        store_nodes=store_nodes,
        connectivity=failures,
    )


def settle(
    name: str,
    root: str,
    *,
    timeout: float = SETTLE,
    checks: int = 3,
    excused: Mapping[str, str] = {},  # noqa: B006 - read only
) -> tuple[Facts, list[str]]:
    """Gather until the invariants hold or ``timeout`` passes (state only),
    then ``lab check`` up to ``checks`` times, a few seconds apart."""
    deadline = time.monotonic() + timeout
    while True:
        facts = gather(name, root, connectivity=False)
        bad = violations(facts, excused=excused)
        if not bad or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if bad:
        return facts, bad
    for attempt in range(checks):
        facts = gather(name, root, connectivity=True)
        bad = violations(facts, excused=excused)
        if not bad:
            break
        if attempt + 1 < checks:
            time.sleep(5.0)
    return facts, bad


# --- the operations -----------------------------------------------------------------------------


@dataclass
class Soak:
    name: str
    root: str
    rng: random.Random
    burst: int = 5
    log: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    serial: int = 0
    deleted: list[tuple[float, str, str, str]] = field(default_factory=list)  # (when, node, container ID, pod)
    excused: dict[str, str] = field(default_factory=dict)  # container ID -> node: see ``violations``
    leaked: set[str] = field(default_factory=set)  # the excused seen still allocated at a check
    faults: tuple[str, ...] = ()  # the opt-in operations of ``FAULTS`` this run may pick
    store: str = "sqlite"
    refused: list[str] = field(default_factory=list)  # ADDs refused while etcd was away (allowed, recorded)
    traffic: list[str] = field(default_factory=list)  # per traffic op: lost/sent during the restart

    def state(self) -> Any:
        from overlaycni.lab import state as st

        return st.load(self.name, self.root)

    def _pod_name(self) -> str:
        self.serial += 1
        return f"s{self.serial}"

    def _labels(self) -> tuple[tuple[str, str], ...]:
        return (("app", self.rng.choice(APPS)),) if self.rng.random() < 0.8 else ()

    def pick(self) -> str:
        s = self.state()
        weights = {**WEIGHTS, **{k: FAULTS[k] for k in self.faults if k != "etcd_pause" or self.store == "etcd"}}
        ok = [k for k in weights if self.possible(k, s)]
        return self.rng.choices(ok, weights=[weights[k] for k in ok])[0]

    @staticmethod
    def possible(kind: str, s: Any) -> bool:
        if kind == "traffic":
            return len({p.node for p in s.pods}) >= 2
        if kind in ("pod_add", "burst"):
            return len(s.pods) < MAX_PODS
        if kind in ("pod_del", "pod_label", "pod_readd", "pod_reuse_ip"):
            return bool(s.pods)
        if kind == "node_add":
            return len(s.nodes) < MAX_NODES
        if kind == "node_del":
            return len(s.nodes) > 2
        return True

    def run(self, kind: str) -> str:
        self.counts[kind] += 1
        return getattr(self, f"op_{kind}")(self.state())

    def _add(self, s: Any) -> Callable[[], str]:
        from overlaycni.lab import members

        pod, ns, node, labels = (
            self._pod_name(),
            self.rng.choice(NAMESPACES),
            self.rng.choice(sorted(s.nodes, key=lambda n: n.name)).name,
            self._labels(),
        )

        def go() -> str:
            p = members.add_pod(self.name, pod, namespace=ns, node=node, labels=labels, root=self.root)
            return f"{p.key} on {node} {dict(labels)} -> {p.ip.ip if p.ip else None}{f' {p.ip_v6.ip}' if p.ip_v6 else ''}"

        return go

    def op_pod_add(self, s: Any) -> str:
        return "pod add " + self._add(s)()

    def op_burst(self, s: Any) -> str:
        k = min(self.burst, MAX_PODS - len(s.pods))
        jobs = [self._add(s) for _ in range(k)]
        with ThreadPoolExecutor(max_workers=k) as pool:
            futures = [pool.submit(j) for j in jobs]
            done = [f.result() for f in futures]
        return f"burst of {k}: " + "; ".join(done)

    def op_pod_del(self, s: Any) -> str:
        from overlaycni.lab import members

        p = self.rng.choice(sorted(s.pods, key=lambda p: p.key))
        members.delete_pod(self.name, p.key, root=self.root)
        self.deleted.append((time.monotonic(), p.node, p.container_id, p.key))
        return f"pod delete {p.key} (on {p.node}, {p.ip.ip if p.ip else None})"

    def op_pod_readd(self, s: Any) -> str:
        """DEL a pod and ADD it again at once, same name and node: the same
        container ID (the lab derives it from the name), so the same
        attachment, while its first allocation is quarantined."""
        from overlaycni.lab import members

        p = self.rng.choice(sorted(s.pods, key=lambda p: p.key))
        members.delete_pod(self.name, p.key, root=self.root)
        self.deleted.append((time.monotonic(), p.node, p.container_id, p.key))
        q = members.add_pod(self.name, p.name, namespace=p.namespace, node=p.node, labels=p.labels, root=self.root)
        return f"pod re-add {p.key} on {p.node}: {p.ip.ip if p.ip else None} -> {q.ip.ip if q.ip else None}"

    def op_pod_reuse_ip(self, s: Any) -> str:
        """DEL a pod and ADD a new one on its node asking for its address
        (the CNI ``ips`` capability) while that address is quarantined."""
        from overlaycni.lab import members

        p = self.rng.choice(sorted(s.pods, key=lambda p: p.key))
        members.delete_pod(self.name, p.key, root=self.root)
        self.deleted.append((time.monotonic(), p.node, p.container_id, p.key))
        ips = tuple(str(i.ip) for i in (p.ip, p.ip_v6) if i is not None)
        q = members.add_pod(self.name, self._pod_name(), namespace=p.namespace, node=p.node, ips=ips, root=self.root)
        got = tuple(str(i.ip) for i in (q.ip, q.ip_v6) if i is not None)
        if got != ips:
            raise RuntimeError(f"{q.key} asked for {ips}, got {got}")
        return f"pod delete {p.key} + add {q.key} asking for its {', '.join(ips)}"

    def op_pod_label(self, s: Any) -> str:
        from overlaycni.lab import policy as lab_policy

        p = self.rng.choice(sorted(s.pods, key=lambda p: p.key))
        edit = "app-" if self.rng.random() < 0.3 and "app" in dict(p.labels) else f"app={self.rng.choice(APPS)}"
        lab_policy.label_pod(self.name, p.key, [edit], root=self.root)
        return f"pod label {p.key} {edit}"

    def op_node_add(self, s: Any) -> str:
        from overlaycni.lab import members

        n = members.add_node(self.name, root=self.root)
        return f"node add {n.name} {n.block}"

    def op_node_del(self, s: Any) -> str:
        from overlaycni.lab import members

        n = self.rng.choice(sorted(s.nodes, key=lambda n: n.name))
        dead = self.rng.random() < 0.5  # a VM that died: its agent is gone before the node is removed
        if dead:
            from overlaycni.lab import procs

            procs.kill(n.agent, signal.SIGKILL)
            procs.wait_until(lambda: not procs.alive(n.agent), timeout=30)
        members.delete_node(self.name, n.name, root=self.root)
        return f"node delete {n.name} (with {len(s.pods_on(n.name))} pods{', its agent SIGKILLed first' if dead else ''})"

    def _restart(self, s: Any, sig: int, node: Any = None) -> str:
        from overlaycni.lab import members, procs

        n = node if node is not None else self.rng.choice(sorted(s.nodes, key=lambda n: n.name))
        now = time.monotonic()
        procs.kill(n.agent, sig)
        late = [(cid, key) for t, node, cid, key in self.deleted if node == n.name and now - t < KILL_WINDOW]
        if sig == signal.SIGKILL:
            self.excused |= {cid: n.name for cid, _ in late}
        if not procs.wait_until(lambda: not procs.alive(n.agent), timeout=30):
            raise RuntimeError(f"agent of {n.name} (pid {n.agent.pid}) still runs 30 s after {signal.Signals(sig).name}")
        new = members.restart_agent(self.name, n.name, root=self.root)
        note = f" ({', '.join(k for _, k in late)} deleted < {KILL_WINDOW:.0f} s before)" if late else ""
        return f"agent {signal.Signals(sig).name} + restart on {n.name}: pid {n.agent.pid} -> {new.agent.pid if new.agent else None}{note}"

    def op_agent_kill(self, s: Any) -> str:
        return self._restart(s, signal.SIGKILL)

    def op_agent_term(self, s: Any) -> str:
        return self._restart(s, signal.SIGTERM)

    def op_agent_down(self, s: Any) -> str:
        """SIGKILL an agent and leave it dead past its lease (the peers drop
        the node), then restart it (they take it back)."""
        from overlaycni.lab import members, procs

        n = self.rng.choice(sorted(s.nodes, key=lambda n: n.name))
        now = time.monotonic()
        procs.kill(n.agent, signal.SIGKILL)
        late = [(cid, key) for t, node, cid, key in self.deleted if node == n.name and now - t < KILL_WINDOW]
        self.excused |= {cid: n.name for cid, _ in late}
        time.sleep(s.lease_ttl + 2)
        new = members.restart_agent(self.name, n.name, root=self.root)
        return f"agent SIGKILL on {n.name}, down {s.lease_ttl + 2} s (past its lease), restart: pid {new.agent.pid if new.agent else None}"

    def op_inflight(self, s: Any) -> str:
        """SIGKILL a node's agent while ADDs and DELs on that node are in
        flight (threads calling ``lab pod add``/``pod delete``'s own code),
        then restart it. The runtime's side, as the CNI spec asks of it: an
        ADD that failed is followed by a DEL of the same attachment (the lab's
        ``pod add`` tries one at once, best effort, while the agent may still
        be dead; the DEL is repeated here once the agent is back, as kubelet
        retries a sandbox's teardown), then maybe a fresh ADD of the pod; a
        DEL that failed is repeated. A DEL that succeeded was answered by the
        killed agent and may have been quarantined in its memory: excused, as
        ``_restart`` does (soak seed 13, both stores, before this rule)."""
        from overlaycni.lab import control, lifecycle, members, netns, procs

        room = len(s.pods) < MAX_PODS
        n = self.rng.choice(sorted((n for n in s.nodes if room or s.pods_on(n.name)), key=lambda n: n.name))
        here = sorted(s.pods_on(n.name), key=lambda p: p.key)
        k_add = self.rng.randint(1, min(3, MAX_PODS - len(s.pods))) if room else 0
        dels = self.rng.sample(here, self.rng.randint(0 if k_add else 1, min(2, len(here)))) if here else []
        adds = [(self._pod_name(), self.rng.choice(NAMESPACES), self._labels()) for _ in range(k_add)]
        delay = self.rng.uniform(*INFLIGHT_DELAY)
        target = self.rng.randrange(len(adds)) if adds else None  # the ADD whose namespace starts the clock
        redo = self.rng.random() < 0.5  # a fresh ADD of each pod whose ADD failed
        finished: dict[str, float] = {}

        def add(pod: str, ns: str, labels: tuple[tuple[str, str], ...]) -> Any:
            out = members.add_pod(self.name, pod, namespace=ns, node=n.name, labels=labels, root=self.root)
            finished[f"{ns}/{pod}"] = time.monotonic()
            return out

        def delete(key: str) -> Any:
            out = members.delete_pod(self.name, key, root=self.root)
            finished[key] = time.monotonic()
            return out

        with ThreadPoolExecutor(max_workers=len(adds) + len(dels)) as pool:
            fa = [pool.submit(add, *a) for a in adds]
            fd = [pool.submit(delete, p.key) for p in dels]
            if target is not None:
                pod, ns, _ = adds[target]
                ns_name = lifecycle.new_pod(s, pod, namespace=ns, node=n.name).netns
                procs.wait_until(lambda: netns.netns_exists(ns_name) or fa[target].done(), timeout=30, interval=0.002)
            time.sleep(delay)
            procs.kill(n.agent, signal.SIGKILL)
            killed = time.monotonic()
            if not procs.wait_until(lambda: not procs.alive(n.agent), timeout=30):
                raise RuntimeError(f"agent of {n.name} (pid {n.agent.pid}) still runs 30 s after SIGKILL")
            late = [(cid, key) for t, node, cid, key in self.deleted if node == n.name and killed - t < KILL_WINDOW]
            self.excused |= {cid: n.name for cid, _ in late}
            members.restart_agent(self.name, n.name, root=self.root)
            add_out = [(a, f.exception()) for a, f in zip(adds, fa, strict=True)]
            del_out = [(p, f.exception()) for p, f in zip(dels, fd, strict=True)]
        done: list[str] = []
        for (pod, ns, labels), exc in add_out:
            if exc is None:
                t = finished[f"{ns}/{pod}"]
                done.append(f"ADD {ns}/{pod} ok, done {'before' if t < killed else 'after'} the kill")
                continue
            # the runtime's DEL of the failed ADD's attachment, now that the agent is back
            q = lifecycle.new_pod(self.state(), pod, namespace=ns, node=n.name, labels=labels)
            control.cni_del(self.state(), self.state().node(n.name), q)
            note = f"ADD {ns}/{pod} failed ({type(exc).__name__}: {str(exc)[:80]}), DEL ok"
            if redo:
                r = add(pod, ns, labels)
                note += f", ADD again -> {r.ip.ip if r.ip else None}"
            done.append(note)
        for p, exc in del_out:
            if exc is None:
                # Answered by the killed agent (the lab's DEL does not retry, and no DEL started before the kill
                # can reach the new agent, ready seconds later), so quarantined in its memory: lost with it.
                # (``finished`` is no guide: the lab's own bookkeeping after the DEL ends after the restart.)
                self.excused[p.container_id] = n.name
                self.deleted.append((finished[p.key], n.name, p.container_id, p.key))
                done.append(f"DEL {p.key} ok, done {'before' if finished[p.key] < killed else 'after'} the kill")
                continue
            members.delete_pod(self.name, p.key, root=self.root)  # the runtime retries the teardown
            self.deleted.append((time.monotonic(), n.name, p.container_id, p.key))
            done.append(f"DEL {p.key} failed ({type(exc).__name__}), DEL again ok")
        trigger = f"{adds[target][1]}/{adds[target][0]}'s namespace" if target is not None else "the DELs' start"
        return f"in flight on {n.name}: SIGKILL {delay * 1000:.0f} ms after {trigger}, restart; " + "; ".join(done)

    def op_etcd_pause(self, s: Any) -> str:
        """Stop etcd (SIGSTOP) for a few seconds while pod adds and deletes
        run, then let it go on (SIGCONT). An ADD may fail with a clear CNI
        error while etcd is away (allowed, recorded, then cleaned up by the
        lab's own DEL); a DEL must not be lost: one that failed is repeated
        once etcd is back, as a runtime would."""
        from overlaycni.errors import OverlayCNIError
        from overlaycni.lab import members, procs

        if s.etcd is None or not procs.alive(s.etcd):
            raise RuntimeError("etcd_pause: the lab's etcd is not running")
        pause = self.rng.uniform(*ETCD_PAUSE)
        k_add = self.rng.randint(0, min(2, MAX_PODS - len(s.pods)))
        dels = self.rng.sample(sorted(s.pods, key=lambda p: p.key), self.rng.randint(0, min(2, len(s.pods))))
        adds = [self._add(s) for _ in range(k_add)]
        pool = ThreadPoolExecutor(max_workers=max(1, len(adds) + len(dels)))
        stopped = time.monotonic()
        procs.kill(s.etcd, signal.SIGSTOP)
        try:
            fa = [pool.submit(a) for a in adds]
            fd = [pool.submit(members.delete_pod, self.name, p.key, root=self.root) for p in dels]
            time.sleep(pause)
        finally:
            procs.kill(s.etcd, signal.SIGCONT)  # before waiting for the requests: they may wait for etcd
            pool.shutdown(wait=True)
        # A quarantined DEL releases its address through etcd: one still held when etcd stopped is held
        # until it is back, and a SIGKILL that soon after loses it (the reaper's case): its clock restarts now.
        back = time.monotonic()
        self.deleted = [(back if t > stopped - KILL_WINDOW else t, node, cid, key) for t, node, cid, key in self.deleted]
        done: list[str] = []
        for fut in fa:
            exc = fut.exception()
            if exc is None:
                done.append(f"ADD {fut.result()}")
            elif isinstance(exc, OverlayCNIError):
                line = f"ADD refused: {type(exc).__name__}: {exc}"
                self.refused.append(line)
                done.append(line)
            else:
                raise exc
        for p, f in zip(dels, fd, strict=True):
            exc = f.exception()
            if exc is not None:
                if not isinstance(exc, OverlayCNIError):
                    raise exc
                members.delete_pod(self.name, p.key, root=self.root)
                done.append(f"DEL {p.key} failed ({type(exc).__name__}: {str(exc)[:80]}), DEL again ok")
            else:
                done.append(f"DEL {p.key} ok")
            self.deleted.append((time.monotonic(), p.node, p.container_id, p.key))
        return f"etcd SIGSTOP {pause:.1f} s: " + ("; ".join(done) or "nothing in flight")

    def op_traffic(self, s: Any) -> str:
        """A continuous ping between two pods on different nodes while one
        of their nodes' agents restarts (SIGTERM or SIGKILL). The pods' data
        path must not depend on the agent: the losses are recorded (and
        printed), never asserted."""
        from overlaycni.lab import netns

        pods = sorted(s.pods, key=lambda p: p.key)
        a = self.rng.choice(pods)
        b = self.rng.choice([p for p in pods if p.node != a.node])
        node = s.node(self.rng.choice([a.node, b.node]))
        sig = self.rng.choice([signal.SIGTERM, signal.SIGKILL])
        assert b.ip is not None
        argv = netns.in_ns(a.netns, ["ping", "-n", "-q", "-i", str(PING_INTERVAL), str(b.ip.ip)])
        ping = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(1.0)
            what = self._restart(s, sig, node)
            time.sleep(1.0)
        finally:
            ping.send_signal(signal.SIGINT)
            out, _ = ping.communicate(timeout=30)
        sent, got = _ping_counts(out)
        line = f"{a.key} -> {b.key} ({b.ip.ip}) during {signal.Signals(sig).name} of {node.name}'s agent: {sent - got}/{sent} lost"
        self.traffic.append(line)
        return f"traffic {line}; {what}"

    def op_policy(self, s: Any) -> str:
        """Apply (or delete) a policy that selects pods by app but allows all
        ingress and egress: the agents render it, connectivity is unchanged."""
        from overlaycni.lab import control
        from overlaycni.policy.model import parse_policies
        from overlaycni.policy.records import delete_policy, save_policies

        ns, app = self.rng.choice(NAMESPACES), self.rng.choice(APPS)
        if self.rng.random() < 0.4:
            gone = control.with_store(s, lambda store: delete_policy(store, self.name, namespace=ns, name=f"soak-{app}"))
            return f"policy delete {ns}/soak-{app} ({'deleted' if gone else 'was not there'})"
        doc = {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"soak-{app}", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{}], "egress": [{}]},
        }  # fmt: skip
        policies = parse_policies(json.dumps(doc))
        control.with_store(s, lambda store: save_policies(store, self.name, policies=policies))
        return f"policy apply {ns}/soak-{app} (selects app={app}, allows all)"


def _ping_counts(out: str) -> tuple[int, int]:
    """(transmitted, received) from iputils ping's summary line."""
    import re

    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
    if m is None:
        raise RuntimeError(f"ping printed no summary: {out[-300:]}")
    return int(m.group(1)), int(m.group(2))


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    seed: int
    steps: int
    log: list[str]
    counts: Counter[str]
    evidence: list[str]
    seconds: float
    checks: int
    excused: dict[str, str] = field(default_factory=dict)
    leaked: set[str] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)
    traffic: list[str] = field(default_factory=list)


def run(
    *, seed: int, steps: int, check_every: int, up_args: list[str], root: str, name: str, keep: bool = False,
    say: Callable[[str], None] = print, faults: tuple[str, ...] = (), reap_check: bool = False,
) -> Outcome:  # fmt: skip
    from overlaycni.lab import lifecycle

    env = {**os.environ, "OVERLAYCNI_LAB_DIR": root}
    rng = random.Random(seed)
    store = up_args[up_args.index("--store") + 1] if "--store" in up_args else "sqlite"
    soak = Soak(name, root, rng, faults=faults, store=store)
    t0 = time.monotonic()
    evidence: list[str] = []
    checks = 0
    done = 0
    try:
        argv = [OC, "lab", "up", "--name", name, "--nodes", "3", "--pods-per-node", "1", *up_args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            return Outcome(False, seed, 0, [], Counter(), [f"lab up failed: {proc.stderr[-2000:]}"], time.monotonic() - t0, 0)
        for step in range(1, steps + 1):
            kind = soak.pick()
            try:
                line = f"{step:3}: {soak.run(kind)}"
            except Exception as exc:  # noqa: BLE001 - an operation that fails is a finding
                line = f"{step:3}: {kind} FAILED: {type(exc).__name__}: {exc}"
                soak.log.append(line)
                say(line)
                evidence = [line, *(str(getattr(exc, "details", "")) or "").splitlines()]
                break
            soak.log.append(line)
            say(line)
            done = step
            if step % check_every == 0 or step == steps:
                checks += 1
                facts, bad = settle(name, root, excused=soak.excused)
                held = {a.container_id for a in facts.allocations}
                soak.leaked |= {cid for cid in soak.excused if cid in held}
                say(f"     check after step {step}: {'ok' if not bad else f'{len(bad)} violation(s)'}")
                if bad:
                    evidence = bad
                    break
        if reap_check and not evidence and done == steps:
            evidence = reaped(name, root, soak.excused, say=say)
    finally:
        if not keep:
            lifecycle.down(name, root=root)
    return Outcome(
        not evidence, seed, done, soak.log, soak.counts, evidence, time.monotonic() - t0, checks, soak.excused, soak.leaked,
        soak.refused, soak.traffic,
    )


def reaped(name: str, root: str, excused: Mapping[str, str], *, say: Callable[[str], None]) -> list[str]:
    """The excused are the reaper's (an allocation whose veth is gone, released ``--reap-grace``
    after its agent's restart): wait up to ``REAP_WAIT`` for each to go; any still held is a leak."""
    deadline = time.monotonic() + REAP_WAIT
    while True:
        facts = gather(name, root, connectivity=False)
        pods = {p.container_id for p in facts.pods}
        held = sorted({f"{a.ips} on {a.node} ({a.container_id})" for a in facts.allocations
                       if a.container_id in excused and a.container_id not in pods
                       and a.node in facts.lab_nodes})  # fmt: skip  (a deleted node's agent reaps nothing)
        if not held or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    say(f"     reaper check: {'every excused allocation released' if not held else f'{len(held)} still held'}")
    return [f"not reaped within {REAP_WAIT:.0f} s: {h}" for h in held]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--backend", default="vxlan")
    ap.add_argument("--store", default="sqlite")
    ap.add_argument("--ip-families", default=None)
    ap.add_argument("--keep", action="store_true", help="leave the lab up (take it down with `overlaycni lab down`)")
    ap.add_argument("--faults", default=",".join(FAULT_NAMES),
                    help=f"the later faults this run may pick, comma-separated, from {','.join(FAULT_NAMES)} ('' for none: "
                         "the operations of seeds replayed from before they existed; etcd_pause only with --store etcd)")
    ap.add_argument("--no-reap-check", action="store_true",
                    help=f"skip the end's wait (up to {REAP_WAIT:.0f} s) for the reaper to release every excused allocation")
    args = ap.parse_args()
    faults = tuple(f for f in args.faults.split(",") if f)
    if bad := [f for f in faults if f not in FAULTS]:
        ap.error(f"--faults: unknown {', '.join(bad)} (known: {', '.join(FAULT_NAMES)})")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    up = ["--backend", args.backend, "--store", args.store, *(["--ip-families", args.ip_families] if args.ip_families else [])]
    name = f"sk{secrets.token_hex(3)}"
    root = tempfile.mkdtemp(prefix="soak-")
    print(f"soak seed={seed} steps={args.steps} lab={name} root={root} up={' '.join(up)}", flush=True)
    out = run(seed=seed, steps=args.steps, check_every=args.check_every, up_args=up, root=root, name=name, keep=args.keep,
              say=lambda s: print(s, flush=True), faults=faults,
              reap_check=not args.no_reap_check)  # fmt: skip
    if not args.keep:
        os.rmdir(root) if os.path.isdir(root) and not os.listdir(root) else None
    ops = ", ".join(f"{k} {v}" for k, v in sorted(out.counts.items()))
    print(
        f"soak seed={seed}: {'PASS' if out.ok else 'FAIL'} after {out.steps} steps, {out.checks} checks, {out.seconds:.0f} s; {ops}"
    )
    if out.excused:
        print(
            f"excused (a DEL answered < {KILL_WINDOW:.0f} s before its agent's SIGKILL, or by an agent killed mid-request; the reaper's to release): "
            + ", ".join(
                f"{cid[:12]} on {node}{' (held at a check)' if cid in out.leaked else ''}" for cid, node in out.excused.items()
            )
        )
    for line in out.refused:
        print(f"refused while etcd was stopped (allowed): {line}")
    for line in out.traffic:
        print(f"traffic: {line}")
    if not out.ok:
        print("step log:\n  " + "\n  ".join(out.log))
        print("evidence:\n  " + "\n  ".join(out.evidence))
        print(
            f"replay: .venv/bin/python bench/soak.py --seed {seed} --steps {args.steps} --check-every {args.check_every} "
            f"{' '.join(up)} --faults '{','.join(faults)}'"
        )
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
