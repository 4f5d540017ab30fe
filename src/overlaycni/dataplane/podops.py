"""Pods on the node: attach, detach and check, written once against the ports.

``NodeDataplane`` (``engine``) takes these methods from ``PodOps``, so the
fake and the Linux data plane run this code. Per pod: the veth pair and the
pod side (``PodLinks``), proxy ARP on the host veth (``Sysctls``), the
node's ``<ip>/32`` route (``Routes``) and the ``pod_endpoints`` element
(the anti-spoofing set, ``NftRuleset``), in that order; removal deletes the
veth (the kernel drops its route) and the element.

Group commit: ``attach_pods`` / ``delete_pod_veths`` take a batch of pods
(the agent's batcher, ``agent.batch``, hands over the requests that arrived
together) and run each step once for the batch: one ``setup_pod_links``
(one netlink batch), one route batch, one nftables transaction. The answer
is per pod, in order: a pod that fails (its namespace is gone, its interface
exists) gets its own error and nothing of it is left, the others go on. A
shared step that fails is retried pod by pod (``_each``), so a refused route
or element is charged to its own pod only; that path is rare and costs one
more round per pod. The single-pod calls are batches of one.

Dual-stack: a pod with an IPv6 address (``PodAttachment.ip6``) gets, in the
same steps, its ``<ipv6>/128`` route, its ``ip6`` ``pod_endpoints`` element
and IPv6 forwarding on the node (``NODE_SYSCTLS_V6``, before the first
reconcile has written it); the pod side is ``PodLinks``'. A single-stack
batch runs exactly the single-stack steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import trace
from ..cidr import IPAddress
from ..errors import AttachmentConflict, ConfigError, DataplaneError, FieldError
from ..families import PodAddress
from .model import PodAttachment, PodInterface, Route, host_route, host_veth_name, is_parked_veth, is_pod_veth

if TYPE_CHECKING:
    from .engine import Ports
    from .nodetables import NodeTables


def pod_veth_sysctls(host_veth: str) -> dict[str, str]:
    """Proxy ARP answers a pod's ARP for the other pods of its /24 (same node); without
    proxy_delay=0 the kernel holds each proxied reply back by up to 0.8 s. Strict
    reverse-path filtering: a pod's only source is routed back through its veth."""
    return {
        f"net/ipv4/conf/{host_veth}/proxy_arp": "1",
        f"net/ipv4/neigh/{host_veth}/proxy_delay": "0",
        f"net/ipv4/conf/{host_veth}/rp_filter": "1",
    }


# A node with IPv6 pods (a dual-stack cluster) routes IPv6 too: in the node's
# namespace only, never on a single-stack node (forwarding also turns off the
# node's own router-advertisement autoconfiguration, RFC 4861 section 6.2.1).
# Written by the reconcile, and by the first dual-stack ADD if it comes first.
NODE_SYSCTLS_V6 = {"net/ipv6/conf/all/forwarding": "1"}


def _check_addresses(addresses: tuple[PodAddress, ...]) -> None:
    """One address per family, IPv4 first; each gateway another address of
    its network, or a link-local address (the node holds it on the veth)."""
    errors = []
    versions = [a.ip.version for a in addresses]
    if not addresses or versions[0] != 4 or len(set(versions)) != len(versions):
        errors.append(FieldError("addresses", f"{', '.join(map(str, addresses)) or 'none'}: "
                                 "need one IPv4 address, and at most one IPv6 address after it"))
    for a in addresses:
        on_link = a.gateway.version == a.ip.version and (a.gateway.is_link_local or a.gateway in a.ip.network)
        if a.gateway == a.ip.ip or not on_link:
            errors.append(FieldError("gateway", f"{a.gateway} is not another address inside {a.ip.network}, "
                                     "nor a link-local address"))
    if errors:
        raise ConfigError(errors)


def _check_ifname(name: str, field: str) -> None:
    if not name or len(name) > 15 or any(c in name for c in "/ \t\n:") or name in (".", ".."):
        raise ConfigError(FieldError(field, f"{name!r} is not a valid interface name (1-15 chars, no '/', ':' or spaces)"))


def _check_attachment(pod: PodAttachment) -> None:
    if not pod.container_id:
        raise ConfigError(FieldError("container_id", "must not be empty"))
    _check_ifname(pod.ifname, "ifname")
    if pod.ip6 is None:
        if pod.gateway not in pod.ip.network or pod.gateway == pod.ip.ip:
            raise ConfigError(FieldError("gateway", f"{pod.gateway} is not another address inside {pod.ip.network}"))
    else:
        _check_addresses(pod.addresses)
    if not 576 <= pod.mtu <= 65535:
        raise ConfigError(FieldError("mtu", f"{pod.mtu} is outside 576..65535"))


def _elements(pod: PodAttachment) -> list[tuple[str, IPAddress]]:
    """``(host veth, address)`` per address of the pod, IPv4 first."""
    return [(pod.host_veth, a.ip.ip) for a in pod.addresses]


def _each(todo: list[int], failed: dict[int, Exception], step: Callable[[list[int]], object]) -> None:
    """Run ``step`` for every index of ``todo`` at once; if it fails, again
    one index at a time, so that each failure is charged to its own pod."""
    if not todo:
        return
    try:
        step(todo)
        return
    except Exception as exc:  # noqa: BLE001 - recorded per pod below
        if len(todo) == 1:
            failed[todo[0]] = exc
            return
    for i in todo:
        try:
            step([i])
        except Exception as exc:  # noqa: BLE001
            failed[i] = exc


class PodOps:
    """The pod methods of ``NodeDataplane`` (a mixin: it brings ``p``, ``_lock`` and the nftables helpers)."""

    p: Ports
    _lock: threading.RLock

    tables: NodeTables


    def attach_pod(
        self, *, container_id: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress], mtu: int,
        netns_fd: int | None = None,
    ) -> PodInterface:
        addresses = tuple(addresses)
        _check_addresses(addresses)
        first, *more = addresses
        pod = PodAttachment(container_id, ifname, netns_path, first.ip, first.gateway, mtu, netns_fd,  # type: ignore[arg-type]
                            ip6=more[0] if more else None)
        (res,) = self.attach_pods([pod])
        if isinstance(res, Exception):
            raise res
        return res

    def attach_pods(self, pods: Sequence[PodAttachment]) -> list[PodInterface | Exception]:
        """Attach every pod in one pass (group commit): one batch of veth
        pairs, one route batch, one nftables transaction for the set elements.
        Answers per pod, in order; a pod that fails leaves nothing behind and
        fails alone (a shared step that fails is retried pod by pod to find
        whose it was)."""
        out: list[PodInterface | Exception | None] = [None] * len(pods)
        todo: list[int] = []
        hosts: set[str] = set()
        for i, pod in enumerate(pods):
            try:
                _check_attachment(pod)
                if pod.host_veth in hosts:
                    raise AttachmentConflict(f"container {pod.container_id} {pod.ifname}: attached twice in one batch")
                hosts.add(pod.host_veth)
                todo.append(i)
            except Exception as exc:  # noqa: BLE001 - answered to its own pod
                out[i] = exc
        with self._lock:
            with trace.phase("veth"):
                try:
                    links = self.p.pods.setup_pod_links([pods[i] for i in todo])
                except Exception as exc:  # noqa: BLE001 - the whole step failed: every pod of it
                    links = [exc] * len(todo)
            made = []
            for i, link in zip(todo, links, strict=True):
                out[i] = link
                if isinstance(link, PodInterface):
                    made.append(i)
            failed: dict[int, Exception] = {}
            with trace.phase("sysctl"):
                node_v6 = {}
                if any(pods[i].ip6 is not None for i in made):  # before the first ADD's reconcile, too
                    node_v6 = {k: v for k, v in NODE_SYSCTLS_V6.items() if self.p.sysctls.read(k) != v}
                for i in made:
                    try:
                        wanted = pod_veth_sysctls(pods[i].host_veth)
                        if pods[i].ip6 is not None:
                            wanted |= node_v6
                        for key, value in wanted.items():
                            self.p.sysctls.write(key, value)
                    except Exception as exc:  # noqa: BLE001
                        failed[i] = exc
            with trace.phase("route"):
                _each([i for i in made if i not in failed], failed, lambda idx: self.p.routes.apply_routes(
                    replace=[host_route(ip, host) for i in idx for host, ip in _elements(pods[i])]))
            with trace.phase("nft"):
                _each([i for i in made if i not in failed], failed, lambda idx: self.tables.add_pods(
                    [e for i in idx for e in _elements(pods[i])]))
            if failed:
                self._undo_attach([e for i in failed for e in _elements(pods[i])])
                for i, err in failed.items():
                    out[i] = err
        return [r if r is not None else DataplaneError("not attempted") for r in out]

    def _undo_attach(self, pods: list[tuple[str, IPAddress]]) -> None:
        try:
            self.p.pods.teardown_pod_links(list(dict.fromkeys(host for host, _ in pods)))
            self.p.routes.apply_routes(delete=[host_route(ip, host) for host, ip in pods])
            per_host: dict[str, IPAddress | None] = {}
            for host, ip in pods:  # one address: that element; both of a dual-stack pod: all of its veth
                per_host[host] = ip if host not in per_host else None
            self.tables.remove_pods(per_host)
        except DataplaneError:
            pass  # best effort: the original error is the one to report

    def detach_pod(self, *, container_id: str, ifname: str, netns_path: str | None) -> None:
        self.delete_pod_veth(host_veth_name(container_id, ifname))

    def detach_pods(self, pods: Sequence[tuple[str, str]]) -> list[Exception | None]:
        """``detach_pod`` for many (container_id, ifname) at once."""
        return self.delete_pod_veths([host_veth_name(cid, ifname) for cid, ifname in pods])

    def delete_pod_veth(self, host_veth: str) -> None:
        """Remove one host veth this project owns (GC of leaked pods), its route and set element.
        Not-found is success; a name that is not a pod veth is refused."""
        (err,) = self.delete_pod_veths([host_veth])
        if err is not None:
            raise err

    def delete_pod_veths(self, host_veths: Sequence[str]) -> list[Exception | None]:
        """``delete_pod_veth`` for many, in one pass: one teardown batch (the
        kernel unregisters the pairs together), one nftables transaction.
        Answers per veth, in order."""
        out: list[Exception | None] = [None] * len(host_veths)
        todo: list[int] = []
        for i, name in enumerate(host_veths):
            if is_pod_veth(name):
                todo.append(i)
            else:
                out[i] = ConfigError(FieldError("host_veth", f"{name!r} is not a pod veth of this project (oc + 13 hex)"))
        # the kernel drops each pod's /32 route with its veth
        return self._unlink(host_veths, todo, out, self.p.pods.teardown_pod_links)

    def park_pods(self, pods: Sequence[tuple[str, str]]) -> list[Exception | None]:
        """A DEL without waiting for the kernel to unregister the veth: each host
        veth is set down (the kernel drops its IPv4 and IPv6 routes: nothing is
        routed to the pod), renamed out of ``is_pod_veth`` and put in the park
        group, in one message; its elements go in one nftables transaction. The
        pod can send nothing (its eth0 has no carrier); ``delete_parked_veths``
        deletes them later, all at once. Answers per pod, in order."""
        names = [host_veth_name(cid, ifname) for cid, ifname in pods]
        return self._unlink(names, list(range(len(names))), [None] * len(names), self.p.pods.park_pod_links)

    def _unlink(
        self, names: Sequence[str], todo: list[int], out: list[Exception | None],
        links: Callable[[list[str]], object],
    ) -> list[Exception | None]:
        """The host veths ``names[i]`` (``i`` in ``todo``) through ``links`` (teardown or park: one
        batch), then their elements out in one nftables transaction; each failure into ``out``."""
        if not todo:
            return out
        failed: dict[int, Exception] = {}
        with self._lock:
            with trace.phase("veth"):
                _each(todo, failed, lambda idx: links([names[i] for i in idx]))
            with trace.phase("nft"):
                _each([i for i in todo if i not in failed], failed, lambda idx: self.tables.remove_pods(
                    dict.fromkeys(names[i] for i in idx)))
        for i, err in failed.items():
            out[i] = err
        return out

    def delete_parked_veths(self) -> None:
        with self._lock, trace.phase("veth"):
            self.p.pods.delete_parked_links()

    def list_parked_veths(self) -> list[str]:
        return sorted(link.name for link in self.p.links.list_links() if is_parked_veth(link.name))

    def check_pod(
        self, *, container_id: str, ifname: str, netns_path: str, addresses: Sequence[PodAddress],
        netns_fd: int | None = None,
    ) -> list[str]:
        """What differs from what ``attach_pod`` made, per address: the node's
        route to it, its anti-spoofing element, the address in the pod (usable,
        not tentative), the pod's default route via the gateway, and a
        gateway the host veth holds."""
        host = host_veth_name(container_id, ifname)
        problems: list[str] = []
        with self._lock:
            link = self.p.links.get_link(host)
            if link is None:
                problems.append(f"host veth {host} is missing")
            elif not link.up:
                problems.append(f"host veth {host} is down")
            routes = self.p.routes.list_routes()
            for a in addresses:
                if host_route(a.ip.ip, host) not in routes:
                    problems.append(f"node route {host_route(a.ip.ip, host).dst} dev {host} is missing")
                problems += self.tables.missing_pod_elements(host, a.ip.ip)
                if a.gateway_on_host_veth and link is not None:
                    held = self.p.addresses.list_addresses(host, version=a.ip.version)
                    if not any(h.ip == a.gateway for h in held):
                        problems.append(f"gateway {a.gateway} is missing on host veth {host}")
            view = self.p.pods.inspect_pod(netns_path=netns_path, ifname=ifname, netns_fd=netns_fd)
            if view is None:
                problems.append(f"interface {ifname} is missing in {netns_path}")
                return problems
            if not view.up:
                problems.append(f"{ifname} is down")
            for a in addresses:
                if a.ip in view.tentative:
                    problems.append(f"{ifname} address {a.ip} is tentative (duplicate address detection)")
                elif a.ip not in view.addresses:
                    have = ", ".join(str(x) for x in view.addresses if x.version == a.ip.version) or "none"
                    problems.append(f"{ifname} lacks address {a.ip} (has {have})")
                if Route(dst=a.default_route, dev=ifname, gateway=a.gateway) not in view.routes:
                    problems.append(f"default route {a.default_route} via {a.gateway} dev {ifname} is missing")
        return problems

    def list_pod_veths(self) -> list[str]:
        return sorted(link.name for link in self.p.links.list_links() if is_pod_veth(link.name))
