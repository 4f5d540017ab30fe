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
from ipaddress import IPv4Address, IPv4Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ...errors import DataplaneError, PermissionDenied
from ..model import Link, VxlanSpec

IFF_UP = 0x1


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

    def list_addresses(self, dev: str, *, label: str | None = None) -> list[IPv4Interface]:
        idx = self._index(dev)
        if idx is None:
            return []
        return [
            IPv4Interface(f"{m.get_attr('IFA_LOCAL')}/{m['prefixlen']}")
            for m in self.ipr.get_addr(family=2, index=idx)
            if label is None or m.get_attr("IFA_LABEL") == label
        ]

    def ensure_address(self, dev: str, addr: IPv4Interface, *, label: str | None = None) -> bool:
        idx = self._index(dev)
        if idx is None:
            raise DataplaneError(f"dev: no link named {dev}")
        if addr in self.list_addresses(dev, label=label):
            return False
        extra = {"label": label} if label else {}
        try:
            self.ipr.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen, **extra)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:  # present with another label: replace it
                self.delete_address(dev, addr)
                self.ipr.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen, **extra)
            else:
                raise nl_error(f"address {addr} on {dev}", exc) from None
        return True

    def delete_address(self, dev: str, addr: IPv4Interface) -> bool:
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
