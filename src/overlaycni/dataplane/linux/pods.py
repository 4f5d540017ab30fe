"""Pod interfaces: the veth pair between the node and a pod's namespace.

Design note. Per pod: one veth pair. The host end is named
``model.host_veth_name(containerID, ifname)`` (``oc`` + 13 hex, stable, so
DEL finds it without state); the pod end is created *directly inside* the
pod's namespace with its final name (``IFLA_NET_NS_FD`` on the veth peer),
so it never needs a temporary name or a rename and cannot collide with the
node's own ``eth0``. In the pod: ``<ip>/<prefix>`` on the interface, lo up,
``<gateway> dev <ifname> scope link`` and ``default via <gateway>`` (the
address has ``noprefixroute``: no on-link route to the block). On the
node (done by the engine through the other ports): proxy_arp=1 on the host
veth, ``<ip>/32 dev <host veth> scope link proto 119`` and the
``pod_endpoints`` element. Order: create the pair, configure the pod side,
bring the host side up; any failure deletes the host veth, which takes the
pod end with it, so nothing is left half-made. A host veth of that name that
already exists belongs to a live attachment (a veth pair dies with its pod
namespace): an ADD for the same (containerID, ifname) is then refused, with
``InterfaceExists`` if the pod already has the interface, with
``AttachmentConflict`` if it names another namespace; the first pod's veth
is never touched (the agent removes a leftover only when no allocation
accounts for it).

The pod's namespace arrives as a descriptor the agent has validated
(``netns_fd``, see ``netnscheck``); without one the path is validated here
the same way, never opened blindly.

The pod side is programmed over a pyroute2 socket opened while the worker
thread is briefly inside the pod namespace (``netns.pod_netns``); about ten
requests, ~2-3 ms per attach. Rejected: creating the pair in the node
namespace and moving the peer (an extra request, and a temporary name that
could collide), and ``ip netns exec`` (a fork per command).
"""

from __future__ import annotations

import errno
import os
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ...errors import AttachmentConflict, DataplaneError, InterfaceExists
from ..model import PodInterface, PodView, Route
from .links import get_link_msg, nl_error, to_link
from .netns import forbidden_namespaces, pod_netns
from .netnscheck import Identity, open_pod_netns

RT_SCOPE_LINK = 253
# The pod keeps <ip>/<block prefix> but no connected <block> route: every
# packet, even to a pod on the same node, goes to the gateway. The pod's ARP
# table then holds one entry (the gateway) instead of one per same-node
# peer. The kernel's neighbour table limit (gc_thresh3, 1024 by default) is
# shared by every namespace on a machine, and a 20-node lab with 10 pods per
# node overflowed it with per-peer entries.
IFA_F_NOPREFIXROUTE = 0x200


class LinuxPodLinks:
    def __init__(self, ipr: IPRoute) -> None:
        """Built on the worker thread, inside the node namespace."""
        self.ipr = ipr  # node namespace
        self.forbidden: dict[Identity, str] = forbidden_namespaces()

    def _pod_socket(self, netns_path: str, netns_fd: int | None) -> IPRoute:
        with pod_netns(netns_path, fd=netns_fd, forbidden=self.forbidden):
            return IPRoute(groups=0)

    def setup_pod_link(
        self, *, host_veth: str, ifname: str, netns_path: str, ip: IPv4Interface, gateway: IPv4Address, mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface:
        nsfd = netns_fd if netns_fd is not None else open_pod_netns(netns_path, forbidden=self.forbidden)
        pod = None
        try:
            pod = self._pod_socket(netns_path, nsfd)
            if get_link_msg(pod, ifname) is not None:
                raise InterfaceExists(f"ifname: {ifname} already exists in {netns_path}")
            if get_link_msg(self.ipr, host_veth) is not None:
                raise AttachmentConflict(
                    f"CNI_NETNS {netns_path}: this container's {ifname} is already attached to another network "
                    f"namespace (host veth {host_veth}); DEL it first"
                )
            try:
                self.ipr.link("add", ifname=host_veth, kind="veth", mtu=mtu,
                              peer={"ifname": ifname, "net_ns_fd": nsfd, "mtu": mtu})
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    raise InterfaceExists(f"ifname: {ifname} already exists in {netns_path}") from None
                raise nl_error(f"veth {host_veth}", exc) from None
            try:
                return self._configure(pod, host_veth=host_veth, ifname=ifname, netns_path=netns_path,
                                       ip=ip, gateway=gateway, mtu=mtu)
            except BaseException:
                self.teardown_pod_link(host_veth=host_veth)
                raise
        finally:
            if pod is not None:
                pod.close()
            if netns_fd is None:
                os.close(nsfd)

    def _configure(
        self, pod: IPRoute, *, host_veth: str, ifname: str, netns_path: str, ip: IPv4Interface,
        gateway: IPv4Address, mtu: int,
    ) -> PodInterface:
        try:
            peer = to_link(pod.link("get", ifname=ifname)[0])
            lo = get_link_msg(pod, "lo")
            if lo is not None and not lo["flags"] & 1:
                pod.link("set", index=lo["index"], state="up")
            pod.addr("add", index=peer.index, address=str(ip.ip), prefixlen=ip.network.prefixlen,
                     flags=IFA_F_NOPREFIXROUTE)
            pod.link("set", index=peer.index, state="up")
            pod.route("add", dst=f"{gateway}/32", oif=peer.index, scope=RT_SCOPE_LINK)
            pod.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=peer.index)
            host = to_link(self.ipr.link("get", ifname=host_veth)[0])
            self.ipr.link("set", index=host.index, state="up")
        except NetlinkError as exc:
            raise nl_error(f"pod interface {ifname} in {netns_path}", exc) from None
        return PodInterface(ifname=ifname, mac=peer.mac, mtu=mtu, sandbox=netns_path, host_veth=host_veth,
                            host_mac=host.mac, ip=ip, gateway=gateway)

    def teardown_pod_link(self, *, host_veth: str) -> None:
        try:
            self.ipr.link("del", ifname=host_veth)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise nl_error(f"veth {host_veth}", exc) from None

    def inspect_pod(self, *, netns_path: str, ifname: str, netns_fd: int | None = None) -> PodView | None:
        try:
            pod = self._pod_socket(netns_path, netns_fd)
        except DataplaneError:
            return None
        try:
            msg = get_link_msg(pod, ifname)
            if msg is None:
                return None
            link = to_link(msg)
            addrs = tuple(
                IPv4Interface(f"{m.get_attr('IFA_LOCAL')}/{m['prefixlen']}")
                for m in pod.get_addr(family=2, index=link.index)
            )
            routes = []
            for m in pod.get_routes(family=2, table=254):
                if m.get_attr("RTA_OIF") != link.index:
                    continue
                dst = m.get_attr("RTA_DST") or "0.0.0.0"
                gw = m.get_attr("RTA_GATEWAY")
                routes.append(Route(dst=IPv4Network(f"{dst}/{m['dst_len']}"), dev=ifname,
                                    gateway=IPv4Address(gw) if gw else None,
                                    scope_link=m["scope"] == RT_SCOPE_LINK and not gw))
            return PodView(ifname=ifname, mac=link.mac, mtu=link.mtu, up=link.up, addresses=addrs, routes=tuple(routes))
        finally:
            pod.close()
