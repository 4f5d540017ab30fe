"""Fail closed, repair fast: the node's own kernel objects, watched and restored.

The node's enforcement lives in the kernel: the ``ip overlaycni`` table
(SNAT, anti-spoofing, VXLAN filter), the NetworkPolicy table ``inet
overlaycni``, the VXLAN device with its neighbours and FDB entries, the
routes (peers, pods, the pod CIDR catch-all) and the gateway address. Any
of them can be removed or edited by another process (``nft flush ruleset``,
``ip link del``, a network manager's cleanup).

``Repairer`` reads the data plane's ``KernelEvents`` (netlink notifications
of changes made by other processes: ``dataplane.linux.monitor``). On one it
waits ``DEBOUNCE`` for the rest of a burst, then reconciles the kernel to
the node's last desired state (the last full resync's, with the pods the CNI
batches attached since laid over it: ``podlog``) and re-applies the last NetworkPolicy render
if that table drifted (``PolicyTable.repair``). Neither step needs the
datastore, so a node repairs itself during an outage of the control plane
too. The agent's stop closes the events first, which wakes ``run`` at once;
no repair starts after the stop. Without events it checks every ``REPAIR_INTERVAL`` seconds anyway (a
lost event, an overflowed socket). Each change seen counts in
``overlaycni_foreign_changes_total``, each object restored once in
``overlaycni_repairs_total{object}`` (the periodic resync may restore one
first: then it is not counted here); while a detected change is not
repaired (the repair failed) ``missing`` says why and ``/healthz`` answers
503.

Rejected: repairing from the periodic resync alone (30 s of a node without
SNAT or policy), and re-applying everything on every event (our own pod ADDs
would each cost a full reconcile: the monitor skips our own changes).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..dataplane.ports import KernelEvents
from ..errors import OverlayCNIError
from .node import RunningNode

log = logging.getLogger(__name__)
DEBOUNCE = 0.1
ENFORCEMENT_STEPS = ("device", "gateway", "nft", "sysctls")  # reconcile steps whose failure leaves a hole


class NoEvents:
    """``KernelEvents`` where netlink multicast is unavailable: nothing is
    heard, so the loop's poll (and the periodic resync) find changes."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def wait(self, timeout: float) -> list[str]:
        self.stop.wait(timeout)
        return []

    def close(self) -> None:
        pass


class Repairer:
    def __init__(self, node: RunningNode, events: KernelEvents, *, interval: float) -> None:
        """``interval``: the node's resync interval (a check is due when no resync succeeded for that long)."""
        self.node = node
        self.events = events
        self.interval = interval
        self.missing: list[str] = []  # enforcement known to be missing right now (empty: none known)
        self.last_repair: str | None = None
        self.checks = 0

    def run(self) -> None:
        last = time.monotonic()
        stop = self.node.stop
        while not stop.is_set():
            try:
                reasons = self.events.wait(min(1.0, self.interval))
            except OSError as exc:
                log.warning("kernel events unreadable (%s); checking every %.0f s", exc, self.interval)
                reasons = []
                stop.wait(1.0)
            if stop.is_set():
                break  # no repair after the stop (``events.close`` woke us): the agent is closing its kernel handles
            if reasons:
                stop.wait(DEBOUNCE)  # let a burst (a flushed table is many messages) become one repair
                reasons += self.events.wait(0)
                if stop.is_set():
                    break
            elif time.monotonic() - last < self.interval or time.time() - self.node.last_resync < self.interval * 1.5:
                continue  # nothing heard, and the periodic resync covers a missed event
            last = time.monotonic()
            self.check(reasons)

    def check(self, reasons: list[str] | None = None) -> list[str]:
        """Restore whatever drifted from the last desired state; what was restored."""
        n = self.node
        self.checks += 1
        if reasons:
            n.metrics.foreign_changes.inc(len(reasons))
            shown = "; ".join(dict.fromkeys(reasons))  # each reason once, in order
            log.warning("node objects changed behind our back: %s", shown)
            self.missing = [f"changed behind our back: {r}" for r in list(dict.fromkeys(reasons))[:3]]
        try:
            with n.kernel_lock:
                report = n.dp.reconcile(n.current_state())  # with the pods attached since the last resync
                policy = n.dp.policy_table.repair()
        except OverlayCNIError as exc:
            self.missing = [f"repair failed: {exc}"]
            log.error("repair failed: %s", exc)
            return []
        restored = list(report.changes)
        if policy is not None:
            restored.append(f"nftables table inet overlaycni re-applied ({policy})")
        for change in restored:
            n.metrics.repairs.labels(_object_of(change)).inc()
        if restored:
            self.last_repair = "; ".join(restored[:5])
            log.warning("repaired %d object(s): %s", len(restored), self.last_repair)
        holes = [e for e in report.errors if e.startswith(ENFORCEMENT_STEPS)]
        self.missing = [f"repair incomplete: {e}" for e in holes]
        n.metrics.enforcement_ok.set(0 if self.missing else 1)
        return restored


def _object_of(change: str) -> str:
    """The kind of object a reconcile change names ("route ...", "nftables table ...", "3 fdbs replaced ...")."""
    words = change.split()
    word = words[1] if words and words[0].isdigit() and len(words) > 1 else (words[0] if words else "other")
    word = word.rstrip("s") if word.endswith(("routes", "fdbs", "neighbours")) else word
    return word if word in ("route", "fdb", "neighbour", "nftables", "link", "address", "sysctl") else "other"


if TYPE_CHECKING:  # mypy proves the fallback implements the port
    _no_events: type[KernelEvents] = NoEvents
