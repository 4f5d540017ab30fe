"""Who may talk to whom: the pure NetworkPolicy oracle.

A connection from SRC to DST on PORT/PROTO is allowed when both directions
allow it (upstream semantics):
- egress: if no policy in SRC's namespace with Egress in policyTypes selects
  SRC, SRC is not isolated for egress; otherwise some egress rule of one of
  those policies must match DST and the port;
- ingress: likewise with the policies of DST's namespace selecting DST, whose
  ingress rules must match SRC and the port.
A named port is resolved against the destination pod (name and protocol must
both match). ipBlock peers match pod IPs as well as outside addresses. An
address that is not a pod has no namespace: only ipBlock peers and "all
peers" rules match it, and it is never isolated itself. A pod's traffic to
itself never leaves its namespace and is always allowed (upstream ignores
loopback too).

Families: a connection is IPv4 or IPv6 (``family``; an address given as an
endpoint decides it, two pods default to IPv4). A pod is found by either of
its addresses; selectors match a pod whatever the family, an ipBlock only
the other end's address of the connection's family (an IPv4 block never
admits IPv6 traffic, nor the other way round), as in Kubernetes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..cidr import IPAddress
from ..families import IPFamily
from .model import NamespaceInfo, NetworkPolicy, PodInfo, PolicyPeer, PolicyPort, Rule


@dataclass(frozen=True)
class Decision:
    """The outcome in one direction (``Ingress`` or ``Egress``)."""

    direction: str
    allowed: bool
    isolated: bool
    policy: str | None = None  # ns/name of the policy that allowed it
    rule: int | None = None  # index of that rule in spec.ingress / spec.egress
    policies: tuple[str, ...] = ()  # every policy isolating the pod in this direction
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    ingress: Decision
    egress: Decision
    reason: str
    policy: str | None = None  # the deciding policy (None: a default)
    rule: str | None = None  # e.g. "ingress[0]"
    family: IPFamily = IPFamily.ipv4  # of the connection judged


@dataclass(frozen=True)
class Cluster:
    """Pods and namespaces indexed for lookups (build once, query often)."""

    pods_by_ip: Mapping[IPAddress, PodInfo]  # every address of every pod
    namespaces: Mapping[str, NamespaceInfo]

    @classmethod
    def of(cls, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo]) -> Cluster:
        return cls({ip: p for p in pods for ip in p.ips}, {n.name: n for n in namespaces})

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        return ns.labels if ns else NamespaceInfo(name).labels


Endpoint = PodInfo | IPAddress


def peer_matches(
    peer: PolicyPeer, other: Endpoint, *, policy_ns: str, cluster: Cluster, family: IPFamily = IPFamily.ipv4
) -> bool:
    """Does ``peer`` (of a policy in ``policy_ns``) match the other end of a
    connection of ``family``?"""
    if peer.ip_block is not None:
        return peer.ip_block.contains(other.address(family) if isinstance(other, PodInfo) else other)
    if not isinstance(other, PodInfo):
        return False
    if peer.namespace_selector is None:
        if other.namespace != policy_ns:
            return False
    elif not peer.namespace_selector.matches(cluster.namespace_labels(other.namespace)):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(other.labels)


def port_matches(pp: PolicyPort, port: int, *, protocol: str, dst: Endpoint) -> bool:
    """Does a rule port match traffic to ``dst`` on ``port``/``protocol``?"""
    if pp.protocol != protocol:
        return False
    if pp.port is None:
        return True
    if isinstance(pp.port, str):
        return isinstance(dst, PodInfo) and dst.named_port(pp.port, protocol) == port
    if pp.end_port is not None:
        return pp.port <= port <= pp.end_port
    return pp.port == port


def rule_matches(
    rule: Rule,
    peer: Endpoint,
    *,
    policy_ns: str,
    dst: Endpoint,
    port: int,
    protocol: str,
    cluster: Cluster,
    family: IPFamily = IPFamily.ipv4,
) -> bool:
    if rule.ports and not any(port_matches(pp, port, protocol=protocol, dst=dst) for pp in rule.ports):
        return False
    return not rule.peers or any(
        peer_matches(p, peer, policy_ns=policy_ns, cluster=cluster, family=family) for p in rule.peers
    )


def selecting(pod: PodInfo, direction: str, *, policies: Iterable[NetworkPolicy]) -> list[NetworkPolicy]:
    """The policies that isolate ``pod`` in ``direction``, sorted by key."""
    return sorted(
        (
            p
            for p in policies
            if p.namespace == pod.namespace and p.affects(direction) and p.pod_selector.matches(pod.labels)
        ),
        key=lambda p: p.key,
    )


def decide(
    direction: str,
    subject: Endpoint,
    *,
    peer: Endpoint,
    port: int,
    protocol: str,
    dst: Endpoint,
    policies: Iterable[NetworkPolicy],
    cluster: Cluster,
    family: IPFamily = IPFamily.ipv4,
) -> Decision:
    """The decision for ``subject`` (the pod whose policies apply) talking
    with ``peer`` in ``direction`` over ``family``; ``dst`` resolves named
    ports."""
    if not isinstance(subject, PodInfo):
        return Decision(direction, True, False, reason=f"{subject} is not a pod: no {direction.lower()} policy applies")
    chosen = selecting(subject, direction, policies=policies)
    keys = tuple(p.key for p in chosen)
    if not chosen:
        return Decision(direction, True, False, reason=f"{subject.key} is not isolated for {direction.lower()}")
    for pol in chosen:
        for i, rule in enumerate(pol.rules(direction)):
            if rule_matches(
                rule, peer, policy_ns=pol.namespace, dst=dst, port=port, protocol=protocol, cluster=cluster, family=family
            ):
                return Decision(
                    direction, True, True, pol.key, i, keys, f"allowed by {pol.key} {direction.lower()}[{i}]"
                )
    return Decision(
        direction,
        False,
        True,
        policies=keys,
        reason=f"{subject.key} is isolated for {direction.lower()} by {', '.join(keys)} and no rule matches",
    )


def allowed(
    src: Endpoint,
    dst: Endpoint,
    port: int,
    protocol: str,
    *,
    pods: Iterable[PodInfo],
    namespaces: Iterable[NamespaceInfo],
    policies: Iterable[NetworkPolicy],
    family: IPFamily | None = None,
) -> Verdict:
    """May ``src`` open a connection to ``dst`` on ``port``/``protocol``?
    An address that belongs to a known pod is treated as that pod. The
    connection's ``family`` is that of an address given as an endpoint,
    else ``family``, else IPv4 (``connection_family``)."""
    return evaluate(
        src, dst, port, protocol, policies=list(policies), cluster=Cluster.of(pods, namespaces), family=family
    )


def connection_family(src: Endpoint, dst: Endpoint, family: IPFamily | None = None) -> IPFamily:
    """The family of a connection between ``src`` and ``dst``: that of the
    addresses among them, else ``family``, else IPv4. ValueError when the
    endpoints or ``family`` disagree."""
    given = {IPFamily.of(e) for e in (src, dst) if not isinstance(e, PodInfo)}
    if family is not None:
        given.add(family)
    if len(given) > 1:
        raise ValueError("src, dst (and family) name different IP families: a connection is IPv4 or IPv6")
    return given.pop() if given else IPFamily.ipv4


def evaluate(
    src: Endpoint,
    dst: Endpoint,
    port: int,
    protocol: str,
    *,
    policies: list[NetworkPolicy],
    cluster: Cluster,
    family: IPFamily | None = None,
) -> Verdict:
    """``allowed`` with a prebuilt Cluster index (for all-pairs matrices)."""
    protocol = protocol.upper()
    fam = connection_family(src, dst, family)
    if not isinstance(src, PodInfo):
        src = cluster.pods_by_ip.get(src, src)
    if not isinstance(dst, PodInfo):
        dst = cluster.pods_by_ip.get(dst, dst)
    if isinstance(src, PodInfo) and isinstance(dst, PodInfo) and src.key == dst.key:
        d = Decision("Ingress", True, False, reason="loopback")
        e = Decision("Egress", True, False, reason="loopback")
        return Verdict(True, d, e, "a pod's traffic to itself never leaves its network namespace", family=fam)
    egress = decide(
        "Egress", src, peer=dst, port=port, protocol=protocol, dst=dst, policies=policies, cluster=cluster, family=fam
    )
    ingress = decide(
        "Ingress", dst, peer=src, port=port, protocol=protocol, dst=dst, policies=policies, cluster=cluster, family=fam
    )
    if not egress.allowed:
        return Verdict(False, ingress, egress, f"egress denied: {egress.reason}", family=fam)
    if not ingress.allowed:
        return Verdict(False, ingress, egress, f"ingress denied: {ingress.reason}", family=fam)
    # Allowed: name the policy that admitted it at the destination, else at the source.
    for d in (ingress, egress):
        if d.policy is not None:
            return Verdict(True, ingress, egress, d.reason, d.policy, f"{d.direction.lower()}[{d.rule}]", fam)
    return Verdict(True, ingress, egress, "neither end is isolated: allowed by default", family=fam)


def matrix(
    pods: list[PodInfo],
    *,
    port: int,
    protocol: str,
    namespaces: Iterable[NamespaceInfo],
    policies: Iterable[NetworkPolicy],
    family: IPFamily = IPFamily.ipv4,
) -> dict[tuple[str, str], bool]:
    """Reachability of every ordered pair of pods over ``family``:
    {(src key, dst key): allowed}."""
    cluster = Cluster.of(pods, namespaces)
    pols = list(policies)
    return {
        (s.key, d.key): evaluate(s, d, port, protocol, policies=pols, cluster=cluster, family=family).allowed
        for s in pods
        for d in pods
    }
