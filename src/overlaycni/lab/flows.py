"""A lab's flow logs: every node agent's ``GET /flows``, read from inside the lab.

Design note. Each lab agent serves ``/flows`` (``agent.flows``) on
``127.0.0.1:<port>`` of *its node's* network namespace; the port is the
one it picked at start and reported in its ready line (``nodes/<node>/
agent.out``). The root namespace never sends to a lab address (and its own
127.0.0.1 is not the node's), so each node is read from a thread that has
entered the node's namespace: one ``NetnsWorker`` per node (the one module
that enters namespaces), whose HTTP sockets are therefore created in that
namespace. Nodes are read in parallel and their records merged by time.
A follow keeps one long poll (``after`` + ``wait``) per node running on its
worker and hands each answer over as it arrives, so a busy node is never
held back by a quiet one.

Rejected: ``ip netns exec <node> curl`` (a process per node per poll, and
text to parse); forwarding the agents' ports to the root namespace (a lab
service reachable from the host); reading the node's NFLOG group here
(the agent already owns it: a group has one reader per namespace).
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..agent.flows import FlowFilter, FlowRecord, read_flows
from ..errors import AgentUnavailable, NotFound, OverlayCNIError
from . import control
from .state import LabState
from .topology import NETNS_PREFIX

FOLLOW_WAIT = 5.0


@dataclass(frozen=True)
class NodeAgent:
    node: str
    netns: str
    url: str  # the agent's metrics address, valid inside ``netns``


def _metrics_url(out: Path) -> str | None:
    """The metrics URL of the agent's last ready line."""
    url = None
    try:
        lines = out.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "ready":
            url = event.get("metrics")
    return url


def agents(state: LabState, *, node: str | None = None) -> list[NodeAgent]:
    """The nodes to read (all, or ``node``) with their agents' addresses."""
    nodes = [n for n in state.nodes if node is None or n.name == node]
    if not nodes:
        known = ", ".join(n.name for n in state.nodes) or "none"
        raise NotFound(f"--node: lab {state.name} has no node {node!r} (nodes: {known})")
    out = []
    for n in nodes:
        if not n.netns.startswith(NETNS_PREFIX):
            raise OverlayCNIError(f"refusing to read node {n.name}: {n.netns!r} is not a lab namespace")
        url = _metrics_url(control.node_dir(state, n.name) / "agent.out")
        if url is None:
            raise AgentUnavailable(f"node {n.name}: its agent reported no metrics address (is it running? lab status)")
        out.append(NodeAgent(n.name, n.netns, url))
    return out


class LabFlows:
    """Reads the flow logs of a lab's nodes; use as a context manager."""

    def __init__(self, state: LabState, *, node: str | None = None) -> None:
        from ..dataplane.linux.netns import NetnsWorker

        self.agents = agents(state, node=node)
        self._workers: dict[str, NetnsWorker] = {}
        try:
            for a in self.agents:
                self._workers[a.node] = NetnsWorker(a.netns)
        except BaseException:
            self.close()
            raise
        self._stop = threading.Event()
        self._cursors: dict[str, int] = {}  # node -> the cursor of its last answer

    def read(self, flt: FlowFilter) -> tuple[list[FlowRecord], dict[str, str]]:
        """Every node's matching records, oldest first; and, per node that
        did not answer, why."""
        results: dict[str, list[FlowRecord]] = {}
        errors: dict[str, str] = {}

        def one(a: NodeAgent) -> None:
            try:
                results[a.node], self._cursors[a.node] = self._workers[a.node].call(lambda: read_flows(a.url, flt))
            except OverlayCNIError as exc:
                errors[a.node] = exc.message

        threads = [threading.Thread(target=one, args=(a,), daemon=True) for a in self.agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return merge(results.values()), errors

    def follow(self, flt: FlowFilter) -> Iterator[tuple[list[FlowRecord], dict[str, str]]]:
        """What ``read`` returns, then batches of newer records (and errors)
        as nodes report them, until closed."""
        yield self.read(flt)
        inbox: queue.SimpleQueue[tuple[list[FlowRecord], dict[str, str]]] = queue.SimpleQueue()
        for a in self.agents:
            threading.Thread(target=self._poll, args=(a, flt), kwargs={"inbox": inbox}, name=f"flows-{a.node}", daemon=True).start()
        while not self._stop.is_set():
            try:
                yield inbox.get(timeout=0.5)
            except queue.Empty:
                continue

    def _poll(self, a: NodeAgent, flt: FlowFilter, *, inbox: queue.SimpleQueue) -> None:
        cursor = self._cursors.get(a.node, 0)
        while not self._stop.is_set():
            try:
                records, cursor = self._workers[a.node].call(
                    functools.partial(read_flows, a.url, flt, after=cursor, wait=FOLLOW_WAIT)
                )
                if records:
                    inbox.put((records, {}))
            except OverlayCNIError as exc:
                inbox.put(([], {a.node: exc.message}))
                self._stop.wait(FOLLOW_WAIT)

    def close(self) -> None:
        self._stop.set()
        for w in self._workers.values():
            threading.Thread(target=w.close, daemon=True).start()  # a long poll may still be waiting: do not block

    def __enter__(self) -> LabFlows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(batches: Iterable[list[FlowRecord]]) -> list[FlowRecord]:
    """Records of several nodes in one list, by time (then node)."""
    return sorted((r for batch in batches for r in batch), key=lambda r: (r.time, r.node, r.seq))
