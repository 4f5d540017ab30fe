"""The Linux data plane: the engine wired to netlink and nftables ports.

Design note. ``LinuxDataplane(netns)`` starts one worker thread inside the
node namespace (``netns.NetnsWorker``) and creates every kernel handle on
it: a pyroute2 ``IPRoute`` for links, addresses and pod interfaces, one raw
batched rtnetlink socket (``rtnl``) for the per-peer objects, and one
libnftables context for every nftables table (the node's ``ip``, ``arp``
and ``ip6 overlaycni``, and the NetworkPolicy table, ``policy_table``). Every facade call is handed to that thread, so the
handles are used by one thread only (pyroute2 0.9 sockets are per thread,
libnftables contexts are not thread safe) and concurrent CNI requests are
serialised in arrival order. Two calls run on the caller's own thread,
because they must never wait behind (or hold up) the queue:
``open_pod_netns`` (the CNI_NETNS checks of ``netnscheck``, against the
namespaces the worker saw at start) and ``flush_conntrack`` (a raw
ctnetlink socket the worker opened in the node namespace; conntrack dumps
walk the kernel's whole hash, see ``conntrack``). The NFLOG socket of
``open_verdict_log`` (flow logs) is made on the worker, so it binds the
node namespace's group, then read by the agent's own thread. A fresh
process adopts whatever the kernel holds: it owns objects by
name/protocol/label (``ocni.vxlan``, ``oc*`` veths, proto 119 routes,
``lo:ocni``, ``table ip overlaycni``) rather than by remembering them.

With the wireguard backend the WireGuard port (``wgkernel.AutoWireGuard``)
is built on the same thread, so a wireguard-go it starts is born in the node
namespace. A ``ProcessWatcher`` thread wakes when that process exits and
reconciles the last desired state again through the worker (restarting it),
pausing longer each time it dies again within a minute.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from ...errors import DataplaneError, OverlayCNIError, PolicyApplyError
from ...families import PodAddress
from .. import nftmodel, nftmodel6, podguard, policytable, ports
from ..engine import NodeDataplane, Ports
from ..model import NodeInfo, NodeState, Peer, PodAttachment, PodInterface, ReconcileReport
from ..ports import KernelEvents
from ..wgmodel import WgDevice
from .conntrack import LinuxConntrack
from .links import LinuxAddresses, LinuxLinks, LinuxSysctls
from .monitor import KernelMonitor, calibration_commands
from .netns import NetnsWorker, forbidden_namespaces
from .netnscheck import open_pod_netns
from .nflog import LinuxVerdictLog
from .nft import LinuxNft, NftRunner
from .objects import LinuxFdb, LinuxNeighbours, LinuxRoutes
from .pods import LinuxPodLinks
from .procwatch import ProcessWatcher
from .rtnl import Rtnl
from .wgkernel import AutoWireGuard
from .wireguard import WireGuardSettings

__all__ = ["LinuxDataplane", "WireGuardSettings", "linux_ports"]
log = logging.getLogger("overlaycni.dataplane")
REPAIR_PAUSE_MAX = 30.0


def linux_ports(
    *, use_nft_library: bool = True, wireguard: WireGuardSettings | None = None, watcher: ProcessWatcher | None = None
) -> tuple[Ports, list[Any]]:
    """Build the Linux ports on the calling thread (which must be in the node namespace)."""
    ipr = IPRoute(groups=0)
    nl = Rtnl()
    runner = NftRunner(use_library=use_nft_library)
    wg = AutoWireGuard(ipr, wireguard or WireGuardSettings(), watcher=watcher)
    ports = Ports(
        links=LinuxLinks(ipr), addresses=LinuxAddresses(ipr), routes=LinuxRoutes(nl),
        neighbours=LinuxNeighbours(nl), fdb=LinuxFdb(nl), nft=LinuxNft(runner, decls=nftmodel.SET_DECLS),
        sysctls=LinuxSysctls(), pods=LinuxPodLinks(ipr, nl),
        policy_nft=LinuxNft(runner, family=policytable.FAMILY, table=policytable.TABLE, error=PolicyApplyError, direct_elements=True),
        arp_nft=LinuxNft(runner, family=podguard.ARP_FAMILY, table=podguard.TABLE, decls=podguard.ARP_SET_DECLS),
        ip6_nft=LinuxNft(runner, family=nftmodel6.FAMILY, table=nftmodel6.TABLE, decls=nftmodel6.SET_DECLS),
        wireguard=wg,
    )
    return ports, [wg, ipr, nl, runner]


class WorkerPolicyTable:
    """The ``PolicyTable`` port whose calls run on the data plane's worker thread."""

    def __init__(self, worker: NetnsWorker, table: ports.PolicyTable) -> None:
        self._worker, self._table = worker, table

    def sync(self, render: dict[str, Any]) -> str:
        return self._worker.call(lambda: self._table.sync(render))

    def update(self, commands: list[dict[str, Any]], *, render: Callable[[], dict[str, Any]]) -> None:
        self._worker.call(lambda: self._table.update(commands, render=render))

    def reset(self) -> None:
        self._worker.call(self._table.reset)

    def repair(self) -> str | None:
        return self._worker.call(self._table.repair)

    def remove(self) -> None:
        self._worker.call(self._table.remove)


class LinuxDataplane:
    """The ``Dataplane`` facade for the node namespace ``netns`` (None: the current one)."""

    def __init__(
        self, netns: str | None = None, *, use_nft_library: bool = True, wireguard: WireGuardSettings | None = None
    ) -> None:
        self.netns = netns
        self._closed = False
        self._use_nft_library = use_nft_library
        self._worker = NetnsWorker(netns)
        self._watcher = ProcessWatcher(self._wireguard_exited)
        self._repairs: list[float] = []
        self._closing = threading.Event()
        self.repaired = threading.Event()  # set after each repair (tests wait on it)
        try:
            self._ports, self._handles = self._worker.call(
                lambda: linux_ports(use_nft_library=use_nft_library, wireguard=wireguard, watcher=self._watcher)
            )
            self._forbidden = self._worker.call(forbidden_namespaces)
            self._conntrack = self._worker.call(LinuxConntrack)
            self._handles.append(self._conntrack)
        except BaseException:
            self._watcher.close()
            self._worker.close()
            raise
        self._engine = NodeDataplane(self._ports)
        self.policy_table: ports.PolicyTable = WorkerPolicyTable(self._worker, self._engine.policy_table)

    def _wireguard_exited(self, pid: int) -> None:
        """wireguard-go ``pid`` exited (watcher thread): reconcile the last state again."""
        state = self._engine.last_state
        if self._closed or state is None or state.backend != "wireguard":
            return
        now = time.monotonic()
        self._repairs = [t for t in self._repairs if now - t < 60] + [now]
        pause = min(REPAIR_PAUSE_MAX, 0.5 * 2 ** (len(self._repairs) - 1)) if len(self._repairs) > 1 else 0.0
        log.warning("wireguard-go (pid %d) exited; restarting it%s", pid, f" in {pause:.1f}s" if pause else "")
        if self._closing.wait(pause):
            return
        try:
            report = self._worker.call(lambda: self._engine.reconcile(self._engine.last_state or state))
        except Exception as exc:  # noqa: BLE001 - a repair must not kill the watcher thread
            log.warning("wireguard repair failed: %s", exc)
            return
        log.info("wireguard repair: %s%s", "; ".join(report.changes[:10]) or "no changes",
                 f" (errors: {'; '.join(report.errors[:3])})" if report.errors else "")  # fmt: skip
        self.repaired.set()

    @property
    def ports(self) -> Ports:
        return self._ports

    def run(self, fn):
        """Run ``fn()`` on the worker thread (inside the node namespace)."""
        return self._worker.call(fn)

    def node_info(self, node_ip: IPv4Address, *, backend: str, mtu: int | None) -> NodeInfo:
        return self._worker.call(lambda: self._engine.node_info(node_ip, backend=backend, mtu=mtu))

    def find_node_ip_v6(self, node_ip: IPv4Address, *, subnet: IPv6Network) -> IPv6Address | None:
        return self._worker.call(lambda: self._engine.find_node_ip_v6(node_ip, subnet=subnet))

    @contextmanager
    def open_pod_netns(self, path: str) -> Iterator[int | None]:
        """CNI_NETNS validated and opened (``netnscheck``) in the caller's
        thread; the descriptor is valid for the body (``netns_fd=``)."""
        fd = open_pod_netns(path, forbidden=self._forbidden)
        try:
            yield fd
        finally:
            os.close(fd)

    def reconcile(self, state: NodeState) -> ReconcileReport:
        return self._worker.call(lambda: self._engine.reconcile(state))

    def ensure_peer(self, state: NodeState, peer: Peer) -> None:
        self._worker.call(lambda: self._engine.ensure_peer(state, peer))

    def delete_peer(self, state: NodeState, peer: Peer) -> None:
        self._worker.call(lambda: self._engine.delete_peer(state, peer))

    def ensure_peers(self, state: NodeState, peers: Sequence[Peer]) -> dict[str, OverlayCNIError]:
        return self._worker.call(lambda: self._engine.ensure_peers(state, peers))

    def delete_peers(self, state: NodeState, peers: Sequence[Peer]) -> None:
        self._worker.call(lambda: self._engine.delete_peers(state, peers))

    def attach_pod(
        self, *, container_id: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress], mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface:
        return self._worker.call(lambda: self._engine.attach_pod(
            container_id=container_id, ifname=ifname, netns_path=netns_path, addresses=addresses, mtu=mtu,
            netns_fd=netns_fd))

    def attach_pods(self, pods: Sequence[PodAttachment]) -> list[PodInterface | Exception]:
        return self._worker.call(lambda: self._engine.attach_pods(pods))  # one worker hop for the batch

    def detach_pods(self, pods: Sequence[tuple[str, str]]) -> list[Exception | None]:
        return self._worker.call(lambda: self._engine.detach_pods(pods))

    def park_pods(self, pods: Sequence[tuple[str, str]]) -> list[Exception | None]:
        return self._worker.call(lambda: self._engine.park_pods(pods))

    def delete_parked_veths(self) -> None:
        self._worker.call(self._engine.delete_parked_veths)

    def list_parked_veths(self) -> list[str]:
        return self._worker.call(self._engine.list_parked_veths)

    def detach_pod(self, *, container_id: str, ifname: str, netns_path: str | None) -> None:
        self._worker.call(lambda: self._engine.detach_pod(container_id=container_id, ifname=ifname, netns_path=netns_path))

    def check_pod(
        self, *, container_id: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress],
        netns_fd: int | None = None,
    ) -> list[str]:
        return self._worker.call(lambda: self._engine.check_pod(
            container_id=container_id, ifname=ifname, netns_path=netns_path, addresses=addresses, netns_fd=netns_fd))

    def wireguard_device(self) -> WgDevice | None:
        return self._worker.call(self._engine.wireguard_device)

    def list_pod_veths(self) -> list[str]:
        return self._worker.call(self._engine.list_pod_veths)

    def delete_pod_veth(self, host_veth: str) -> None:
        self._worker.call(lambda: self._engine.delete_pod_veth(host_veth))

    def flush_conntrack(self, ip: IPv4Address | IPv6Address) -> int:
        return self._conntrack.flush_address(ip)  # the caller's thread: see the design note

    def drop_counters(self) -> dict[str, int]:
        return self._worker.call(self._engine.drop_counters)
    def adopted_block(self, prefixlen: int) -> IPv4Network | None:
        return self._worker.call(lambda: self._engine.adopted_block(prefixlen))

    def kernel_events(self) -> KernelEvents:
        """A ``monitor.KernelMonitor`` in the node namespace that ignores this
        data plane's own changes."""
        return self._worker.call(self._open_monitor)

    def _open_monitor(self) -> KernelMonitor:
        ipr = next(h for h in self._handles if isinstance(h, IPRoute))
        nl = next(h for h in self._handles if isinstance(h, Rtnl))
        runner = next(h for h in self._handles if isinstance(h, NftRunner))
        own = {nl.sock.getsockname()[0]}
        try:  # pyroute2 keeps its socket behind an asyncio transport
            own.add(ipr.asyncore.transport.get_extra_info("socket").getsockname()[0])
        except (AttributeError, OSError):
            pass  # its changes then show as foreign: a needless check, nothing worse
        mon = KernelMonitor(own_ports=own)
        mon.expect_calibration()
        try:
            runner.run({"nftables": calibration_commands(nftmodel.FAMILY, nftmodel.TABLE)}, what="calibration")
        except DataplaneError:
            pass  # no table yet: our pid as this process sees it is the fallback
        return mon

    def open_verdict_log(self, *, group: int) -> LinuxVerdictLog:
        """Bind NFLOG ``group`` in the node namespace (``linux.nflog``)."""
        return LinuxVerdictLog(
            self._worker, group=group, family=policytable.FAMILY, table=policytable.TABLE,
            use_nft_library=self._use_nft_library,
        )  # fmt: skip

    def flush_conntrack_many(self, ips: Sequence[IPv4Address | IPv6Address]) -> int:
        return self._conntrack.flush_addresses(ips)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._watcher.close()

        def _close() -> None:
            for h in self._handles:
                h.close()
        try:
            self._worker.call(_close)
        finally:
            self._worker.close()

    def __enter__(self) -> LinuxDataplane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if TYPE_CHECKING:  # mypy proves that each Linux adapter implements its port
    _links: type[ports.Links] = LinuxLinks
    _addresses: type[ports.Addresses] = LinuxAddresses
    _routes: type[ports.Routes] = LinuxRoutes
    _neighbours: type[ports.Neighbours] = LinuxNeighbours
    _fdb: type[ports.Fdb] = LinuxFdb
    _nft: type[ports.NftRuleset] = LinuxNft
    _policy_table: type[ports.PolicyTable] = WorkerPolicyTable
    _verdict_log: type[ports.VerdictLog] = LinuxVerdictLog
    _sysctls: type[ports.Sysctls] = LinuxSysctls
    _pods: type[ports.PodLinks] = LinuxPodLinks
    _conntrack: type[ports.Conntrack] = LinuxConntrack
    _dataplane: type[ports.Dataplane] = LinuxDataplane
    _events: type[ports.KernelEvents] = KernelMonitor
