"""In-memory implementations of every data plane port, and ``FakeDataplane``.

``FakeKernel`` holds the objects one node namespace (and its pods'
namespaces) would hold; each port edits it with the same semantics as the
Linux adapter (replace is idempotent, deleting a missing object is success,
nftables transactions are all-or-nothing). The contract tests run the same
assertions against these ports and the Linux ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_interface, ip_network
from typing import TYPE_CHECKING, Any

from ..cidr import IPAddress, IPNetwork
from ..errors import AttachmentConflict, DataplaneError, InterfaceExists, NetnsNotFound, NetnsRefused
from ..families import PodAddress
from . import nftables, nftmodel, nftmodel6, podguard, policytable, ports
from .engine import NodeDataplane, Ports
from .model import (
    PARK_GROUP,
    FdbEntry,
    Link,
    Neighbour,
    PodAttachment,
    PodInterface,
    PodView,
    Route,
    VxlanSpec,
    parked_veth_name,
    vtep_mac,
)
from .nflog_fake import FakeVerdictLog
from .wgmodel import WgDevice, WgPeer, WgPeerStatus, WireGuardSpec


@dataclass
class FakePodNetns:
    links: dict[str, PodView] = field(default_factory=dict)


@dataclass
class FakeWgDevice:
    """A WireGuard device as the UAPI/netlink would hold it; ``transactions`` counts sets."""

    spec: WireGuardSpec
    peers: dict[str, WgPeer] = field(default_factory=dict)  # by public key, in insertion order
    transactions: int = 0
    handshakes: list[str] = field(default_factory=list)  # keys whose handshake was started, in order


@dataclass
class FakeKernel:
    links: dict[str, Link] = field(default_factory=dict)
    vxlan: dict[str, VxlanSpec] = field(default_factory=dict)
    wireguard: dict[str, FakeWgDevice] = field(default_factory=dict)
    wireguard_starts: int = 0  # devices created (userspace: wireguard-go starts)
    addresses: dict[str, dict[IPv4Interface | IPv6Interface, str | None]] = field(default_factory=dict)  # dev -> addr -> label
    routes: dict[IPNetwork, Route] = field(default_factory=dict)  # owned routes only
    neighbours: dict[tuple[str, IPAddress], Neighbour] = field(default_factory=dict)
    fdb: dict[tuple[str, str], FdbEntry] = field(default_factory=dict)
    nft_tables: dict[tuple[str, str], FakeNftTable] = field(default_factory=dict)  # (family, name) -> table
    sysctls: dict[str, str] = field(default_factory=dict)
    netns: dict[str, FakePodNetns] = field(default_factory=dict)
    auto_netns: bool = True  # any netns path exists unless removed
    removed_netns: set[str] = field(default_factory=set)
    refused_netns: dict[str, str] = field(default_factory=dict)  # path -> why it is no pod's namespace
    conntrack: set[tuple[IPv4Address, IPv4Address]] = field(default_factory=set)  # (orig source, orig destination)
    default_gateway: IPv4Address | None = None
    auto_underlay: bool = True  # link_with_address finds "eth0" for any IP
    next_index: int = 10
    fail_next: dict[str, Exception] = field(default_factory=dict)  # port method -> error (tests)
    watchers: list[FakeKernelEvents] = field(default_factory=list)
    batches: list[tuple[str, int]] = field(default_factory=list)  # (batch call, pods in it), in order (tests)
    groups: dict[str, int] = field(default_factory=dict)  # link name -> link group (IFLA_GROUP), when not 0
    # nftables transactions run one at a time, as the kernel's commit does (see ``FakeNft.apply``)
    nft_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def notify(self, reason: str) -> None:
        """A test changed the fake kernel as another process would: tell the watchers."""
        for w in self.watchers:
            w.queue.put(reason)
    verdict_logs: dict[int, FakeVerdictLog] = field(default_factory=dict)  # NFLOG group -> bound reader

    def add_link(self, name: str, *, kind: str = "", mtu: int = 1500, mac: str | None = None) -> Link:
        self.next_index += 1
        link = Link(name=name, index=self.next_index, kind=kind, mac=mac or vtep_mac(IPv4Address(self.next_index)), mtu=mtu, up=True)
        self.links[name] = link
        self.addresses.setdefault(name, {})
        return link

    @property
    def nft(self) -> nftables.NftState | None:
        """The node table ``ip overlaycni`` (None: absent)."""
        t = self.nft_tables.get((nftmodel.FAMILY, nftmodel.TABLE))
        return None if t is None else t.state()

    def nft_table(self, family: str, name: str) -> FakeNftTable | None:
        return self.nft_tables.get((family, name))

    def maybe_fail(self, op: str) -> None:
        exc = self.fail_next.pop(op, None)
        if exc is not None:
            raise exc


class FakeLinks:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def list_links(self) -> list[Link]:
        return list(self.k.links.values())

    def get_link(self, name: str) -> Link | None:
        return self.k.links.get(name)

    def link_with_address(self, ip: IPv4Address) -> Link | None:
        for dev, addrs in self.k.addresses.items():
            if any(a.ip == ip for a in addrs):
                return self.k.links[dev]
        if self.k.auto_underlay:
            link = self.k.links.get("eth0") or self.k.add_link("eth0")
            self.k.addresses["eth0"][IPv4Interface(f"{ip}/24")] = None
            return link
        return None

    def ensure_vxlan(self, spec: VxlanSpec) -> list[str]:
        if spec.underlay not in self.k.links:
            raise DataplaneError(f"underlay: no link named {spec.underlay}")
        have = self.k.vxlan.get(spec.name)
        link = self.k.links.get(spec.name)
        if have == spec and link is not None and link.up:
            return []
        if link is not None:
            self.delete_link(spec.name)
        self.k.add_link(spec.name, kind="vxlan", mtu=spec.mtu, mac=spec.mac)
        self.k.vxlan[spec.name] = spec
        return [f"link {spec.name} {'re' if have else ''}created (vni {spec.vni}, port {spec.port}, local {spec.local})"]

    def delete_link(self, name: str) -> bool:
        link = self.k.links.pop(name, None)
        if link is None:
            return False
        self.k.vxlan.pop(name, None)
        self.k.groups.pop(name, None)
        self.k.wireguard.pop(name, None)
        self.k.addresses.pop(name, None)
        self.k.routes = {d: r for d, r in self.k.routes.items() if r.dev != name}
        self.k.neighbours = {key: n for key, n in self.k.neighbours.items() if n.dev != name}
        self.k.fdb = {key: f for key, f in self.k.fdb.items() if f.dev != name}
        return True


class FakeWireGuard:
    """The WireGuard port in memory, with UAPI semantics: a peer is keyed by
    its public key; an allowed IP given to one peer is taken from any other."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def ensure_device(self, spec: WireGuardSpec) -> list[str]:
        self.k.maybe_fail("wireguard")
        dev = self.k.wireguard.get(spec.name)
        link = self.k.links.get(spec.name)
        changes: list[str] = []
        if dev is None or link is None:
            FakeLinks(self.k).delete_link(spec.name)
            self.k.add_link(spec.name, kind="wireguard", mtu=spec.mtu, mac="00:00:00:00:00:00")
            self.k.wireguard[spec.name] = FakeWgDevice(spec)
            self.k.wireguard_starts += 1
            return [f"wireguard device {spec.name} created (port {spec.listen_port}, public key {spec.key.public})"]
        if dev.spec.key != spec.key:
            changes.append(f"wireguard device {spec.name} private key set (public key {spec.key.public})")
        if dev.spec.listen_port != spec.listen_port:
            changes.append(f"wireguard device {spec.name} listen port {dev.spec.listen_port} -> {spec.listen_port}")
        if link.mtu != spec.mtu:
            self.k.links[spec.name] = Link(link.name, link.index, link.kind, link.mac, spec.mtu, link.up)
            changes.append(f"link {spec.name} mtu {link.mtu} -> {spec.mtu}")
        dev.spec = spec
        return changes

    def get_device(self, name: str) -> WgDevice | None:
        dev = self.k.wireguard.get(name)
        if dev is None or name not in self.k.links:
            return None
        peers = tuple(WgPeerStatus(p) for p in dev.peers.values())
        return WgDevice(name, dev.spec.key.public, dev.spec.listen_port, peers, implementation="fake")

    def apply_peers(self, name: str, *, replace: Sequence[WgPeer] = (), remove: Sequence[str] = ()) -> None:
        self.k.maybe_fail("wireguard_peers")
        dev = self.k.wireguard.get(name)
        if dev is None:
            raise DataplaneError(f"wireguard: device {name} not found")
        dev.transactions += 1
        for key in remove:
            dev.peers.pop(key, None)
        for p in replace:
            for other in list(dev.peers.values()):
                taken = [n for n in other.allowed_ips if n in p.allowed_ips]
                if taken and other.public_key != p.public_key:
                    rest = tuple(n for n in other.allowed_ips if n not in taken)
                    dev.peers[other.public_key] = WgPeer(other.public_key, other.endpoint, rest)
            dev.peers[p.public_key] = p

    def start_handshakes(self, name: str, keys: Sequence[str]) -> None:
        dev = self.k.wireguard.get(name)
        if dev is None:
            raise DataplaneError(f"wireguard: device {name} not found")
        dev.handshakes.extend(k for k in keys if k in dev.peers)

    def delete_device(self, name: str) -> bool:
        existed = name in self.k.wireguard
        self.k.wireguard.pop(name, None)
        return FakeLinks(self.k).delete_link(name) or existed


class FakeAddresses:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k
        k.links.setdefault("lo", Link("lo", 1, "loopback", "00:00:00:00:00:00", 65536, True))
        k.addresses.setdefault("lo", {IPv4Interface("127.0.0.1/8"): "lo"})

    def list_addresses(self, dev: str, *, label: str | None = None, version: int = 4) -> list[IPv4Interface | IPv6Interface]:
        return [a for a, lab in self.k.addresses.get(dev, {}).items()
                if a.version == version and (label is None or lab == label)]  # fmt: skip

    def ensure_address(self, dev: str, addr: IPv4Interface | IPv6Interface, *, label: str | None = None) -> bool:
        if dev not in self.k.links:
            raise DataplaneError(f"dev: no link named {dev}")
        addrs = self.k.addresses.setdefault(dev, {})
        if addrs.get(addr, "missing") == (label or dev) or (addr in addrs and label is None):
            return False
        addrs[addr] = label or dev
        return True

    def delete_address(self, dev: str, addr: IPv4Interface | IPv6Interface) -> bool:
        return self.k.addresses.get(dev, {}).pop(addr, "missing") != "missing"


class FakeRoutes:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def list_routes(self) -> list[Route]:
        return list(self.k.routes.values())

    def apply_routes(self, *, replace: Sequence[Route] = (), delete: Sequence[Route] = ()) -> None:
        self.k.maybe_fail("apply_routes")
        errors = [f"route {r.dst}: device {r.dev} not found" for r in replace if r.dev and r.dev not in self.k.links]
        if errors:
            raise DataplaneError("; ".join(errors))
        for r in delete:  # like the kernel: matched by destination (and device, when given)
            have = self.k.routes.get(r.dst)
            if have is not None and (r.dev is None or have.dev == r.dev):
                del self.k.routes[r.dst]
        for r in replace:
            self.k.routes[r.dst] = r

    def lookup_gateway(self, dst: IPAddress) -> tuple[IPAddress | None, str | None]:
        for dev, addrs in self.k.addresses.items():
            if dev != "lo" and any(dst in a.network for a in addrs):
                return None, dev
        gateway = self.k.default_gateway if dst.version == 4 else None
        if self.k.auto_underlay and not gateway:
            return None, "eth0"
        return (gateway, "eth0") if gateway else (None, None)


class FakeNeighbours:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def list_neighbours(self, dev: str) -> list[Neighbour]:
        return [n for n in self.k.neighbours.values() if n.dev == dev]

    def get_neighbour(self, dev: str, ip: IPAddress) -> Neighbour | None:
        return self.k.neighbours.get((dev, ip))

    def apply_neighbours(self, *, replace: Sequence[Neighbour] = (), delete: Sequence[Neighbour] = ()) -> None:
        missing = [n for n in replace if n.dev not in self.k.links]
        if missing:
            raise DataplaneError("; ".join(f"neighbour {n.ip}: device {n.dev} not found" for n in missing))
        for n in delete:
            self.k.neighbours.pop((n.dev, n.ip), None)
        for n in replace:
            self.k.neighbours[(n.dev, n.ip)] = n


class FakeFdb:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def list_fdb(self, dev: str) -> list[FdbEntry]:
        return [f for f in self.k.fdb.values() if f.dev == dev]

    def apply_fdb(self, *, replace: Sequence[FdbEntry] = (), delete: Sequence[FdbEntry] = ()) -> None:
        missing = [f for f in replace if f.dev not in self.k.links]
        if missing:
            raise DataplaneError("; ".join(f"fdb {f.mac}: device {f.dev} not found" for f in missing))
        for f in delete:
            self.k.fdb.pop((f.dev, f.mac), None)
        for f in replace:
            self.k.fdb[(f.dev, f.mac)] = f


@dataclass
class FakeNftTable:
    """One nftables table: chains with their rules, set/map declarations and elements."""

    chains: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> rules ({expr, comment})
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (counter|limit, name) -> body
    decls: dict[str, nftables.SetDecl] = field(default_factory=dict)
    sets: dict[str, frozenset] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # named counters: packets

    def copy(self) -> FakeNftTable:
        """A copy for one transaction: ``_nft_apply`` replaces sets (frozensets), rule bodies and
        objects whole and only appends to chains, so new containers are enough (no element is
        copied: a deep copy of every set per transaction was the fake's O(n) per peer event)."""
        return FakeNftTable(
            chains={n: list(rules) for n, rules in self.chains.items()}, objects=dict(self.objects),
            decls=dict(self.decls), sets=dict(self.sets), counters=dict(self.counters),
        )  # fmt: skip

    def state(self) -> nftables.NftState:
        fp = next((name[3:] for name in self.chains if name.startswith("fp_")), None)
        structure = [{"chain": {"name": n, "rules": rules}} for n, rules in self.chains.items()]
        structure += [{"set": {"name": n, "decl": repr(d)}} for n, d in sorted(self.decls.items())]
        # shares ``sets``: tests may edit the kernel through it
        return nftables.NftState(fp, self.sets, nftables.structure_digest(structure))


def _elem_key(elem: Any) -> Any:
    return elem.key if isinstance(elem, nftables.MapEntry) else elem


def _table_of(cmd: dict[str, Any]) -> tuple[str, str]:
    """The (family, table) one nftables command acts on."""
    (_verb, body), = cmd.items()
    (kind, obj), = body.items()
    return obj["family"], obj["name"] if kind == "table" else obj["table"]


def _nft_apply(tables: dict[tuple[str, str], FakeNftTable], commands: list[dict[str, Any]]) -> None:
    """Run one transaction on ``tables`` (copies: the caller keeps them only on success)."""
    for cmd in commands:
        (verb, body), = cmd.items()
        (kind, obj), = body.items()
        key = _table_of(cmd)
        if kind == "table":
            if verb == "add":
                tables.setdefault(key, FakeNftTable())
            elif tables.pop(key, None) is None:
                raise DataplaneError(f"nftables: delete table {' '.join(key)}: No such file or directory")
            continue
        t = tables.get(key)
        if t is None:
            raise DataplaneError(f"nftables: table {' '.join(key)} does not exist (No such file or directory)")
        name = obj["chain"] if kind == "rule" else obj["name"]
        if kind == "counter" and verb == "add":
            t.counters.setdefault(name, 0)
        elif kind == "chain" and verb == "add":
            t.chains.setdefault(name, [])
        elif kind == "rule" and verb == "add":
            if name not in t.chains:
                raise DataplaneError(f"nftables: chain {name} does not exist (No such file or directory)")
            t.chains[name].append({k: v for k, v in obj.items() if k not in ("family", "table", "chain")})
        elif kind in ("counter", "limit") and verb == "add":
            t.objects.setdefault((kind, name), {k: v for k, v in obj.items() if k not in ("family", "table")})
        elif kind == "chain" and verb == "flush":
            _need(t.chains, name, "chain")
            t.chains[name] = []
        elif kind == "chain" and verb == "delete":
            _need(t.chains, name, "chain")
            if t.chains[name] or _referenced(t, {"jump": {"target": name}}) or _referenced(t, {"goto": {"target": name}}):
                raise DataplaneError(f"nftables: delete chain {name}: Device or resource busy")
            del t.chains[name]
        elif kind in ("set", "map") and verb == "delete":
            _need(t.sets, name, kind)
            if _referenced(t, "@" + name):
                raise DataplaneError(f"nftables: delete {kind} {name}: Device or resource busy")
            del t.sets[name], t.decls[name]
        elif kind in ("set", "map") and verb == "add":
            decl = t.decls.setdefault(name, nftables.SetDecl.of(obj))
            t.sets[name] = t.sets.get(name, frozenset()) | {x for raw in obj.get("elem", []) for x in nftables.decode(decl, raw)}
        elif kind == "element":
            if name not in t.sets:
                raise DataplaneError(f"nftables: set {name} does not exist (No such file or directory)")
            decl = t.decls[name]
            if verb == "add":
                new = {x for raw in obj["elem"] for x in nftables.decode(decl, raw)}
                for x in new:
                    if isinstance(x, nftables.MapEntry) and isinstance(x.value, nftables.Jump):
                        _need(t.chains, x.value.target, "chain")
                t.sets[name] = t.sets[name] | new
                continue
            keys = {x for raw in obj["elem"] for x in nftables.decode(nftables.SetDecl(decl.type, decl.interval), raw)}
            if not keys <= {_elem_key(x) for x in t.sets[name]}:
                raise DataplaneError(f"nftables: delete of missing elements from {name} (No such file or directory)")
            t.sets[name] = frozenset(x for x in t.sets[name] if _elem_key(x) not in keys)
        else:
            raise DataplaneError(f"nftables: the fake does not model {verb} {kind}")


def _need(objs: dict, name: str, kind: str) -> None:
    if name not in objs:
        raise DataplaneError(f"nftables: {kind} {name} does not exist (No such file or directory)")


def _referenced(t: FakeNftTable, what: Any) -> bool:
    """Does a rule or a verdict map element of ``t`` name ``what`` (a set
    reference "@name", or a jump/goto verdict)? The kernel refuses to delete
    what is still referenced."""
    needle = json.dumps(what)
    if any(needle in json.dumps(r) for rules in t.chains.values() for r in rules):
        return True
    if isinstance(what, dict):
        verdict = next(iter(what.values()))["target"]
        return any(isinstance(e, nftables.MapEntry) and e.value == nftables.Jump(verdict) for s in t.sets.values() for e in s)
    return False


class FakeNft:
    """The ``NftRuleset`` port on one table of the fake kernel (all-or-nothing transactions)."""

    def __init__(self, k: FakeKernel, *, family: str = nftmodel.FAMILY, table: str = nftmodel.TABLE) -> None:
        self.k = k
        self.key = (family, table)
        self.transactions = 0

    def get_table(self) -> nftables.NftState | None:
        t = self.k.nft_tables.get(self.key)
        return None if t is None else copy.deepcopy(t.state())

    def list_set(self, name: str) -> frozenset | None:
        t = self.k.nft_tables.get(self.key)
        return None if t is None else t.sets.get(name)

    def counters(self) -> dict[str, int]:
        t = self.k.nft_tables.get(self.key)
        return {} if t is None else dict(t.counters)

    def apply(self, commands: list[dict[str, Any]]) -> None:
        """One all-or-nothing transaction. Like the kernel's, it changes only
        the tables its commands name, and transactions do not overlap: the
        policy controller's ``inet`` table is applied outside the agent's
        kernel lock, concurrently with the ADDs' ``pod_endpoints`` elements,
        and must not put back a copy of their tables taken before they
        committed (a lost update the kernel never has)."""
        self.k.maybe_fail("nft")
        with self.k.nft_lock:
            touched = {_table_of(cmd) for cmd in commands}
            tables = {key: t.copy() for key, t in self.k.nft_tables.items() if key in touched}
            _nft_apply(tables, commands)
            for key in touched:
                if key in tables:
                    self.k.nft_tables[key] = tables[key]
                else:
                    self.k.nft_tables.pop(key, None)
            self.transactions += 1


class FakeSysctls:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def read(self, key: str) -> str | None:
        return self.k.sysctls.get(key)

    def write(self, key: str, value: str) -> None:
        parts = key.split("/")
        if len(parts) == 5 and parts[2] in ("conf", "neigh"):
            dev = parts[3]
            if dev not in ("all", "default") and dev not in self.k.links:
                raise DataplaneError(f"sysctl {key}: no device {dev}")
        self.k.sysctls[key] = value


class FakePodLinks:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def _ns(self, path: str) -> FakePodNetns:
        if path in self.k.removed_netns or (not self.k.auto_netns and path not in self.k.netns):
            raise NetnsNotFound(f"netns_path: {path} does not exist")
        return self.k.netns.setdefault(path, FakePodNetns())

    def setup_pod_link(
        self, *, host_veth: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress], mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface:
        ns = self._ns(netns_path)
        if ifname in ns.links:
            raise InterfaceExists(f"ifname: {ifname} already exists in {netns_path}")
        if host_veth in self.k.links:
            raise AttachmentConflict(f"CNI_NETNS {netns_path}: {ifname} is already attached elsewhere (host veth {host_veth})")
        self.k.maybe_fail("setup_pod_link")
        host = self.k.add_link(host_veth, kind="veth", mtu=mtu)
        v4 = next(a.ip for a in addresses if isinstance(a.ip, IPv4Interface))
        mac = vtep_mac(v4.ip)
        routes: list[Route] = []
        for a in addresses:  # as linux/pods.py: a host route to an on-link gateway, then the default route
            if a.gateway_on_host_veth:
                self.k.addresses[host_veth][ip_interface(f"{a.gateway}/64")] = None  # link-local: a /64
            else:
                routes.append(Route(dst=ip_network((a.gateway, a.gateway.max_prefixlen)), dev=ifname, scope_link=True))
            routes.append(Route(dst=a.default_route, dev=ifname, gateway=a.gateway))
        ns.links[ifname] = PodView(
            ifname=ifname, mac=mac, mtu=mtu, up=True, addresses=tuple(a.ip for a in addresses), routes=tuple(routes),
        )
        self.k.netns.setdefault("__peers__", FakePodNetns()).links[host_veth] = PodView(
            ifname=f"{netns_path}|{ifname}", mac="", mtu=0, up=True, addresses=(), routes=()
        )
        return PodInterface(ifname=ifname, mac=mac, mtu=mtu, sandbox=netns_path, host_veth=host_veth,
                            host_mac=host.mac, addresses=tuple(addresses))

    def setup_pod_links(self, pods: Sequence[PodAttachment]) -> list[PodInterface | Exception]:
        """One pod at a time (a failure is that pod's answer), as the Linux batch answers."""
        self.k.batches.append(("setup_pod_links", len(pods)))
        out: list[PodInterface | Exception] = []
        for p in pods:
            try:
                out.append(self.setup_pod_link(host_veth=p.host_veth, ifname=p.ifname, netns_path=p.netns_path,
                                               addresses=p.addresses, mtu=p.mtu, netns_fd=p.netns_fd))
            except Exception as exc:  # noqa: BLE001 - that pod's answer
                out.append(exc)
        return out

    def teardown_pod_links(self, host_veths: Sequence[str]) -> None:
        self.k.batches.append(("teardown_pod_links", len(host_veths)))
        self.k.maybe_fail("teardown_pod_links")
        for host in host_veths:
            self.teardown_pod_link(host_veth=host)

    def park_pod_links(self, host_veths: Sequence[str]) -> None:
        """As the kernel: down (its routes go, IPv4 and IPv6), renamed, in ``PARK_GROUP``; one gone is success."""
        self.k.batches.append(("park_pod_links", len(host_veths)))
        self.k.maybe_fail("park_pod_links")
        peers = self.k.netns.setdefault("__peers__", FakePodNetns()).links
        for host in host_veths:
            link = self.k.links.pop(host, None)
            if link is None:
                continue
            name = parked_veth_name(host)
            self.k.links[name] = dataclasses.replace(link, name=name, up=False)
            self.k.addresses[name] = {a: lbl for a, lbl in self.k.addresses.pop(host, {}).items() if a.version == 4}
            self.k.routes = {d: r for d, r in self.k.routes.items() if r.dev != host}
            self.k.groups[name] = PARK_GROUP
            if host in peers:
                peers[name] = peers.pop(host)

    def delete_parked_links(self) -> None:
        """One RTM_DELLINK for ``PARK_GROUP``: every link in it, with its pod end."""
        self.k.batches.append(("delete_parked_links", sum(g == PARK_GROUP for g in self.k.groups.values())))
        self.k.maybe_fail("delete_parked_links")
        for name in [n for n, g in self.k.groups.items() if g == PARK_GROUP]:
            self.teardown_pod_link(host_veth=name)

    def teardown_pod_link(self, *, host_veth: str) -> None:
        FakeLinks(self.k).delete_link(host_veth)
        peer = self.k.netns.get("__peers__", FakePodNetns()).links.pop(host_veth, None)
        if peer is not None:
            path, ifname = peer.ifname.split("|")
            self.k.netns.get(path, FakePodNetns()).links.pop(ifname, None)

    def inspect_pod(self, *, netns_path: str, ifname: str, netns_fd: int | None = None) -> PodView | None:
        try:
            return self._ns(netns_path).links.get(ifname)
        except NetnsNotFound:
            return None


class FakeConntrack:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def flush_address(self, ip: IPv4Address | IPv6Address) -> int:
        gone = {e for e in self.k.conntrack if ip in e}
        self.k.conntrack -= gone
        return len(gone)

    def flush_addresses(self, ips: Sequence[IPv4Address | IPv6Address]) -> int:
        self.k.batches.append(("flush_addresses", len(ips)))
        wanted = set(ips)
        gone = {e for e in self.k.conntrack if wanted & set(e)}
        self.k.conntrack -= gone
        return len(gone)


def fake_ports(kernel: FakeKernel) -> Ports:
    return Ports(
        links=FakeLinks(kernel), addresses=FakeAddresses(kernel), routes=FakeRoutes(kernel),
        neighbours=FakeNeighbours(kernel), fdb=FakeFdb(kernel), nft=FakeNft(kernel),
        sysctls=FakeSysctls(kernel), pods=FakePodLinks(kernel), wireguard=FakeWireGuard(kernel),
        policy_nft=FakeNft(kernel, family=policytable.FAMILY, table=policytable.TABLE),
        arp_nft=FakeNft(kernel, family=podguard.ARP_FAMILY, table=podguard.TABLE),
        ip6_nft=FakeNft(kernel, family=nftmodel6.FAMILY, table=nftmodel6.TABLE),
    )


class FakeKernelEvents:
    """The ``KernelEvents`` port of the fake: what ``FakeKernel.notify`` says."""

    def __init__(self) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.closed = False

    def wait(self, timeout: float) -> list[str]:
        if self.closed:
            return []
        try:
            out = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        if self.closed:
            return []
        return [r for r in out if r is not None]

    def close(self) -> None:
        """Wakes a ``wait`` at once (the kernel's port does the same)."""
        self.closed = True
        self.queue.put(None)


class FakeDataplane(NodeDataplane):
    """The whole data plane in memory: ``FakeDataplane().kernel`` is inspectable."""

    def __init__(self, kernel: FakeKernel | None = None, *, underlay_ip: IPv4Address | None = None,
                 underlay_mtu: int = 1500) -> None:
        """``underlay_ip``: give the fake node an ``eth0`` holding that address (/16)."""
        self.kernel = kernel or FakeKernel()
        if underlay_ip is not None:
            self.kernel.add_link("eth0", mtu=underlay_mtu)
            self.kernel.addresses["eth0"][IPv4Interface(f"{underlay_ip}/16")] = None
        super().__init__(fake_ports(self.kernel))

    @contextmanager
    def open_pod_netns(self, path: str) -> Iterator[int | None]:
        if path in self.kernel.removed_netns or (not self.kernel.auto_netns and path not in self.kernel.netns):
            raise NetnsNotFound(f"CNI_NETNS {path}: the network namespace does not exist")
        if path in self.kernel.refused_netns:
            raise NetnsRefused(f"CNI_NETNS {path}: {self.kernel.refused_netns[path]}")
        yield None

    def flush_conntrack(self, ip: IPv4Address | IPv6Address) -> int:
        return FakeConntrack(self.kernel).flush_address(ip)
    def kernel_events(self) -> FakeKernelEvents:
        events = FakeKernelEvents()
        self.kernel.watchers.append(events)
        return events

    def open_verdict_log(self, *, group: int) -> FakeVerdictLog:
        """Bind NFLOG ``group``; bound by an open reader is an error, as in the kernel (EBUSY)."""
        self.kernel.maybe_fail("open_verdict_log")
        held = self.kernel.verdict_logs.get(group)
        if held is not None and not held.closed:
            raise DataplaneError(f"NFLOG group {group}: bound by another process in this namespace")
        self.kernel.verdict_logs[group] = FakeVerdictLog()
        return self.kernel.verdict_logs[group]

    def flush_conntrack_many(self, ips: Sequence[IPv4Address | IPv6Address]) -> int:
        return FakeConntrack(self.kernel).flush_addresses(ips)

    def remove_netns(self, path: str) -> None:
        """Simulate a pod sandbox that vanished (its interfaces die with it)."""
        self.kernel.removed_netns.add(path)
        ns = self.kernel.netns.pop(path, None)
        for host, peer in list(self.kernel.netns.get("__peers__", FakePodNetns()).links.items()):
            if ns is not None and peer.ifname.startswith(path + "|"):
                FakeLinks(self.kernel).delete_link(host)


if TYPE_CHECKING:  # mypy proves that each fake implements its port (the contract tests prove the semantics)
    _links: type[ports.Links] = FakeLinks
    _addresses: type[ports.Addresses] = FakeAddresses
    _routes: type[ports.Routes] = FakeRoutes
    _neighbours: type[ports.Neighbours] = FakeNeighbours
    _fdb: type[ports.Fdb] = FakeFdb
    _nft: type[ports.NftRuleset] = FakeNft
    _policy_table: type[ports.PolicyTable] = policytable.PolicyTableSync
    _verdict_log: type[ports.VerdictLog] = FakeVerdictLog
    _sysctls: type[ports.Sysctls] = FakeSysctls
    _pods: type[ports.PodLinks] = FakePodLinks
    _conntrack: type[ports.Conntrack] = FakeConntrack
    _dataplane: type[ports.Dataplane] = FakeDataplane
    _events: type[ports.KernelEvents] = FakeKernelEvents
