"""The data plane's ports: one small ``Protocol`` per kind of kernel object.

``fake.py`` implements each in memory, ``linux/`` with netlink and nftables.
All calls act on one network namespace chosen when the adapter is built
(the node's); the pod side (``PodLinks``) takes the pod's netns path per call.
Lists return only objects this project owns (routes with ``RT_PROTO``,
neighbours and FDB entries on the VXLAN device, ``lo:ocni`` addresses).
``apply_*`` calls are batched and raise ``DataplaneError`` listing every
failed object; deleting something that is not there is success. Every
nftables table (the node's ``ip``, ``arp`` and ``ip6 overlaycni``, and the
NetworkPolicy table) goes through ``NftRuleset``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any, Protocol

from ..cidr import IPAddress
from ..errors import OverlayCNIError
from ..families import PodAddress
from .model import (
    FdbEntry,
    Link,
    Neighbour,
    NodeInfo,
    NodeState,
    Peer,
    PodAttachment,
    PodInterface,
    PodView,
    ReconcileReport,
    Route,
    VxlanSpec,
)
from .nflog import CaptureStats, LoggedPacket
from .nftmodel import NftState
from .wgmodel import WgDevice, WgPeer, WireGuardSpec


class Links(Protocol):
    def list_links(self) -> list[Link]: ...
    def get_link(self, name: str) -> Link | None: ...
    def link_with_address(self, ip: IPv4Address) -> Link | None: ...
    def ensure_vxlan(self, spec: VxlanSpec) -> list[str]: ...  # changes made
    def delete_link(self, name: str) -> bool: ...  # True if it existed


class Addresses(Protocol):
    """Addresses of one family at a time (``version``); IPv6 addresses are
    added without duplicate address detection (``nodad``), never tentative."""

    def list_addresses(self, dev: str, *, label: str | None = None, version: int = 4) -> list[IPv4Interface | IPv6Interface]: ...
    def ensure_address(self, dev: str, addr: IPv4Interface | IPv6Interface, *, label: str | None = None) -> bool: ...
    def delete_address(self, dev: str, addr: IPv4Interface | IPv6Interface) -> bool: ...


class Routes(Protocol):
    def list_routes(self) -> list[Route]: ...  # owned routes in the main table
    def apply_routes(self, *, replace: Sequence[Route] = (), delete: Sequence[Route] = ()) -> None: ...
    def lookup_gateway(self, dst: IPAddress) -> tuple[IPAddress | None, str | None]: ...  # (gateway, dev); either family


class Neighbours(Protocol):
    def list_neighbours(self, dev: str) -> list[Neighbour]: ...  # permanent entries, both families
    def get_neighbour(self, dev: str, ip: IPAddress) -> Neighbour | None: ...
    def apply_neighbours(self, *, replace: Sequence[Neighbour] = (), delete: Sequence[Neighbour] = ()) -> None: ...


class Fdb(Protocol):
    def list_fdb(self, dev: str) -> list[FdbEntry]: ...  # permanent entries with a remote
    def apply_fdb(self, *, replace: Sequence[FdbEntry] = (), delete: Sequence[FdbEntry] = ()) -> None: ...


class NftRuleset(Protocol):
    """One nftables table (the node's ``ip``/``arp``/``ip6 overlaycni``, or the policy table).
    ``apply`` runs any commands, so one transaction may span tables."""

    def get_table(self) -> NftState | None: ...  # None: no such table
    def list_set(self, name: str) -> frozenset | None: ...  # None: no table/set
    def counters(self) -> dict[str, int]: ...  # packets per named counter; {} when no table
    def apply(self, commands: list[dict[str, Any]]) -> None: ...  # one atomic transaction


class PolicyTable(Protocol):
    """The NetworkPolicy table ``inet overlaycni``: whole renders in
    (``policy.render.render_node``), the least change to the kernel."""

    def sync(self, render: dict[str, Any]) -> str: ...  # "none" | "elements" | "full": what reached the kernel
    # one transaction of changes (policy.incremental); render: the whole table then (for repair)
    def update(self, commands: list[dict[str, Any]], *, render: Callable[[], dict[str, Any]]) -> None: ...
    def reset(self) -> None: ...  # the next sync replaces the whole table (repairs drift)
    def repair(self) -> str | None: ...  # re-apply the last render if the kernel drifted from it; why, or None
    def remove(self) -> None: ...  # delete the table; already gone is success


class KernelEvents(Protocol):
    """Changes another process made to the objects this node owns (its link,
    addresses, routes, neighbours, FDB entries, nftables tables)."""

    def wait(self, timeout: float) -> list[str]: ...  # what changed, in words; [] after ``timeout`` s of quiet
    def close(self) -> None: ...  # from any thread: a ``wait`` returns [] at once, now and from then on


class VerdictLog(Protocol):
    """The packets the policy table's log rules hand to userspace (one NFLOG
    group of the node namespace), and what did not make it."""

    def receive(self, timeout: float) -> list[LoggedPacket]: ...  # waits up to timeout; one bounded batch
    def stats(self) -> CaptureStats: ...  # cumulative since opened
    def close(self) -> None: ...  # from any thread: a ``receive`` returns [] at once, now and from then on


class Sysctls(Protocol):
    def read(self, key: str) -> str | None: ...  # "net/ipv4/ip_forward"; None if absent
    def write(self, key: str, value: str) -> None: ...


class WireGuard(Protocol):
    """The node's WireGuard device: the kernel module through netlink, or
    ``wireguard-go`` through its UAPI socket (``linux/wireguard.py``)."""

    def ensure_device(self, spec: WireGuardSpec) -> list[str]: ...  # device up, key/port/MTU set; changes made
    def get_device(self, name: str) -> WgDevice | None: ...  # None: no such device
    def apply_peers(self, name: str, *, replace: Sequence[WgPeer] = (), remove: Sequence[str] = ()) -> None: ...
    def start_handshakes(self, name: str, keys: Sequence[str]) -> None: ...  # handshake with these peers now
    def delete_device(self, name: str) -> bool: ...  # True if it existed


class PodLinks(Protocol):
    """``netns_fd``: the pod namespace, already opened and validated by the
    caller (``Dataplane.open_pod_netns``); None: validate ``netns_path`` here.
    The batch calls (group commit) answer per pod, in order: a pod's failure
    leaves nothing of that pod and does not stop the others."""

    def setup_pod_link(
        self, *, host_veth: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress], mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface: ...  # veth pair, pod side configured (every address usable), host side up; rolls back on failure
    def setup_pod_links(self, pods: Sequence[PodAttachment]) -> list[PodInterface | Exception]: ...
    def teardown_pod_link(self, *, host_veth: str) -> None: ...
    def teardown_pod_links(self, host_veths: Sequence[str]) -> None: ...  # raises DataplaneError naming each failure
    # DEL: down, renamed ``model.parked_veth_name``, in link group ``model.PARK_GROUP`` (one gone: success)
    def park_pod_links(self, host_veths: Sequence[str]) -> None: ...
    def delete_parked_links(self) -> None: ...  # every link of ``PARK_GROUP``, in one batch
    def inspect_pod(self, *, netns_path: str, ifname: str, netns_fd: int | None = None) -> PodView | None: ...


class Conntrack(Protocol):
    """The node namespace's connection tracking table."""

    def flush_address(self, ip: IPv4Address | IPv6Address) -> int: ...  # entries whose original tuple names ip; returns how many
    def flush_addresses(self, ips: Sequence[IPv4Address | IPv6Address]) -> int: ...  # the same for several, walking the table once


class Dataplane(Protocol):
    """The facade the node agent calls (implemented by ``linux.LinuxDataplane`` and ``fake.FakeDataplane``)."""

    @property
    def policy_table(self) -> PolicyTable: ...  # the node's NetworkPolicy table

    def node_info(self, node_ip: IPv4Address, *, backend: str, mtu: int | None) -> NodeInfo: ...
    def find_node_ip_v6(self, node_ip: IPv4Address, *, subnet: IPv6Network) -> IPv6Address | None: ...  # on node_ip's device
    def open_pod_netns(self, path: str) -> AbstractContextManager[int | None]: ...  # validated fd, in the caller's thread
    def reconcile(self, state: NodeState) -> ReconcileReport: ...
    def ensure_peer(self, state: NodeState, peer: Peer) -> None: ...
    def delete_peer(self, state: NodeState, peer: Peer) -> None: ...
    # one pass for the peers of a selection; ensure returns the peers skipped (name -> why), the others programmed
    def ensure_peers(self, state: NodeState, peers: Sequence[Peer]) -> dict[str, OverlayCNIError]: ...
    def delete_peers(self, state: NodeState, peers: Sequence[Peer]) -> None: ...
    def attach_pod(
        self, *, container_id: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress], mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface: ...  # ``addresses``: one per family, IPv4 first
    def detach_pod(self, *, container_id: str, ifname: str, netns_path: str | None) -> None: ...
    # group commit: one pass for many pods, answered per pod in order (an error only fails its own pod)
    def attach_pods(self, pods: Sequence[PodAttachment]) -> list[PodInterface | Exception]: ...
    def detach_pods(self, pods: Sequence[tuple[str, str]]) -> list[Exception | None]: ...  # (container_id, ifname)
    # DEL: routes and elements gone, the host veth parked (down, renamed) until ``delete_parked_veths``
    def park_pods(self, pods: Sequence[tuple[str, str]]) -> list[Exception | None]: ...
    def delete_parked_veths(self) -> None: ...  # every parked veth (and so its pod end), in one batch
    def list_parked_veths(self) -> list[str]: ...
    def check_pod(
        self, *, container_id: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress],
        netns_fd: int | None = None,
    ) -> list[str]: ...
    def list_pod_veths(self) -> list[str]: ...
    def wireguard_device(self) -> WgDevice | None: ...
    def delete_pod_veth(self, host_veth: str) -> None: ...
    def flush_conntrack(self, ip: IPv4Address | IPv6Address) -> int: ...  # a released pod address's flows
    def drop_counters(self) -> dict[str, int]: ...  # packets dropped per filter rule (the node's tables)
    def adopted_block(self, prefixlen: int) -> IPv4Network | None: ...  # the block of the pods already here
    def kernel_events(self) -> KernelEvents: ...  # a new watcher of foreign changes
    def open_verdict_log(self, *, group: int) -> VerdictLog: ...  # binds the NFLOG group (flow logs)
    def flush_conntrack_many(self, ips: Sequence[IPv4Address | IPv6Address]) -> int: ...  # several, in one walk of the table
    def close(self) -> None: ...
