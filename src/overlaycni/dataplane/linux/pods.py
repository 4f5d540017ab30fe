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

Batches (group commit, ``setup_pod_links``): the pods of a batch share each
node-side step: one ``send`` of ``RTM_GETLINK`` finds host veths that
already exist (conflicts), one ``send`` of ``RTM_NEWLINK`` requests creates
every pair (one request per pair: the kernel makes one pair per request;
failures come back per request, mapped to their pod), one more brings every
host end up, and their MACs come back from one ``send`` of ``RTM_GETLINK``.
The pod side needs a socket inside each pod's namespace
(``netns.pod_netns`` switches the worker thread for the ``socket()`` call
only): one request for the interface's index and MAC, then lo up, address,
link up and both routes in one ``send``. Removal (``teardown_pod_links``):
one veth is deleted by name; several are put in one fresh link group
(``IFLA_GROUP``, a random 32-bit number no link of the node namespace has)
and deleted by one ``RTM_DELLINK`` for the group, which the kernel
unregisters together (one RCU grace period for the batch instead of one per
pair, ~15 ms each; it refuses a group holding a device without link ops,
such as a physical NIC). A DEL parks its host veth instead
(``park_pod_links``: one RTM_NEWLINK by index sets it down, renames it
``model.parked_veth_name`` and puts it in ``model.PARK_GROUP``; measured
~0.5 ms against ~14-20 ms for a delete) and the agent's quarantine drain
deletes every parked veth with one RTM_DELLINK for that group
(``delete_parked_links``; ENODEV when the group is empty). Setting the link
down removes its IPv4 and IPv6 routes (the kernel's ``fib_sync_down_dev`` /
``rt6_sync_down_dev``). A kernel that refuses to rename a running device
(EBUSY: before the rename of an up device was allowed) gets the down and the
rename as two messages of the same ``send``.

Messages are packed with ``struct`` (``rtnl``'s codec): pyroute2 costs
~1 ms per request here (its socket setup and asyncio round trip), about
5 ms per pod for the ten requests of an attach; raw, the kernel's own work
(~0.4 ms per pair) dominates. ``inspect_pod`` (CHECK, not on the ADD path: ``podview``)
still uses pyroute2. Rejected: creating the pair in the node namespace and
moving the peer (an extra request, and a temporary name that could
collide), ``ip netns exec`` (a fork per command), choosing the pod
interface's ifindex ourselves to skip the lookup (another interface of a
chained plugin may hold it).

The pod's namespace arrives as a descriptor the agent has validated
(``netns_fd``, see ``netnscheck``); without one the path is validated here
the same way, never opened blindly.

IPv6 (dual-stack clusters). The pod also gets ``<ipv6>/<block prefix>``
(``nodad noprefixroute``) and ``default via fe80::1 dev <ifname>``; the
host veth holds ``fe80::1/64`` (``nodad``); the engine adds ``<ipv6>/128
dev <host veth> proto 119`` and IPv6 forwarding in the node namespace. The
gateway is link-local, as Calico and Cilium give their pods (and Azure CNI
a link-local IPv6 gateway too). Rejected: ``<block_v6>::1`` on the node's
``lo`` like IPv4's ``<block>.1``. Linux answers a neighbour solicitation
only for an address on the interface it arrives on (unlike ARP, which
answers for any local address), and IPv6 has no per-interface "proxy all"
like proxy_arp: every pod would need a proxy NDP entry ``<block_v6>::1
proxy dev <host veth>`` besides ``proxy_ndp=1``, one more kernel object per
pod to create, check and leak. A link-local gateway on the veth is
answered by the veth itself, cannot be reached from another link, and
leaves the pod one neighbour entry whatever the number of pods, as in
IPv4. ``::1`` of the block stays reserved for the node (``families``).

No SLAAC or DAD delays: before the pod interface comes up it gets
``accept_ra=0``, ``autoconf=0`` (no router discovery or addresses of its
own beyond the link-local one), ``accept_dad=0`` (its link-local address,
made when the kernel sees the carrier, possibly after ADD returned, needs
no detection either) and ``disable_ipv6=0`` (as the reference plugins'
``ConfigureIface`` does); the pod and gateway addresses are ``nodad``.
The kernel still clears an address's tentative flag from a work queue, so
ADD returns only once both are no longer tentative (a bounded wait, which
with ``nodad`` ends at once; the pod's address is sent from until its
link-local one exists, so nothing waits for that). These sysctls are per
namespace: they are written while the worker thread is inside the pod's
namespace.


Batched, a dual-stack pod adds to the pod side's one ``send`` its IPv6
address and default route (the sysctls are files, written first), and to
the node side one ``send`` of the link-local gateway addresses before the
host ends come up (their indexes come from one ``RTM_GETLINK`` batch); the
tentative checks are one ``RTM_GETADDR`` request per address. A
single-stack batch sends exactly what it did before.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from ipaddress import IPv4Interface, IPv6Interface, ip_interface, ip_network

from pyroute2 import IPRoute

from ...cidr import IPAddress, IPNetwork
from ...errors import AttachmentConflict, DataplaneError, InterfaceExists, OverlayCNIError, PermissionDenied
from ...families import PodAddress
from ..model import PARK_GROUP, PodAttachment, PodInterface, PodView, parked_veth_name
from ..nlcodec import attr, attributes
from .links import IFA_F_NODAD, LinuxSysctls
from .netns import forbidden_namespaces, pod_netns
from .netnscheck import Identity, open_pod_netns
from .podview import RT_SCOPE_LINK, inspect, wait_usable
from .rtnl import HDR, IFINFO, NLM_F_CREATE, RTM_GETLINK, RTM_NEWLINK, RTM_NEWROUTE, RTMSG, Rtnl

# The pod keeps <ip>/<block prefix> but no connected <block> route: every
# packet, even to a pod on the same node, goes to the gateway. The pod's ARP
# table then holds one entry (the gateway) instead of one per same-node
# peer. The kernel's neighbour table limit (gc_thresh3, 1024 by default) is
# shared by every namespace on a machine, and a 20-node lab with 10 pods per
# node overflowed it with per-peer entries.
IFA_F_NOPREFIXROUTE = 0x200
# The pod interface's IPv6 settings (see the design note).
POD_IPV6_SYSCTLS = {"disable_ipv6": "0", "accept_ra": "0", "autoconf": "0", "accept_dad": "0"}

RTM_DELLINK, RTM_NEWADDR = 17, 20
NLM_F_EXCL = 0x200
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD = 1, 3, 4, 18, 27, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NLA_F_NESTED = 0x8000
LOOPBACK_IFINDEX = 1  # lo is ifindex 1 in every network namespace
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
IFADDRMSG = struct.Struct("=BBBBi")
GONE = (errno.ENODEV, errno.ENOENT)
Result = PodInterface | Exception


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _name(name: str) -> bytes:
    return attr(IFLA_IFNAME, name.encode() + b"\0")


def veth_request(host: str, ifname: str, netns_fd: int, mtu: int) -> tuple[int, int, bytes]:
    """RTM_NEWLINK: the pair ``host`` (here, down) / ``ifname`` (in ``netns_fd``)."""
    peer = IFINFO.pack(0, 0, 0, 0, 0) + _name(ifname) + attr(IFLA_MTU, _u32(mtu)) + attr(IFLA_NET_NS_FD, _u32(netns_fd))
    info = attr(IFLA_INFO_KIND, b"veth\0") + attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER | NLA_F_NESTED, peer))
    body = IFINFO.pack(0, 0, 0, 0, 0) + _name(host) + attr(IFLA_MTU, _u32(mtu)) + attr(IFLA_LINKINFO | NLA_F_NESTED, info)
    return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body


def up_request(*, index: int = 0, name: str | None = None) -> tuple[int, int, bytes]:
    return RTM_NEWLINK, 0, IFINFO.pack(0, 0, index, IFF_UP, IFF_UP) + (_name(name) if name else b"")


def address_request(index: int, ip: IPv4Interface | IPv6Interface, *, flags: int = IFA_F_NOPREFIXROUTE) -> tuple[int, int, bytes]:
    """RTM_NEWADDR; IPv6 addresses are always ``nodad`` (usable at once, see the design note)."""
    if ip.version == 6:
        flags |= IFA_F_NODAD
        body = IFADDRMSG.pack(socket.AF_INET6, ip.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_ADDRESS, ip.ip.packed) + attr(IFA_FLAGS, _u32(flags))
        return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body
    body = IFADDRMSG.pack(socket.AF_INET, ip.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, ip.ip.packed) + attr(IFA_ADDRESS, ip.ip.packed) + attr(IFA_FLAGS, _u32(flags))
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body


def route_request(dst: IPNetwork, *, oif: int, gateway: IPAddress | None = None) -> tuple[int, int, bytes]:
    scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
    family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
    body = RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST, 0)
    if dst.prefixlen:
        body += attr(RTA_DST, dst.network_address.packed)
    if gateway is not None:
        body += attr(RTA_GATEWAY, gateway.packed)
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body + attr(RTA_OIF, _u32(oif))


def _link_of(msg: bytes) -> tuple[int, str, int]:
    """(index, MAC, group) of an RTM_NEWLINK answer."""
    _fam, _type, index, _flags, _change = IFINFO.unpack_from(msg, HDR.size)
    attrs = attributes(msg, HDR.size + IFINFO.size)
    group = struct.unpack("=I", attrs[IFLA_GROUP])[0] if IFLA_GROUP in attrs else 0
    return index, attrs.get(IFLA_ADDRESS, b"").hex(":"), group


def _error(what: str, code: int) -> DataplaneError | PermissionDenied:
    if code == errno.EPERM:
        return PermissionDenied(f"{what}: operation not permitted (needs root / CAP_NET_ADMIN)")
    return DataplaneError(f"{what}: {os.strerror(code)}")


class LinuxPodLinks:
    def __init__(self, ipr: IPRoute, nl: Rtnl | None = None) -> None:
        """Built on the worker thread, inside the node namespace (``nl``: its raw socket)."""
        self.ipr = ipr  # node namespace (pyroute2: inspect_pod)
        self.nl = nl or Rtnl()
        self.forbidden: dict[Identity, str] = forbidden_namespaces()

    def _pod_socket(self, netns_path: str, netns_fd: int | None) -> IPRoute:
        with pod_netns(netns_path, fd=netns_fd, forbidden=self.forbidden):
            return IPRoute(groups=0)

    def _pod_rtnl(self, netns_path: str, netns_fd: int) -> Rtnl:
        with pod_netns(netns_path, fd=netns_fd, forbidden=self.forbidden):
            return Rtnl(small=True)

    def _node_links(self) -> dict[str, tuple[int, str, int]]:
        """name -> (index, MAC, group) of every link in the node namespace (one dump)."""
        out = {}
        for msg in self.nl.dump(RTM_GETLINK, IFINFO.pack(0, 0, 0, 0, 0)):
            name = attributes(msg, HDR.size + IFINFO.size).get(IFLA_IFNAME, b"").rstrip(b"\0").decode()
            out[name] = _link_of(msg)
        return out

    # ----- setup ---------------------------------------------------------------------
    def setup_pod_link(
        self, *, host_veth: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress], mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface:
        first, *more = addresses
        ip6 = more[0] if more else None
        (res,) = self._setup([(host_veth, PodAttachment("", ifname, netns_path, first.ip, first.gateway, mtu,  # type: ignore[arg-type]
                                                        netns_fd, ip6=ip6))])
        if isinstance(res, Exception):
            raise res
        return res

    def setup_pod_links(self, pods: Sequence[PodAttachment]) -> list[Result]:
        return self._setup([(p.host_veth, p) for p in pods])

    def _setup(self, pods: Sequence[tuple[str, PodAttachment]]) -> list[Result]:
        out: list[Result | None] = [None] * len(pods)
        fds: dict[int, int] = {}
        opened: list[int] = []
        try:
            for i, (_host, p) in enumerate(pods):
                try:
                    fds[i] = p.netns_fd if p.netns_fd is not None else open_pod_netns(p.netns_path, forbidden=self.forbidden)
                except OverlayCNIError as exc:
                    out[i] = exc
                    continue
                if p.netns_fd is None:
                    opened.append(fds[i])
            self._create(pods, fds, out)
        finally:
            for fd in opened:
                os.close(fd)
        return [r if r is not None else DataplaneError("pod link: not attempted") for r in out]

    def _create(self, pods: Sequence[tuple[str, PodAttachment]], fds: dict[int, int], out: list[Result | None]) -> None:
        candidates = list(fds)
        found = self.nl.get_many(RTM_GETLINK, [IFINFO.pack(0, 0, 0, 0, 0) + _name(pods[i][0]) for i in candidates])
        todo = []
        for i, there in zip(candidates, found, strict=True):
            host, p = pods[i]
            if isinstance(there, int) and there not in GONE:
                out[i] = _error(f"veth {host}", there)
            elif not isinstance(there, int):
                out[i] = self._conflict(host, p, fds[i])
            else:
                todo.append(i)
        failed = dict(self.nl.transact([veth_request(pods[i][0], pods[i][1].ifname, fds[i], pods[i][1].mtu) for i in todo]))
        made = []
        for n, i in enumerate(todo):
            code = failed.get(n)
            host, p = pods[i]
            if code == errno.EEXIST:
                out[i] = InterfaceExists(f"ifname: {p.ifname} already exists in {p.netns_path}")
            elif code:
                out[i] = _error(f"veth {host}", code)
            else:
                made.append(i)
        pod_side: dict[int, tuple[int, str]] = {}
        for i in made:
            host, p = pods[i]
            try:
                pod_side[i] = self._configure(p, fds[i])
            except OverlayCNIError as exc:
                out[i] = exc
        self._host_gateways(pods, pod_side, out)
        ready = [i for i in pod_side if out[i] is None]  # host ends up only once every pod side is configured
        refused = dict(self.nl.transact([up_request(name=pods[i][0]) for i in ready]))
        answers = self.nl.get_many(RTM_GETLINK, [IFINFO.pack(0, 0, 0, 0, 0) + _name(pods[i][0]) for i in ready])
        for n, i in enumerate(ready):
            host, p = pods[i]
            answer = answers[n]
            if n in refused or isinstance(answer, int):
                out[i] = _error(f"veth {host}", refused.get(n) or int(answer))
                continue
            host_index, host_mac, _group = _link_of(answer)
            mac = pod_side[i][1]
            try:
                gateways = [a.gateway for a in p.addresses if a.gateway_on_host_veth]
                if gateways:
                    wait_usable(self._host_flags(host_index), gateways, where=f"host veth {host}")
            except OverlayCNIError as exc:
                out[i] = exc
                continue
            out[i] = PodInterface(ifname=p.ifname, mac=mac, mtu=p.mtu, sandbox=p.netns_path, host_veth=host,
                                  host_mac=host_mac, addresses=p.addresses)
        undo = [pods[i][0] for i in made if not isinstance(out[i], PodInterface)]
        if undo:
            try:
                self.teardown_pod_links(undo)
            except DataplaneError:
                pass  # best effort: the pod's own error is the one to report

    def _host_flags(self, index: int) -> Callable[[IPAddress], int | None]:
        return lambda ip: self.nl.address_flags(index, ip.packed)

    def _host_gateways(self, pods: Sequence[tuple[str, PodAttachment]], pod_side: dict[int, tuple[int, str]],
                       out: list[Result | None]) -> None:
        """Dual-stack: the link-local gateway (``fe80::1/64``, ``nodad``) on
        each host veth that needs one, while it is still down. Single-stack
        batches send nothing here."""
        need = [i for i in pod_side if any(a.gateway_on_host_veth for a in pods[i][1].addresses)]
        if not need:
            return
        found = self.nl.get_many(RTM_GETLINK, [IFINFO.pack(0, 0, 0, 0, 0) + _name(pods[i][0]) for i in need])
        steps, whose = [], []
        for i, answer in zip(need, found, strict=True):
            if isinstance(answer, int):
                out[i] = _error(f"veth {pods[i][0]}", answer)
                continue
            index = _link_of(answer)[0]
            for a in pods[i][1].addresses:
                if a.gateway_on_host_veth:
                    steps.append(address_request(index, ip_interface(f"{a.gateway}/64"), flags=0))
                    whose.append(i)
        for n, code in self.nl.transact(steps):
            out[whose[n]] = _error(f"gateway on host veth {pods[whose[n]][0]}", code)

    def _conflict(self, host: str, p: PodAttachment, fd: int) -> OverlayCNIError:
        """The host veth exists: the pod already has the interface, or another namespace holds this attachment."""
        try:
            pod = self._pod_rtnl(p.netns_path, fd)
        except OverlayCNIError as exc:
            return exc
        try:
            has = pod.get_many(RTM_GETLINK, [IFINFO.pack(0, 0, 0, 0, 0) + _name(p.ifname)])[0]
        finally:
            pod.close()
        if not isinstance(has, int):
            return InterfaceExists(f"ifname: {p.ifname} already exists in {p.netns_path}")
        return AttachmentConflict(
            f"CNI_NETNS {p.netns_path}: this container's {p.ifname} is already attached to another network "
            f"namespace (host veth {host}); DEL it first"
        )

    def _configure(self, p: PodAttachment, fd: int) -> tuple[int, str]:
        """The pod side: (dual-stack: IPv6 sysctls) lo up, addresses, link up,
        routes. Returns (index, MAC) of the pod interface."""
        what = f"pod interface {p.ifname} in {p.netns_path}"
        v6 = [a for a in p.addresses if a.ip.version == 6]
        if v6:  # before the interface comes up: no router discovery, SLAAC or DAD on it
            with pod_netns(p.netns_path, fd=fd, forbidden=self.forbidden):
                sysctls = LinuxSysctls()
                for key, value in POD_IPV6_SYSCTLS.items():
                    sysctls.write(f"net/ipv6/conf/{p.ifname}/{key}", value)
        pod = self._pod_rtnl(p.netns_path, fd)
        try:
            answer = pod.get_many(RTM_GETLINK, [IFINFO.pack(0, 0, 0, 0, 0) + _name(p.ifname)])[0]
            if isinstance(answer, int):
                raise _error(what, answer)
            index, mac, _group = _link_of(answer)
            steps = [up_request(index=LOOPBACK_IFINDEX)]
            steps += [address_request(index, a.ip) for a in p.addresses]
            steps.append(up_request(index=index))
            for a in p.addresses:
                if not a.gateway_on_host_veth:  # a node address: on-link through this interface
                    steps.append(route_request(ip_network(f"{a.gateway}/{a.gateway.max_prefixlen}"), oif=index))
                steps.append(route_request(a.default_route, oif=index, gateway=a.gateway))
            failed = pod.transact(steps)
            if failed:
                raise _error(what, failed[0][1])
            if v6:
                wait_usable(lambda ip: pod.address_flags(index, ip.packed), [a.ip.ip for a in v6], where=what)
            return index, mac
        finally:
            pod.close()

    # ----- teardown ------------------------------------------------------------------
    def teardown_pod_link(self, *, host_veth: str) -> None:
        self.teardown_pod_links([host_veth])

    def teardown_pod_links(self, host_veths: Sequence[str]) -> None:
        """Delete these host veths (and so their pod ends); one already gone is
        success. Raises ``DataplaneError`` naming every one that failed."""
        names = list(dict.fromkeys(host_veths))
        if len(names) == 1:
            failed = self.nl.transact([(RTM_DELLINK, 0, IFINFO.pack(0, 0, 0, 0, 0) + _name(names[0]))])
            errors = [(names[0], code) for _, code in failed if code not in GONE]
        else:
            errors = self._delete_group(names)
        if errors:
            raise DataplaneError("; ".join(str(_error(f"veth {name}", code)) for name, code in errors))

    def park_pod_links(self, host_veths: Sequence[str]) -> None:
        """DEL: each host veth down, renamed, in ``PARK_GROUP``: one RTM_NEWLINK each
        (by index: a rename needs it), all in one ``send``; one gone is success."""
        names = list(dict.fromkeys(host_veths))
        found = self.nl.get_many(RTM_GETLINK, [IFINFO.pack(0, 0, 0, 0, 0) + _name(n) for n in names])
        errors = [(n, got) for n, got in zip(names, found, strict=True) if isinstance(got, int) and got not in GONE]
        there = [(n, _link_of(got)[0]) for n, got in zip(names, found, strict=True) if not isinstance(got, int)]
        def park(n: str, index: int) -> bytes:
            return IFINFO.pack(0, 0, index, 0, 0) + _name(parked_veth_name(n)) + attr(IFLA_GROUP, _u32(PARK_GROUP))

        failed = self.nl.transact([(RTM_NEWLINK, 0, IFINFO.pack(0, 0, index, 0, IFF_UP) + park(n, index)[IFINFO.size:])
                                   for n, index in there])
        busy = [i for i, code in failed if code == errno.EBUSY]
        if busy:  # down first, then the rename
            again = self.nl.transact([m for i in busy for m in ((RTM_NEWLINK, 0, IFINFO.pack(0, 0, there[i][1], 0, IFF_UP)),
                                                               (RTM_NEWLINK, 0, park(*there[i])))])
            failed = [(i, code) for i, code in failed if code != errno.EBUSY]
            failed += [(busy[j // 2], code) for j, code in again]
        errors += [(there[i][0], code) for i, code in failed if code not in GONE]
        if errors:
            raise DataplaneError("; ".join(str(_error(f"veth {name}", code)) for name, code in errors))

    def delete_parked_links(self) -> None:
        """One RTM_DELLINK for ``PARK_GROUP``: the kernel unregisters every parked veth together."""
        failed = self.nl.transact([(RTM_DELLINK, 0, IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_GROUP, _u32(PARK_GROUP)))])
        errors = [code for _, code in failed if code not in GONE]
        if errors:
            raise _error("parked veths", errors[0])

    def _delete_group(self, names: list[str]) -> list[tuple[str, int]]:
        links = self._node_links()
        names = [n for n in names if n in links]
        if not names:
            return []
        taken = {group for _i, _m, group in links.values()}
        group = 0
        while group in taken or group in (0, PARK_GROUP):
            group = secrets.randbits(32)
        failed = dict(self.nl.transact([(RTM_NEWLINK, 0, IFINFO.pack(0, 0, 0, 0, 0) + _name(n) + attr(IFLA_GROUP, _u32(group)))
                                        for n in names]))
        errors = [(names[i], code) for i, code in failed.items() if code not in GONE]
        dropped = self.nl.transact([(RTM_DELLINK, 0, IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_GROUP, _u32(group)))])
        if dropped and dropped[0][1] not in GONE:
            errors += [(n, dropped[0][1]) for n in names if n not in {e[0] for e in errors}]
        return errors

    # ----- inspect -------------------------------------------------------------------
    def inspect_pod(self, *, netns_path: str, ifname: str, netns_fd: int | None = None) -> PodView | None:
        try:
            pod = self._pod_socket(netns_path, netns_fd)
        except DataplaneError:
            return None
        try:
            return inspect(pod, ifname)
        finally:
            pod.close()
