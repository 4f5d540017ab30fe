"""Routes, neighbours and FDB entries: the Linux ports over ``rtnl.Rtnl``.

Design note. These three ports carry everything that grows with the
cluster: one neighbour + one FDB entry + one route per peer (VXLAN), one
route per peer (direct), one /32 route per local pod (in a dual-stack
cluster also one neighbour and one route per peer's IPv6 block, the FDB
entry shared, and one /128 per IPv6 pod address). Each ``apply_*`` call
becomes one batched netlink transaction (see ``rtnl``), so a full
reconcile of 5,000 peers is three transactions of 5,000 messages and an
incremental peer change is three single-message ones. ``list_*`` return
only what the project owns (proto 119 routes of both families in the main
table; IPv6 routes carry no scope, so an IPv6 device route is reported as
``scope_link``, which it means, and compares like its IPv4 twin; permanent
entries on the VXLAN device, neighbours of both families). Deletes of absent objects, or of objects on a
device that is already gone, are success. Errors are collected per object
and raised once as ``DataplaneError`` naming each object and the errno.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address

from ...cidr import IPAddress
from ...errors import DataplaneError
from ..model import RT_PROTO, FdbEntry, Neighbour, Route
from . import rtnl as r
from .rtnl import Rtnl


def _raise_failures(kind: str, failures: list[tuple[int, int]], *, objs: Sequence[object], deleting: int) -> None:
    """Objects [0, deleting) were deletes (not-found is fine), the rest replaces."""
    bad = [(objs[i], code) for i, code in failures if not (i < deleting and code in r.NOT_FOUND)]
    if bad:
        detail = "; ".join(f"{o}: {os.strerror(code)}" for o, code in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise DataplaneError(f"{kind}: kernel refused {len(bad)} change(s): {detail}{more}")


class LinuxRoutes:
    def __init__(self, nl: Rtnl) -> None:
        self.nl = nl

    def list_routes(self) -> list[Route]:
        out = []
        for family in (r.AF_INET, r.AF_INET6):
            for msg in self.nl.dump(r.RTM_GETROUTE, r.RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                fam, dst_len, _src, _tos, table, proto, scope, rtype, flags = r.RTMSG.unpack_from(msg, 16)
                if proto != RT_PROTO or fam != family:
                    continue
                a = r.attributes(msg, 16 + r.RTMSG.size)
                if RTA_TABLE_of(a, table) != r.RT_TABLE_MAIN:
                    continue
                v6 = family == r.AF_INET6
                dst = int.from_bytes(a.get(r.RTA_DST, b""), "big")
                oif = int.from_bytes(a[r.RTA_OIF], "little") if r.RTA_OIF in a else None
                gw = ip_address(a[r.RTA_GATEWAY]) if r.RTA_GATEWAY in a else None
                unreachable = rtype == r.RTN_UNREACHABLE
                out.append(Route(
                    dst=IPv6Network((dst, dst_len)) if v6 else IPv4Network((dst, dst_len)),
                    dev=self.nl.name_of(oif) if oif and not (v6 and unreachable) else None,  # IPv6 says "dev lo"
                    gateway=gw,
                    onlink=bool(flags & r.RTNH_F_ONLINK),
                    scope_link=(gw is None and not unreachable) if v6 else scope == r.RT_SCOPE_LINK,
                    unreachable=unreachable,
                ))
        return out

    def _msg(self, route: Route, *, delete: bool) -> tuple[int, int, bytes] | None:
        rtype = r.RTN_UNREACHABLE if route.unreachable else r.RTN_UNICAST
        v6 = route.dst.version == 6
        scope = r.RT_SCOPE_NOWHERE if delete else (r.RT_SCOPE_LINK if route.scope_link and not v6 else r.RT_SCOPE_UNIVERSE)
        body = r.RTMSG.pack(r.AF_INET6 if v6 else r.AF_INET, route.dst.prefixlen, 0, 0, r.RT_TABLE_MAIN, RT_PROTO,
                            scope, rtype, r.RTNH_F_ONLINK if route.onlink and not delete else 0)
        body += r.attr(r.RTA_DST, route.dst.network_address.packed)
        if route.gateway is not None and not delete:
            body += r.attr(r.RTA_GATEWAY, route.gateway.packed)
        if route.dev is not None:
            idx = self.nl.index_of(route.dev)
            if idx is None:
                return None
            body += r.attr(r.RTA_OIF, idx.to_bytes(4, "little"))
        if delete:
            return (r.RTM_DELROUTE, 0, body)
        return (r.RTM_NEWROUTE, r.NLM_F_CREATE | r.NLM_F_REPLACE, body)

    def apply_routes(self, *, replace: Sequence[Route] = (), delete: Sequence[Route] = ()) -> None:
        try:
            self._apply_routes(replace=replace, delete=delete)
        except DataplaneError:
            # A pod veth re-created under the same name has a new ifindex: the
            # name->index cache is stale. Refresh it once and retry.
            self.nl.refresh_links()
            self._apply_routes(replace=replace, delete=delete)

    def _apply_routes(self, *, replace: Sequence[Route] = (), delete: Sequence[Route] = ()) -> None:
        msgs, objs, missing = [], [], []
        for i, route in enumerate([*delete, *replace]):
            deleting = i < len(delete)
            m = self._msg(route, delete=deleting)
            if m is None:  # a delete on a vanished device: the kernel already removed the route
                if not deleting:
                    missing.append(f"{route}: device {route.dev} not found")
                continue
            objs.append((deleting, route))
            msgs.append(m)
        failures = self.nl.transact(msgs)
        _raise_failures("route", failures, objs=[o for _, o in objs], deleting=sum(1 for d, _ in objs if d))
        if missing:
            raise DataplaneError("route: " + "; ".join(missing))

    def lookup_gateway(self, dst: IPAddress) -> tuple[IPAddress | None, str | None]:
        family = r.AF_INET if dst.version == 4 else r.AF_INET6
        body = r.RTMSG.pack(family, dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + r.attr(r.RTA_DST, dst.packed)
        msg = self.nl.request(r.RTM_GETROUTE, body)
        if msg is None:
            return None, None
        _f, _d, _s, _t, _table, _p, _scope, rtype, _fl = r.RTMSG.unpack_from(msg, 16)
        a = r.attributes(msg, 16 + r.RTMSG.size)
        if rtype != r.RTN_UNICAST or r.RTA_OIF not in a:
            return None, None
        gw = ip_address(a[r.RTA_GATEWAY]) if r.RTA_GATEWAY in a else None
        return gw, self.nl.name_of(int.from_bytes(a[r.RTA_OIF], "little"))


def _with_fresh_links(nl: Rtnl, apply: Callable[..., None], **kw: Sequence[object]) -> None:
    """``apply(**kw)``; refused once, again with a fresh name->index cache: a
    VXLAN device deleted and re-created (by us, repairing) has a new ifindex."""
    try:
        apply(**kw)
    except DataplaneError:
        nl.refresh_links()
        apply(**kw)


def RTA_TABLE_of(a: dict[int, bytes], table: int) -> int:
    return int.from_bytes(a[r.RTA_TABLE], "little") if r.RTA_TABLE in a else table


class LinuxNeighbours:
    def __init__(self, nl: Rtnl) -> None:
        self.nl = nl

    def list_neighbours(self, dev: str) -> list[Neighbour]:
        idx = self.nl.index_of(dev)
        if idx is None:
            return []
        out = []
        for family in (r.AF_INET, r.AF_INET6):
            for msg in self.nl.dump(r.RTM_GETNEIGH, r.NDMSG.pack(family, 0, 0, 0, 0)):
                fam, ifindex, state, _flags, _type = r.NDMSG.unpack_from(msg, 16)
                if ifindex != idx or fam != family or not state & r.NUD_PERMANENT:
                    continue
                a = r.attributes(msg, 16 + r.NDMSG.size)
                if r.NDA_DST in a and r.NDA_LLADDR in a:
                    out.append(Neighbour(dev=dev, ip=ip_address(a[r.NDA_DST]), mac=r._mac_str(a[r.NDA_LLADDR])))
        return out

    def get_neighbour(self, dev: str, ip: IPAddress) -> Neighbour | None:
        idx = self.nl.index_of(dev)
        if idx is None:
            return None
        family = r.AF_INET if ip.version == 4 else r.AF_INET6
        msg = self.nl.request(r.RTM_GETNEIGH, r.NDMSG.pack(family, idx, 0, 0, 0) + r.attr(r.NDA_DST, ip.packed))
        if msg is None:
            return None
        a = r.attributes(msg, 16 + r.NDMSG.size)
        return Neighbour(dev=dev, ip=ip, mac=r._mac_str(a[r.NDA_LLADDR])) if r.NDA_LLADDR in a else None

    def apply_neighbours(self, *, replace: Sequence[Neighbour] = (), delete: Sequence[Neighbour] = ()) -> None:
        _with_fresh_links(self.nl, self._apply, replace=replace, delete=delete)

    def _apply(self, *, replace: Sequence[Neighbour] = (), delete: Sequence[Neighbour] = ()) -> None:
        msgs, objs, missing = [], [], []
        for i, n in enumerate([*delete, *replace]):
            idx = self.nl.index_of(n.dev)
            if idx is None:
                if i >= len(delete):
                    missing.append(f"{n}: device {n.dev} not found")
                continue
            family = r.AF_INET if n.ip.version == 4 else r.AF_INET6
            body = r.NDMSG.pack(family, idx, r.NUD_PERMANENT, 0, 0) + r.attr(r.NDA_DST, n.ip.packed)
            if i < len(delete):
                msgs.append((r.RTM_DELNEIGH, 0, body))
            else:
                msgs.append((r.RTM_NEWNEIGH, r.NLM_F_CREATE | r.NLM_F_REPLACE, body + r.attr(r.NDA_LLADDR, r._mac_bytes(n.mac))))
            objs.append((i < len(delete), n))
        failures = self.nl.transact(msgs)
        _raise_failures("neighbour", failures, objs=[o for _, o in objs], deleting=sum(1 for d, _ in objs if d))
        if missing:
            raise DataplaneError("neighbour: " + "; ".join(missing))


class LinuxFdb:
    def __init__(self, nl: Rtnl) -> None:
        self.nl = nl

    def list_fdb(self, dev: str) -> list[FdbEntry]:
        idx = self.nl.index_of(dev)
        if idx is None:
            return []
        out = []
        for msg in self.nl.dump(r.RTM_GETNEIGH, r.NDMSG.pack(r.AF_BRIDGE, idx, 0, 0, 0)):
            fam, ifindex, state, _flags, _type = r.NDMSG.unpack_from(msg, 16)
            if ifindex != idx or not state & r.NUD_PERMANENT:
                continue
            a = r.attributes(msg, 16 + r.NDMSG.size)
            if r.NDA_DST in a and r.NDA_LLADDR in a and len(a[r.NDA_DST]) == 4:
                out.append(FdbEntry(dev=dev, mac=r._mac_str(a[r.NDA_LLADDR]), dst=IPv4Address(a[r.NDA_DST])))
        return out

    def apply_fdb(self, *, replace: Sequence[FdbEntry] = (), delete: Sequence[FdbEntry] = ()) -> None:
        _with_fresh_links(self.nl, self._apply, replace=replace, delete=delete)

    def _apply(self, *, replace: Sequence[FdbEntry] = (), delete: Sequence[FdbEntry] = ()) -> None:
        msgs, objs, missing = [], [], []
        for i, f in enumerate([*delete, *replace]):
            idx = self.nl.index_of(f.dev)
            if idx is None:
                if i >= len(delete):
                    missing.append(f"{f}: device {f.dev} not found")
                continue
            body = r.NDMSG.pack(r.AF_BRIDGE, idx, r.NUD_PERMANENT, r.NTF_SELF, 0) + r.attr(r.NDA_LLADDR, r._mac_bytes(f.mac))
            if i < len(delete):  # no NDA_DST: remove the whole entry for this MAC
                msgs.append((r.RTM_DELNEIGH, 0, body))
            else:
                msgs.append((r.RTM_NEWNEIGH, r.NLM_F_CREATE | r.NLM_F_REPLACE, body + r.attr(r.NDA_DST, f.dst.packed)))
            objs.append((i < len(delete), f))
        failures = self.nl.transact(msgs)
        _raise_failures("fdb", failures, objs=[o for _, o in objs], deleting=sum(1 for d, _ in objs if d))
        if missing:
            raise DataplaneError("fdb: " + "; ".join(missing))
