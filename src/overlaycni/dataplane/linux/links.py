"""Links, addresses and sysctls of the node namespace (pyroute2 + /proc/sys).

Design note. Per node there is one VXLAN device ``ocni.vxlan`` (VXLAN
backend only): VNI and UDP port from the config, learning off, local = node
IP, bound to the underlay device that holds the node IP, a MAC derived from
the node IP (``model.vtep_mac``: stable across restarts and reboots, so
peers' FDB entries never go stale), MTU = underlay MTU - 50, address
``<block network>/32``. Per node also ``<block>.1/32`` on ``lo`` labelled
``lo:ocni``: the pods' gateway is a local address of the node, so the host
veth answers the pod's ARP for it (arp_ignore=0) and the node answers pings
to it. Proxy ARP on each host veth would answer for any address routed
elsewhere; the pods' ARP guard (``podguard``: ``arp overlaycni``) lets only
requests for the gateway (or the pod's own address) reach it. Rejected:
putting the gateway address on every host veth (one address per pod, and it
moves with the pod lifecycle) and proxy ARP alone (answers for .1 only when
the node happens to have a route for it). Which sysctls the data path sets
(and why no ``rp_filter=0``) is in ``engine``'s design note.

Dual-stack: the same ``ocni.vxlan`` carries IPv6 pod traffic too, over the
IPv4 underlay (an IPv6 pod packet in an Ethernet frame in VXLAN between the
two node IPs); it also holds ``<IPv6 block>::/128``, the first address of
the node's IPv6 block (``nodad``), the source of what the node itself sends
to peers' IPv6 pods, as ``<block>.0/32`` is for IPv4. Per peer that is one
more permanent neighbour (``<peer IPv6 block>:: -> <peer VTEP MAC>``) and
one more ``onlink`` route (``<peer IPv6 block> via <peer IPv6 block>::``);
the FDB entry ``<peer VTEP MAC> -> <peer node IP>`` serves both (``model``).
Why one device over IPv4 rather than a second one over the IPv6 underlay,
as flannel (``flannel-v6.1``, ``flannel-wg-v6``) and Calico
(``vxlan-v6.calico``) do:

* One pod MTU. VXLAN over IPv4 costs 50 bytes for an inner packet of either
  family; over IPv6 it costs 70 (the outer IPv6 header is 40 bytes, RFC
  8200, against 20; RFC 7348 for the rest). A pod has one interface MTU,
  so with a second device over IPv6 either every packet of either family
  gives up 20 bytes (the pod MTU fitted to the larger overhead) or every
  pod needs a per-route MTU for IPv6.
* AKS offers dual-stack only next to IPv4 (IPv6-only is not supported), so
  every node has an IPv4 node IP and the IPv4 underlay always exists;
  flannel and Calico need a device over IPv6 for IPv6-only clusters.
* Half the per-peer state it would need: one FDB entry per peer instead of
  two, one VXLAN socket and one firewall rule for UDP 4789; the input
  filter that binds a decapsulated packet's inner source to the outer node
  (``nftmodel``, ``vxlan_in``) keeps one outer family and checks the inner
  IPv6 source at a fixed offset next to the IPv4 one.
* The node's IPv6 underlay address is needed only by the direct backend
  (IPv6 blocks are routed via it) and for IPv6 egress (masquerade); VXLAN
  and WireGuard (``ocni.wg``, the same choice) work without one.

The cost: IPv6 pod traffic between nodes depends on the IPv4 underlay,
which a dual-stack AKS cluster always has. Rejected as well: a second
device over IPv4 for IPv6 (no gain over one, twice the objects).

``ensure_vxlan`` reuses a compatible device (same kind, VNI, port, local,
underlay, learning off) and only fixes MAC/MTU/up state in place; an
incompatible one is deleted and recreated (its neighbours and FDB entries
go with it and are re-added by the reconcile that called it). These are
once-per-node objects, so pyroute2's per-request cost (~0.2 ms) is fine.
Sysctls are written through /proc/sys on the worker thread, which lives in
the node namespace (net.* sysctls are per namespace).
"""

from __future__ import annotations

import errno
import os
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface, ip_interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ...errors import DataplaneError, PermissionDenied
from ..model import Link, VxlanSpec

IFF_UP = 0x1
AF_INET, AF_INET6 = 2, 10
IFA_F_NODAD = 0x02


def nl_error(what: str, exc: NetlinkError) -> DataplaneError | PermissionDenied:
    if exc.code == errno.EPERM:
        return PermissionDenied(f"{what}: operation not permitted (needs root / CAP_NET_ADMIN)")
    return DataplaneError(f"{what}: {os.strerror(exc.code)}")


def to_link(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    return Link(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind,
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & IFF_UP),
    )


def get_link_msg(ipr: IPRoute, name: str):
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise nl_error(f"link {name}", exc) from None


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Deletes link ``name``; False when it was already gone."""
    try:
        ipr.link("del", ifname=name)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise nl_error(f"link {name}", exc) from None


class LinuxLinks:
    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    def list_links(self) -> list[Link]:
        return [to_link(m) for m in self.ipr.get_links()]

    def get_link(self, name: str) -> Link | None:
        msg = get_link_msg(self.ipr, name)
        return to_link(msg) if msg is not None else None

    def link_with_address(self, ip: IPv4Address) -> Link | None:
        for msg in self.ipr.get_addr(family=2):
            if msg.get_attr("IFA_LOCAL") == str(ip) or msg.get_attr("IFA_ADDRESS") == str(ip):
                return to_link(self.ipr.link("get", index=msg["index"])[0])
        return None

    def _compatible(self, msg, spec: VxlanSpec, underlay_index: int) -> bool:
        info = msg.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get_attr("IFLA_INFO_DATA")
        return (
            data.get_attr("IFLA_VXLAN_ID") == spec.vni
            and data.get_attr("IFLA_VXLAN_PORT") == spec.port
            and data.get_attr("IFLA_VXLAN_LOCAL") == str(spec.local)
            and not data.get_attr("IFLA_VXLAN_LEARNING")
            and data.get_attr("IFLA_VXLAN_LINK") == underlay_index
        )

    def ensure_vxlan(self, spec: VxlanSpec) -> list[str]:
        under = get_link_msg(self.ipr, spec.underlay)
        if under is None:
            raise DataplaneError(f"underlay: no link named {spec.underlay}")
        changes: list[str] = []
        msg = get_link_msg(self.ipr, spec.name)
        if msg is not None and not self._compatible(msg, spec, under["index"]):
            self.delete_link(spec.name)
            changes.append(f"link {spec.name} deleted (incompatible settings)")
            msg = None
        try:
            if msg is None:
                self.ipr.link(
                    "add", ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_port=spec.port,
                    vxlan_local=str(spec.local), vxlan_learning=0, vxlan_link=under["index"],
                    address=spec.mac, mtu=spec.mtu,
                )
                changes.append(f"link {spec.name} created (vni {spec.vni}, port {spec.port}, local {spec.local}, "
                               f"dev {spec.underlay}, mac {spec.mac}, mtu {spec.mtu})")
                msg = self.ipr.link("get", ifname=spec.name)[0]
            link = to_link(msg)
            if link.mac != spec.mac:
                self.ipr.link("set", index=link.index, address=spec.mac)
                changes.append(f"link {spec.name} mac {link.mac} -> {spec.mac}")
            if link.mtu != spec.mtu:
                self.ipr.link("set", index=link.index, mtu=spec.mtu)
                changes.append(f"link {spec.name} mtu {link.mtu} -> {spec.mtu}")
            if not link.up:
                self.ipr.link("set", index=link.index, state="up")
                changes.append(f"link {spec.name} up")
        except NetlinkError as exc:
            raise nl_error(f"link {spec.name}", exc) from None
        return changes

    def delete_link(self, name: str) -> bool:
        return delete_link(self.ipr, name)


class LinuxAddresses:
    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    def _index(self, dev: str) -> int | None:
        msg = get_link_msg(self.ipr, dev)
        return msg["index"] if msg is not None else None

    def list_addresses(self, dev: str, *, label: str | None = None, version: int = 4) -> list[IPv4Interface | IPv6Interface]:
        """``dev``'s addresses of one family (IPv6 has no labels: ``label`` matches IPv4 only)."""
        idx = self._index(dev)
        if idx is None:
            return []
        family = AF_INET if version == 4 else AF_INET6
        return [
            ip_interface(f"{m.get_attr('IFA_LOCAL') or m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
            for m in self.ipr.get_addr(family=family, index=idx)
            if label is None or m.get_attr("IFA_LABEL") == label
        ]

    def ensure_address(self, dev: str, addr: IPv4Interface | IPv6Interface, *, label: str | None = None) -> bool:
        idx = self._index(dev)
        if idx is None:
            raise DataplaneError(f"dev: no link named {dev}")
        if addr in self.list_addresses(dev, label=label, version=addr.version):
            return False
        extra: dict[str, object] = {"label": label} if label else {}
        if addr.version == 6:
            extra = {"flags": IFA_F_NODAD}  # a node address: usable at once, never tentative
        try:
            self.ipr.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen, **extra)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:  # present with another label: replace it
                self.delete_address(dev, addr)
                self.ipr.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen, **extra)
            else:
                raise nl_error(f"address {addr} on {dev}", exc) from None
        return True

    def delete_address(self, dev: str, addr: IPv4Interface | IPv6Interface) -> bool:
        idx = self._index(dev)
        if idx is None:
            return False
        try:
            self.ipr.addr("del", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen)
            return True
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                return False
            raise nl_error(f"address {addr} on {dev}", exc) from None


class LinuxSysctls:
    """net.* sysctls of the namespace the calling (worker) thread is in."""

    def read(self, key: str) -> str | None:
        try:
            with open(f"/proc/sys/{key}") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def write(self, key: str, value: str) -> None:
        try:
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
        except FileNotFoundError:
            raise DataplaneError(f"sysctl {key}: no such setting (device gone?)") from None
        except PermissionError:
            raise PermissionDenied(f"sysctl {key}: needs root") from None
