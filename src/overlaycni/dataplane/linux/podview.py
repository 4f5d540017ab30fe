"""What a pod's interface holds (CHECK), and the wait until a new IPv6
address is usable (ADD): the read side of ``pods``.

``inspect`` reads, over a pyroute2 socket in the pod's namespace (CHECK is
not on the ADD path), the interface's addresses of both families (an IPv6
address still in duplicate address detection, or failed, is listed apart
as tentative) and the routes through it. ``wait_usable`` polls an
address's flags until it is no longer tentative: with ``nodad`` the kernel
clears the flag from a work queue right after the address is added, so the
wait ends at once; it fails after ``USABLE_WAIT`` (duplicate address
detection failed, or the address vanished).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_interface, ip_network

from pyroute2 import IPRoute

from ...cidr import IPAddress
from ...errors import DataplaneError
from ..model import PodView, Route
from .links import AF_INET, AF_INET6, get_link_msg, to_link

RT_SCOPE_LINK = 253
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
USABLE_WAIT = 1.0  # seconds an address may stay tentative before ADD fails (nodad: none)


def inspect(pod: IPRoute, ifname: str) -> PodView | None:
    """``ifname`` in the namespace of ``pod`` (None: no such interface)."""
    msg = get_link_msg(pod, ifname)
    if msg is None:
        return None
    link = to_link(msg)
    addrs: list[IPv4Interface | IPv6Interface] = []
    tentative: list[IPv6Interface] = []
    for family in (AF_INET, AF_INET6):
        for m in pod.get_addr(family=family, index=link.index):
            iface = ip_interface(f"{m.get_attr('IFA_LOCAL') or m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
            if isinstance(iface, IPv6Interface) and _flags(m) & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                tentative.append(iface)
            else:
                addrs.append(iface)
    routes = []
    for family in (AF_INET, AF_INET6):
        for m in pod.get_routes(family=family, table=254):
            if m.get_attr("RTA_OIF") != link.index:
                continue
            dst = m.get_attr("RTA_DST") or ("::" if family == AF_INET6 else "0.0.0.0")
            gw = m.get_attr("RTA_GATEWAY")
            device_route = not gw and m["type"] == 1
            scope_link = device_route if family == AF_INET6 else (m["scope"] == RT_SCOPE_LINK and not gw)
            routes.append(Route(dst=ip_network(f"{dst}/{m['dst_len']}"), dev=ifname,
                                gateway=ip_address(gw) if gw else None, scope_link=scope_link))
    return PodView(ifname=ifname, mac=link.mac, mtu=link.mtu, up=link.up, addresses=tuple(addrs),
                   routes=tuple(routes), tentative=tuple(tentative))


def _flags(msg) -> int:
    """An address's flags (IFA_FLAGS has all 32 bits, ifa_flags the low 8)."""
    return msg.get_attr("IFA_FLAGS") or msg["flags"]


def wait_usable(flags_of: Callable[[IPAddress], int | None], want: Sequence[IPAddress], *, where: str) -> None:
    """Return once none of ``want`` is tentative (duplicate address detection
    done, or skipped: ``nodad``); fail after ``USABLE_WAIT``."""
    deadline = time.monotonic() + USABLE_WAIT
    pause = 0.0005
    while True:
        state = {a: flags_of(a) for a in want}
        failed = [a for a, f in state.items() if f is not None and f & IFA_F_DADFAILED]
        if failed:
            raise DataplaneError(f"{where}: duplicate address detection failed for {', '.join(map(str, failed))}")
        missing = [a for a, f in state.items() if f is None]
        if missing:
            raise DataplaneError(f"{where}: address {', '.join(map(str, missing))} vanished while it came up")
        pending = [a for a, f in state.items() if f is not None and f & IFA_F_TENTATIVE]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise DataplaneError(f"{where}: address {', '.join(map(str, pending))} is still tentative after "
                                 f"{USABLE_WAIT:g} s")  # fmt: skip
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
